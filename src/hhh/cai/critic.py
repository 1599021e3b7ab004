"""Who critiques, revises and labels in Constitutional AI: a model spec, resolved to something that generates
from conversations (and, for the feedback stage, scores fixed continuations).

    policy                 the model being aligned (the default: the paper's self-critique)
    bundled:NAME, hub id, local folder, .gguf    another local model
    openai:MODEL@URL       a model behind any OpenAI-compatible endpoint (hhh serve, vLLM, llama.cpp, OpenAI);
                           the key comes from the environment variable OPENAI_API_KEY (none: no key sent)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from hhh.rollout import Prompt


@dataclass(frozen=True)
class Generated:
    text: str
    ended: bool  # the model emitted EOS (False: cut at max_new_tokens, i.e. truncated)


class Critic(Protocol):
    name: str

    def generate(self, conversations: Sequence[Prompt], *, max_new_tokens: int, temperature: float,
                 generator: torch.Generator) -> list[Generated]: ...

    def choice_logprobs(self, conversations: Sequence[Prompt], prefixes: Sequence[str],
                        choices: Sequence[str]) -> np.ndarray: ...


class LocalCritic:
    """A causal LM in this process; conversations go through its own tokenizer's chat template."""

    def __init__(self, model, tokenizer, name: str, *, batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size

    def generate(self, conversations: Sequence[Prompt], *, max_new_tokens: int, temperature: float,
                 generator: torch.Generator) -> list[Generated]:
        from hhh.rollout import sample

        out: list[Generated] = []
        for i in range(0, len(conversations), self.batch_size):
            if temperature == 0:
                out += self._greedy(conversations[i:i + self.batch_size], max_new_tokens)
                continue
            roll = sample(self.model, self.tokenizer, conversations[i:i + self.batch_size],
                          max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
            out += [Generated(t, bool(e)) for t, e in zip(roll.texts, roll.ended.tolist(), strict=True)]
        return out

    @torch.no_grad()
    def _greedy(self, conversations: Sequence[Prompt], max_new_tokens: int) -> list[Generated]:
        """Temperature 0: the argmax token at every step (transformers' generate, no sampling)."""
        from hhh.rollout import chat_prompt_ids, context_length, left_pad

        tok = self.tokenizer
        seqs = chat_prompt_ids(tok, conversations)
        for i, s in enumerate(seqs):
            if len(s) + max_new_tokens > context_length(self.model):
                raise ValueError(f"conversation {i} has {len(s)} tokens; with max_new_tokens={max_new_tokens} it "
                                 f"exceeds the model context of {context_length(self.model)}")
        ids, mask = left_pad(seqs, tok.pad_token_id, next(self.model.parameters()).device)
        new = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
        out = []
        for row in new.tolist():
            ended = tok.eos_token_id in row
            row = row[:row.index(tok.eos_token_id)] if ended else row
            out.append(Generated(tok.decode(row, skip_special_tokens=True).strip(), ended))
        return out

    @torch.no_grad()
    def choice_logprobs(self, conversations: Sequence[Prompt], prefixes: Sequence[str],
                        choices: Sequence[str]) -> np.ndarray:
        """(N, len(choices)) log-prob (T = 1, summed over its tokens) of each choice written after the assistant's
        `prefixes[i]` in conversation i. Prefix and choice are tokenized apart, so every choice follows the same
        prefix tokens."""
        from hhh.rollout import chat_prompt_ids, response_logprobs, tokens_from_ids

        tok = self.tokenizer
        queries = [q + tok(p, add_special_tokens=False)["input_ids"]
                   for q, p in zip(chat_prompt_ids(tok, conversations), prefixes, strict=True)]
        options = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        device = next(self.model.parameters()).device
        out = np.zeros((len(queries), len(options)))
        rows = [(i, j) for i in range(len(queries)) for j in range(len(options))]
        for s in range(0, len(rows), self.batch_size):
            part = rows[s:s + self.batch_size]
            t = tokens_from_ids([queries[i] for i, _ in part], [options[j] for _, j in part], tok.pad_token_id, device)
            logp = response_logprobs(self.model, t.query_ids, t.query_mask, t.response_ids, t.response_mask)
            for (i, j), v in zip(part, logp.sum(-1).tolist(), strict=True):
                out[i, j] = v
        return out


class EndpointCritic:
    """A model behind an OpenAI-compatible chat endpoint. Choices are scored from the top log-probs of the first
    token the model answers with (an endpoint cannot be made to continue an assistant prefix portably): the
    probability mass on tokens that read "A" (or "(A", " A") against those that read "B"."""

    TOP = 20  # top_logprobs asked for (OpenAI's maximum)

    def __init__(self, model: str, url: str, *, key: str | None = None, workers: int = 8, timeout: float = 120) -> None:
        from openai import OpenAI

        self.name, self.url, self.workers = f"openai:{model}@{url}", url, workers
        self.model = model
        self.client = OpenAI(base_url=url, api_key=key or "none", timeout=timeout, max_retries=1)

    def _chat(self, messages, **kwargs):
        from openai import OpenAIError

        try:
            return self.client.chat.completions.create(model=self.model, messages=messages, **kwargs)
        except OpenAIError as e:
            raise ConnectionError(f"critic {self.name}: {type(e).__name__}: {str(e)[:200]}") from None

    def _map(self, fn, items: Sequence) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(fn, items))

    def generate(self, conversations: Sequence[Prompt], *, max_new_tokens: int, temperature: float,
                 generator: torch.Generator) -> list[Generated]:
        # one seed per request, drawn from the caller's generator: the same generator state asks the same thing
        seeds = torch.randint(0, 2**31 - 1, (len(conversations),), generator=generator).tolist()

        def one(args) -> Generated:
            conv, seed = args
            messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
            out = self._chat(messages, max_tokens=max_new_tokens, temperature=temperature, seed=seed)
            choice = out.choices[0]
            return Generated((choice.message.content or "").strip(), choice.finish_reason == "stop")

        return self._map(one, list(zip(conversations, seeds, strict=True)))

    def choice_logprobs(self, conversations: Sequence[Prompt], prefixes: Sequence[str],
                        choices: Sequence[str]) -> np.ndarray:
        from hhh.cai.feedback import PREFIX

        letters = [c.strip().strip("()").strip() for c in choices]

        def one(args) -> list[float]:
            conv, prefix = args
            messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
            if prefix != PREFIX:  # chain-of-thought written before: the reasoning is the assistant's turn
                messages = [*messages, {"role": "assistant", "content": prefix},
                            {"role": "user", "content": "So which is it? Reply with the letter only."}]
            out = self._chat(messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.TOP)
            content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
            mass = dict.fromkeys(letters, 0.0)
            for top in (content[0].top_logprobs if content else []):
                key = top.token.strip().strip("()").strip()
                if key in mass:
                    mass[key] += float(np.exp(top.logprob))
            return [float(np.log(max(mass[x], 1e-9))) for x in letters]

        return np.array(self._map(one, list(zip(conversations, prefixes, strict=True))))


def parse_endpoint(spec: str) -> tuple[str, str]:
    """'openai:MODEL@URL' -> (MODEL, URL)."""
    model, at, url = spec.removeprefix("openai:").rpartition("@")
    if not at or not model or not url.startswith(("http://", "https://")):
        raise ValueError(f"critic {spec!r}: expected openai:MODEL@URL, e.g. openai:gpt-4o-mini@https://api.openai.com/v1")
    return model, url


def build_critic(spec: str, *, policy=None, tokenizer=None, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 32) -> Critic:
    """`spec` as a critic: "policy" (the given model and tokenizer), openai:MODEL@URL, or a model spec loaded
    here."""
    if spec.startswith("openai:"):
        import os

        model, url = parse_endpoint(spec)
        return EndpointCritic(model, url, key=os.environ.get("OPENAI_API_KEY"))
    if spec == "policy":
        if policy is None or tokenizer is None:
            raise ValueError("critic 'policy' needs the policy model and its tokenizer")
        return LocalCritic(policy, tokenizer, "policy", batch_size=batch_size)
    from hhh.models import load_causal_lm, load_tokenizer

    return LocalCritic(load_causal_lm(spec, device=device, dtype=dtype), load_tokenizer(spec), spec,
                       batch_size=batch_size)
