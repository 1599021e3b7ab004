"""Rewards: one protocol, `score(prompts, completions) -> Tensor` (B,), higher is better.

A reward spec string builds one:

    toxicity                      1 - P(offensive), alt-profanity-check
    sentiment                     VADER compound in [-1, 1]
    length[:N]                    -|words - N| / N  (N = 50)
    classifier:SPEC[:LABEL]       P(LABEL) of any HF sequence classifier (model spec as in hhh.models)
    rm:RUN_DIR                    a reward model trained by `hhh rm train`
    module:function               a Python callable (prompts, completions) -> floats
    0.8*toxicity + 0.2*sentiment  weighted sums of the above
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

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
        return sum(w * r.score(prompts, completions) for w, r in self.terms)


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


def _split_top(spec: str) -> list[str]:
    return [part.strip() for part in spec.split("+")]


def build_reward(spec: str, *, device: str = "auto") -> Reward:
    """Build a reward from its spec string (see module docstring)."""
    if not spec or not spec.strip():
        raise ValueError("reward spec is empty")
    parts = _split_top(spec)
    if len(parts) == 1 and "*" not in parts[0]:
        return _build_one(parts[0], device)
    terms = []
    for part in parts:
        weight, star, name = part.partition("*")
        if not star:
            weight, name = "1", part
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not a number") from None
        terms.append((w, _build_one(name.strip(), device)))
    return WeightedSum(terms)


def _build_one(spec: str, device: str) -> Reward:
    from hhh.rewards import builtin

    head, _, rest = spec.partition(":")
    if spec == "toxicity":
        return builtin.Toxicity()
    if spec == "sentiment":
        return builtin.Sentiment()
    if head == "length":
        try:
            return builtin.Length(int(rest) if rest else 50)
        except ValueError:
            raise ValueError(f"reward {spec!r}: length target must be an integer") from None
    if head == "classifier":
        if not rest:
            raise ValueError("reward 'classifier:' needs a model spec, e.g. classifier:org/model[:label]")
        model, label = _classifier_parts(rest)
        return builtin.HFClassifier(model, label, device=device)
    if head == "rm":
        if not rest:
            raise ValueError("reward 'rm:' needs a run folder of `hhh rm train`, e.g. rm:runs/rm-20261123-120000")
        from hhh.reward_model import RewardModelReward

        return RewardModelReward(rest, device=device)
    if rest and head.replace(".", "").replace("_", "").isalnum():
        return builtin.PythonFunction(spec)
    raise ValueError(
        f"unknown reward {spec!r}: expected toxicity, sentiment, length[:N], classifier:SPEC[:LABEL], "
        "rm:RUN_DIR or module:function"
    )


def _classifier_parts(rest: str) -> tuple[str, str | None]:
    """'org/model:label' -> (org/model, label); a path with ':' is taken whole when it exists."""
    from pathlib import Path

    if Path(rest).exists() or ":" not in rest:
        return rest, None
    model, _, label = rest.rpartition(":")
    return model, label or None


__all__ = ["Reward", "Shaped", "WeightedSum", "build_reward"]
