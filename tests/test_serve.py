"""hhh serve over HTTP, driven by the official `openai` client: chat and completions, streamed and not, logprobs,
several choices, embeddings; OpenAI-shaped errors for bad requests; feedback into the preference store and the
pairs it implies."""

import json
import socket
from urllib.parse import urlparse

import httpx
import pytest
import torch

from hhh.feedback.store import Store
from tests.openai_server import Endpoint


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """A tiny model with a LoRA adapter 'aligned' beside the base 'tiny', answers kept in a fresh store."""
    from peft import LoraConfig, get_peft_model

    from hhh.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, layers=2, seed=0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False), adapter_name="a0").eval()
    store = Store(tmp_path_factory.mktemp("serve") / "served.db")
    endpoint = Endpoint(peft, tokenizer, name="tiny", store=store, adapters={"aligned": "a0"}, max_tokens=64)
    with endpoint as url:
        yield url, store, endpoint


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0], api_key="unused", max_retries=0)


def test_models_chat_and_its_stream_agree(client, served):
    assert [m.id for m in client.models.list().data] == ["tiny", "aligned"]
    ask = dict(messages=[{"role": "user", "content": "How do I boil an egg?"}], max_tokens=12, temperature=0)
    plain = client.chat.completions.create(model="aligned", **ask)
    again = client.chat.completions.create(model="aligned", **ask)
    base = client.chat.completions.create(model="tiny", **ask)
    assert plain.choices[0].message.content == again.choices[0].message.content  # greedy: deterministic
    assert plain.choices[0].message.content != base.choices[0].message.content  # the adapter changes the answer
    assert plain.id.startswith("chatcmpl-") and plain.choices[0].finish_reason in ("stop", "length")
    from hhh.rollout import chat_prompt_ids

    tok = served[2].engine.tokenizer
    assert plain.usage.prompt_tokens == len(chat_prompt_ids(tok, ["How do I boil an egg?"])[0])
    assert 1 <= plain.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(model="aligned", stream=True,
                                                 stream_options={"include_usage": True}, **ask))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_seed_and_logprobs(client, served):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Say a word."}], max_tokens=6, temperature=1.0,
               n=3, seed=5, logprobs=True, top_logprobs=4)
    first = client.chat.completions.create(**ask)
    second = client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]  # same seed, same texts
    assert len(set(texts)) > 1 and [c.index for c in first.choices] == [0, 1, 2]
    for choice in first.choices:
        content = choice.logprobs.content
        assert len(content) == sum(1 for _ in content) and all(len(t.top_logprobs) == 4 for t in content)
        for t in content:  # the chosen token's log-prob is at most the best alternative's, all <= 0
            assert t.logprob <= t.top_logprobs[0].logprob + 1e-6 and t.top_logprobs[0].logprob <= 0
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)


def test_completions_endpoint_several_prompts_and_legacy_logprobs(client):
    out = client.completions.create(model="tiny", prompt=["Once upon a time", "The capital of France"],
                                    max_tokens=5, temperature=0, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1] and out.object == "text_completion"
    for c in out.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    streamed = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                              stream=True, logprobs=2))
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    pieces = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert sum((p.token_logprobs for p in pieces), []) == pytest.approx(out.choices[0].logprobs.token_logprobs)
    assert sum((p.tokens for p in pieces), []) == out.choices[0].logprobs.tokens


def test_embeddings_with_the_packaged_minilm(client):
    out = client.embeddings.create(model="minilm", input=["How do I cook rice?", "Rice on the stove, how?",
                                                          "The stock market fell."])
    vectors = torch.tensor([d.embedding for d in out.data])
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.2
    plain = httpx.post(client.base_url.__str__().rstrip("/") + "/embeddings", timeout=30,
                       json={"model": "minilm", "input": "How do I cook rice?", "encoding_format": "float"}).json()
    assert plain["data"][0]["embedding"] == pytest.approx(vectors[0].tolist(), abs=1e-6)
    assert plain["usage"]["prompt_tokens"] == 8  # [CLS] how do i cook rice ? [SEP]


