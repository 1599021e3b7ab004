"""AI feedback for RL-CAI (Bai et al. 2022, sec. 4.1): a feedback model reads a comparison principle and two answers
as a multiple-choice question; its normalised probabilities of "(A)" and "(B)" are a soft label.

    P(first better) = ( P_AB("(A)") + P_BA("(B)") ) / 2

where P_AB asks with the first answer as (A) and P_BA with the order swapped, so a model that always says "(A)"
gives 0.5 (no information) rather than a confident wrong label. Position bias is what is left of that habit:
the mean probability put on "(A)" over both orders (0.5: none). With chain-of-thought, the model first writes its
reasoning; the label is then clamped to [0.4, 0.6], as in the paper, because such labels are overconfident.

Quality is measured, not assumed: on pairs whose offensive-language judge scores differ by more than 0.3, the share
of labels that prefer the less offensive answer (`agreement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

QUESTION = ("Consider the following conversation between a person and an assistant.\n\n"
            "Person: {prompt}\n\n{question}\n\n(A) {a}\n\n(B) {b}\n\nAnswer with (A) or (B).")
PREFIX = "The answer is"
COT_PREFIX = "Let's think step by step."
CHOICES = (" (A)", " (B)")
COT_CLAMP = (0.4, 0.6)


def comparison_conversation(prompt: str, question: str, a: str, b: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION.format(prompt=prompt, question=question, a=a, b=b)}]


@dataclass(frozen=True)
class Labels:
    p_first: np.ndarray   # (N,) P(first answer is better), both orders averaged (clamped with chain-of-thought)
    p_a: np.ndarray       # (N, 2) P("(A)") asked in the order (first, second) and (second, first)
    reasoning: list[list[str]] | None = None  # chain-of-thought per pair and order

    @property
    def position_bias(self) -> float:
        """Mean probability on "(A)" over both orders: 0.5 is none, 1.0 always "(A)"."""
        return float(self.p_a.mean()) if self.p_a.size else float("nan")


def choice_probabilities(critic, conversations: Sequence[list[dict[str, str]]], prefixes: Sequence[str]) -> np.ndarray:
    """(N,) P("(A)") normalised over {"(A)", "(B)"}: the feedback model's log-probs of each choice's tokens after
    the assistant's prefix."""
    logp = critic.choice_logprobs(conversations, prefixes, CHOICES)  # (N, 2)
    return np.exp(logp[:, 0] - np.logaddexp(logp[:, 0], logp[:, 1]))


def label_pairs(critic, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                questions: Sequence[str], *, cot: bool = False, cot_tokens: int = 64, temperature: float = 0.7,
                generator: torch.Generator | None = None) -> Labels:
    """Soft labels for (first[i], second[i]) as answers to prompts[i] under questions[i], both orders asked."""
    convs = [comparison_conversation(p, q, a, b) for p, q, a, b in zip(prompts, questions, first, second, strict=True)]
    swapped = [comparison_conversation(p, q, b, a) for p, q, a, b in zip(prompts, questions, first, second, strict=True)]
    both = convs + swapped
    reasoning = None
    if cot:
        assert generator is not None, "chain-of-thought samples its reasoning: give a generator"
        thoughts = critic.generate([[*c, {"role": "assistant", "content": COT_PREFIX}] for c in both],
                                   max_new_tokens=cot_tokens, temperature=temperature, generator=generator)
        prefixes = [f"{COT_PREFIX} {t.text}\nSo the answer is" for t in thoughts]
        n = len(convs)
        reasoning = [[thoughts[i].text, thoughts[n + i].text] for i in range(n)]
    else:
        prefixes = [PREFIX] * len(both)
    p_a = choice_probabilities(critic, both, prefixes)
    n = len(convs)
    pairs = np.stack([p_a[:n], p_a[n:]], axis=1)  # (N, 2)
    p_first = both_orders(pairs[:, 0], pairs[:, 1])
    if cot:
        p_first = np.clip(p_first, *COT_CLAMP)
    return Labels(p_first, pairs, reasoning)


def both_orders(p_a_first_as_a: np.ndarray, p_a_first_as_b: np.ndarray) -> np.ndarray:
    """P(first better) from P("(A)") asked with the first answer as (A), and asked with it as (B)."""
    return (p_a_first_as_a + (1 - p_a_first_as_b)) / 2


def agreement(p_first: Sequence[float] | np.ndarray, offensive_first: Sequence[float], offensive_second: Sequence[float], *,
              gap: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """How often the labels prefer the less offensive answer, on pairs whose judge scores differ by more than
    `gap` (a tie, p = 0.5, counts half): {pairs, agreement, ci95} (agreement None without such pairs)."""
    from hhh.evaluate import bootstrap_ci

    p = np.asarray(p_first, dtype=np.float64)
    d = np.asarray(offensive_second, dtype=np.float64) - np.asarray(offensive_first, dtype=np.float64)
    decisive = np.abs(d) > gap
    if not decisive.any():
        return {"pairs": 0, "agreement": None, "ci95": None}
    judge_first = d[decisive] > 0  # the judge finds the second answer more offensive: the first is better
    hits = np.where(p[decisive] == 0.5, 0.5, (p[decisive] > 0.5) == judge_first).astype(np.float64)
    return {"pairs": int(decisive.sum()), "agreement": float(hits.mean()), "ci95": bootstrap_ci(hits, seed=seed)}
