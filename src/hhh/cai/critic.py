"""Who critiques, revises and labels in Constitutional AI: a model spec, resolved to something that generates
from conversations (and, for the feedback stage, scores fixed continuations).

    policy                 the model being aligned (the default: the paper's self-critique)
    bundled:NAME, hub id, local folder, .gguf    another local model
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
