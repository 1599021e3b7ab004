"""A small OpenAI-compatible chat endpoint over a real (tiny) model, served by uvicorn on a local port, for the
tests of hhh's endpoint clients (Constitutional AI's `openai:MODEL@URL` critic). It implements what those clients
use: messages through the model's chat template, max_tokens, temperature (0: greedy), seed, logprobs with
top_logprobs of the first token, finish_reason, and a bearer key."""

import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Header, HTTPException

from tests.feedback_server import free_port


def make_app(model, tokenizer, key: str | None = None) -> FastAPI:
    from hhh.rollout import chat_prompt_ids, sample

    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict, authorization: str | None = Header(None)):
        if key and authorization != f"Bearer {key}":
            raise HTTPException(401, "bad key")
        messages, max_tokens = body["messages"], int(body.get("max_tokens") or 16)
        temperature, seed = float(body.get("temperature", 1.0)), int(body.get("seed") or 0)
        ids = chat_prompt_ids(tokenizer, [messages])[0]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        if temperature == 0:
            tokens, ended = [int(logp.argmax())], int(logp.argmax()) == tokenizer.eos_token_id
            text = tokenizer.decode(tokens, skip_special_tokens=True)
        else:
            roll = sample(model, tokenizer, [messages], max_new_tokens=max_tokens, temperature=temperature,
                          generator=torch.Generator().manual_seed(seed))
            text, ended, tokens = roll.texts[0], bool(roll.ended[0]), roll.response_ids[0].tolist()
        logprobs = None
        if body.get("logprobs"):
            top = torch.topk(logp, int(body.get("top_logprobs") or 1))
            first = tokenizer.decode([tokens[0]])
            logprobs = {"content": [{"token": first, "logprob": float(logp[tokens[0]]), "bytes": None,
                                     "top_logprobs": [{"token": tokenizer.decode([int(i)]), "logprob": float(v),
                                                       "bytes": None} for v, i in zip(top.values, top.indices, strict=True)]}]}
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if ended else "length", "logprobs": logprobs}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                          "total_tokens": len(ids) + len(tokens)}}

    return app


class Endpoint:
    """`with Endpoint(model, tokenizer, key) as url:` serves the model at url (".../v1") for the block."""

    def __init__(self, model, tokenizer, key: str | None = None) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(make_app(model, tokenizer, key), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("endpoint did not start in 30 s")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
