"""Who critiques, revises and labels in Constitutional AI: a model spec, resolved to something that generates
from conversations (and, for the feedback stage, scores fixed continuations).

    policy                 the model being aligned (the default: the paper's self-critique)
    bundled:NAME, hub id, local folder, .gguf    another local model
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
            roll = sample(self.model, self.tokenizer, conversations[i:i + self.batch_size],
                          max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
            out += [Generated(t, bool(e)) for t, e in zip(roll.texts, roll.ended.tolist(), strict=True)]
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


def build_critic(spec: str, *, policy=None, tokenizer=None, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 32) -> Critic:
    """`spec` as a critic: "policy" (the given model and tokenizer) or a model spec loaded here."""
    if spec == "policy":
        if policy is None or tokenizer is None:
            raise ValueError("critic 'policy' needs the policy model and its tokenizer")
        return LocalCritic(policy, tokenizer, "policy", batch_size=batch_size)
    from hhh.models import load_causal_lm, load_tokenizer

    return LocalCritic(load_causal_lm(spec, device=device, dtype=dtype), load_tokenizer(spec), spec,
                       batch_size=batch_size)
