"""Rewards: one protocol, `score(prompts, completions) -> Tensor` (B,), higher is better.

A reward spec string builds one:

    toxicity                      1 - P(offensive), alt-profanity-check
    sentiment                     VADER compound in [-1, 1]
    length[:N]                    -|words - N| / N  (N = 50)
    refusal                       -1 for an apology or refusal ("I'm sorry", "I can't"...), else 0
    classifier:SPEC[:LABEL]       P(LABEL) of any HF sequence classifier (model spec as in hhh.models)
    rm:RUN_DIR                    a reward model trained by `hhh rm train`
    module:function               a Python callable (prompts, completions) -> floats
    0.8*toxicity + 0.2*sentiment  weighted sums of the above
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hhh.rewards.spec import Term, parse_reward

if TYPE_CHECKING:  # this module stays light: configs check reward specs through it before torch loads
    from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor: ...


class WeightedSum:
    """sum_i w_i * r_i(prompts, completions)."""

    def __init__(self, terms: Sequence[tuple[float, Reward]]) -> None:
        if not terms:
            raise ValueError("a weighted sum needs at least one reward")
        self.terms = list(terms)
        self.name = " + ".join(f"{w:g}*{r.name}" for w, r in self.terms)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        w, first = self.terms[0]
        total = w * first.score(prompts, completions)
        for w, r in self.terms[1:]:
            total = total + w * r.score(prompts, completions)
        return total


class Shaped:
    """Clip and/or normalise another reward.

    normalize="batch" z-scores each call; "running" divides by a running mean/std (Welford over every
    score seen), which keeps the scale of rewards comparable across PPO steps.
    """

    def __init__(self, inner: Reward, *, clip: tuple[float, float] | None = None, normalize: str | None = None):
        if normalize not in (None, "batch", "running"):
            raise ValueError(f"normalize must be None, 'batch' or 'running', got {normalize!r}")
        self.inner, self.clip, self.normalize = inner, clip, normalize
        self.name = inner.name
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def _update(self, x: Tensor) -> None:
        for v in x.tolist():
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return self.transform(self.inner.score(prompts, completions))

    def transform(self, x: Tensor) -> Tensor:
        """Normalise and clip raw scores of `inner` (updates the running statistics)."""
        x = x.float()
        if self.normalize == "batch" and x.numel() > 1:
            x = (x - x.mean()) / (x.std() + 1e-8)
        elif self.normalize == "running":
            self._update(x)
            std = (self.m2 / max(self.count - 1, 1)) ** 0.5 if self.count > 1 else 1.0
            x = (x - self.mean) / (std + 1e-8)
        if self.clip is not None:
            x = x.clamp(*self.clip)
        return x

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def build_reward(spec: str, *, device: str = "auto") -> Reward:
    """Build a reward from its spec string (see module docstring); the spec is checked whole first."""
    terms = parse_reward(spec)
    if len(terms) == 1 and terms[0].weight is None:
        return _build_one(terms[0], device)
    return WeightedSum([(1.0 if t.weight is None else t.weight, _build_one(t, device)) for t in terms])


def _build_one(term: Term, device: str) -> Reward:
    from hhh.rewards import builtin

    if term.kind == "toxicity":
        return builtin.Toxicity()
    if term.kind == "sentiment":
        return builtin.Sentiment()
    if term.kind == "refusal":
        return builtin.Refusal()
    if term.kind == "length":
        return builtin.Length(int(term.arg or 50))
    if term.kind == "classifier":
        model, label = _classifier_parts(term.arg or "")
        return builtin.HFClassifier(model, label, device=device)
    if term.kind == "rm":
        return builtin.RewardModelReward(term.arg or "", device=device)
    return builtin.PythonFunction(term.arg or "")


def _classifier_parts(rest: str) -> tuple[str, str | None]:
    """'org/model:label' -> (org/model, label); a path with ':' is taken whole when it exists."""
    from pathlib import Path

    if Path(rest).exists() or ":" not in rest:
        return rest, None
    model, _, label = rest.rpartition(":")
    return model, label or None


__all__ = ["Reward", "Shaped", "WeightedSum", "build_reward"]