def errors(url: str, path: str, body, **kwargs) -> tuple[int, dict]:
    r = httpx.post(url + path, **({"content": body} if isinstance(body, bytes) else {"json": body}), timeout=30,
                   **kwargs)
    return r.status_code, r.json()


def test_bad_requests_get_openai_shaped_errors(served):
    url = served[0]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({**chat, "temperature": "hot"}, 400, "temperature", None),
        ({**chat, "max_tokens": 1.5}, 400, "max_tokens", None),
        ({**chat, "messages": "hi"}, 400, "messages", None),
        ({**chat, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
        ({**chat, "n": 0}, 400, "n", None),
        ({**chat, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({**chat, "max_tokens": 65}, 400, "max_tokens", None),
        ({**chat, "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 8}, 400, "messages",
         "context_length_exceeded"),
        ({**chat, "top_logprobs": 3}, 400, "top_logprobs", None),
        ({"model": "tiny"}, 400, "messages", None),
    ]
    for body, status, param, code in cases:
        got, answer = errors(url, "/chat/completions", body)
        assert got == status, (body, answer)
        err = answer["error"]
        assert err["param"] == param and err["code"] == code and err["type"], answer
        assert "\n" not in err["message"] and "Traceback" not in err["message"]
    got, answer = errors(url, "/chat/completions", b"{not json")
    assert got == 400 and answer["error"]["type"] == "invalid_request_error"
    got, answer = errors(url, "/chat/completions", json.dumps({**chat, "pad": "x" * (2 * 1024 * 1024)}).encode(),
                         headers={"content-type": "application/json"})
    assert got == 413 and "over" in answer["error"]["message"]


def test_api_keys_are_required_when_set(tokenizer):
    from hhh.models import tiny_causal_lm

    with Endpoint(tiny_causal_lm(tokenizer, seed=0), tokenizer, key="k3y-of-test") as url:
        got, answer = errors(url, "/chat/completions", {"model": "tiny", "messages": []})
        assert got == 401 and answer["error"]["code"] == "invalid_api_key"
        got, _ = errors(url, "/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 2}, headers={"authorization": "Bearer k3y-of-test"})
        assert got == 200
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # health needs no key


def test_feedback_lands_in_the_store_and_becomes_pairs(client, served):
    url, store, _ = served
    prompt = "Which fruit is yellow?"
    first = client.chat.completions.create(model="aligned", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=6, temperature=1.0, n=2, seed=11)
    a, b = (c.message.content for c in first.choices)
    assert a != b
    post = lambda body: httpx.post(url + "/feedback", json=body, timeout=30)  # noqa: E731
    assert post({"id": first.id, "choice": 0, "thumbs": 1}).status_code == 201
    assert post({"id": first.id, "choice": 1, "thumbs": -1, "feedback_id": "fb-1"}).status_code == 201
    again = post({"id": first.id, "choice": 1, "thumbs": -1, "feedback_id": "fb-1"})
    assert again.status_code == 409 and "already saved" in again.json()["error"]["message"]
    assert post({"id": first.id, "choice": 0, "rating": 5}).status_code == 201
    assert post({"id": first.id, "preferred": 1}).status_code == 201
    assert post({"id": first.id, "choice": 1, "edit": "Bananas are yellow."}).status_code == 201
    for bad, status in (({"id": "chatcmpl-nope", "thumbs": 1}, 404), ({"id": first.id, "choice": 7, "thumbs": 1}, 404),
                        ({"id": first.id, "thumbs": 2}, 400), ({"id": first.id}, 400),
                        ({"id": first.id, "thumbs": 1, "rating": 3}, 400)):
        r = post(bad)
        assert r.status_code == status, (bad, r.text)
    rows = store.served_feedback()
    assert [(r["kind"], r["value"]) for r in rows if r["response_id"] == first.id] == [
        ("thumbs", 1.0), ("thumbs", -1.0), ("rating", 5.0), ("preferred", None), ("edit", None)]
    pairs = {(p["chosen"], p["rejected"]) for p in store.pairs(source="served") if p["prompt"] == prompt}
    # thumbs: a over b; preferred: b over a; the edit over b (the rating alone, on one answer, implies nothing)
    assert pairs == {(a, b), (b, a), ("Bananas are yellow.", b)}
    assert all(p["source"] == "served" for p in store.pairs() if p["prompt"] == prompt)


def test_langchain_chat_model_invokes_streams_and_sends_tools(served, client):
    """LangChain's ChatOpenAI pointed at the server: invoke, stream, and an agent-style call with tools bound
    (accepted; this server answers in text, it does not call tools)."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    chat = ChatOpenAI(base_url=served[0], api_key="unused", model="aligned", max_tokens=8, temperature=0,
                      max_retries=0)
    answer = chat.invoke("How do I boil an egg?")
    direct = client.chat.completions.create(model="aligned", max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "How do I boil an egg?"}])
    assert answer.content == direct.choices[0].message.content
    assert answer.usage_metadata["output_tokens"] == direct.usage.completion_tokens
    assert "".join(chunk.content for chunk in chat.stream("How do I boil an egg?")) == answer.content
    with_tools = chat.bind_tools([weather]).invoke("What is the weather in Paris?")
    assert isinstance(with_tools.content, str) and with_tools.tool_calls == []


def test_a_client_that_goes_away_stops_its_generation(tokenizer):
    import time

    from hhh.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, seed=0)
    # 10 ms per forward pass: 400 tokens take ~4 s, so both clients leave long before their answers could end
    model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    with Endpoint(model, tokenizer, max_tokens=480) as url:
        engine = Endpoint.last.engine
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 400,
                "temperature": 1.0, "seed": 3}
        with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk arrived: generation is under way; now hang up
        # a non-streaming client that hangs up once its generation is under way. A client timeout cannot say when
        # that is: twice in full CI runs its request was not yet in the engine after 0.3 s, then 1 s. So the client
        # is a plain socket, closed when the engine has taken its job in (long before the ~4 s answer).
        where = urlparse(url)
        payload = json.dumps(body).encode()
        client = socket.create_connection((where.hostname, where.port), timeout=10)
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (where.netloc.encode(), len(payload), payload))
        deadline = time.time() + 20
        while engine.stats.requests < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats.requests == 2, f"{engine.stats}\n{Endpoint.last.stacks()}"
        client.close()
        deadline = time.time() + 20
        while (engine.stats.cancelled < 2 or engine.running()) and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats.cancelled == 2 and engine.running() == 0, f"{engine.stats}\n{Endpoint.last.stacks()}"
        assert engine.stats.generated_tokens < 2 * 400  # neither ran to max_tokens


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_prompt_still_being_tokenized_does_not_stall_the_server(tokenizer, monkeypatch, path):
    """Tokenizing runs beside the event loop, not on it: while one request's prompt is held inside the tokenizer
    (a long prompt, a slow chat template), the server still answers /health, serves other requests and hears that
    a streaming client hung up."""
    import threading
    import time

    from hhh.models import tiny_causal_lm

    entered, release = threading.Event(), threading.Event()
    held = "Hold this one."

    def hold(text) -> None:
        if held in str(text):  # the chat template gets messages, the completions endpoint a string
            entered.set()
            release.wait(60)

    chat_template, encode = tokenizer.apply_chat_template, type(tokenizer).__call__
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda messages, *a, **k: (
        hold(messages), chat_template(messages, *a, **k))[1])
    # tokenizer(text) looks __call__ up on the class; monkeypatch puts the class back after the test
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, *a, **k: (
        hold(text), encode(self, text, *a, **k))[1])
    model = tiny_causal_lm(tokenizer, seed=0)
    model.register_forward_pre_hook(lambda *_: time.sleep(0.01))  # ~4 s for 400 tokens
    with Endpoint(model, tokenizer, max_tokens=480) as url:
        engine = Endpoint.last.engine

        def body(text: str, **more) -> dict:
            if path == "/completions":
                return {"model": "tiny", "prompt": text, **more}
            return {"model": "tiny", "messages": [{"role": "user", "content": text}], **more}

        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(httpx.post(
            url + path, json=body(held, max_tokens=2, temperature=0), timeout=60)))
        waiting.start()
        try:
            assert entered.wait(20), "the held request never reached the tokenizer"
            # the event loop is free: a health check, a whole other request, a streaming client that leaves
            assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
            other = httpx.post(url + path, json=body("Say hi.", max_tokens=2, temperature=0), timeout=10)
            assert other.status_code == 200 and engine.stats.requests == 1
            with httpx.stream("POST", url + path, json=body("Go on forever.", max_tokens=400, stream=True),
                              timeout=10) as r:
                assert r.status_code == 200
                next(r.iter_lines())
            deadline = time.time() + 10
            while engine.stats.cancelled < 1 and time.time() < deadline:
                time.sleep(0.05)
            assert engine.stats.cancelled == 1 and engine.stats.generated_tokens < 400
        finally:
            release.set()
            waiting.join(60)
        assert [a.status_code for a in answers] == [200] and engine.stats.requests == 3


def test_label_export_reads_served_feedback(served, client, tmp_path):
    from hhh.cli import main

    url, store, _ = served
    out = client.chat.completions.create(model="tiny", n=2, max_tokens=5, temperature=1.0, seed=21,
                                         messages=[{"role": "user", "content": "Pick a number."}])
    assert httpx.post(url + "/feedback", json={"id": out.id, "preferred": 1}).status_code == 201
    target = tmp_path / "served.jsonl"
    assert main(["label", "export", "--db", store.url.removeprefix("sqlite:///"), "--out", str(target),
                 "--source", "served"]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    mine = [r for r in rows if r["prompt"] == "Pick a number."]
    assert mine == [{"prompt": "Pick a number.", "chosen": out.choices[1].message.content,
                     "rejected": out.choices[0].message.content, "labeler": "served", "source": "served"}]


@pytest.mark.slow
def test_the_bundled_model_answers_the_openai_client(tokenizer):
    """The real SmolLM2-135M-Instruct behind hhh serve: a greedy chat answer equals its own greedy generation."""
    from openai import OpenAI

    from hhh.models import DEFAULT_MODEL, load_causal_lm
    from hhh.rollout import chat_prompt_ids

    model = load_causal_lm(DEFAULT_MODEL, device="cpu")
    with Endpoint(model, tokenizer, name=DEFAULT_MODEL) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        out = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=24, temperature=0,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([chat_prompt_ids(Endpoint.last.engine.tokenizer, ["What is the capital of France?"])[0]])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                do_sample=False)[0, ids.shape[1]:]
    expected = tokenizer.decode(greedy[greedy != tokenizer.eos_token_id], skip_special_tokens=True)
    assert out.choices[0].message.content == expected and "Paris" in expected


def test_an_answer_the_store_cannot_keep_is_an_error_not_a_silent_success(tokenizer, tmp_path):
    """The store loses its table (a real failure of a real SQLite store): a streamed answer ends with an error
    event instead of [DONE], a plain one is a 500 in OpenAI's shape; the server keeps serving."""
    from sqlalchemy import text

    from hhh.models import tiny_causal_lm

    store = Store(tmp_path / "broken.db")
    with store.write() as s:
        s.execute(text("DROP TABLE served_feedback"))
        s.execute(text("DROP TABLE served"))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with Endpoint(tiny_causal_lm(tokenizer, seed=0), tokenizer, store=store) as url:
        r = httpx.post(url + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "Traceback" not in r.text
        with httpx.stream("POST", url + "/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] != "data: [DONE]" and "could not be recorded" in lines[-1]
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"
