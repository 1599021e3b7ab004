"""Guards against reward hacking, checked after every step.

A policy can raise a learned or heuristic reward by exploiting it instead of improving: drifting
far from the reference (KL), collapsing to a few safe strings (entropy, distinct-n, repetition),
emitting empty or endless answers (length), or pleasing the trained-on scorer while an independent
judge sees no gain (divergence).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Guards:
    kl_budget: float | None = 8.0
    kl_budget_action: str = "raise_beta"
    entropy_floor: float = 0.3
    length_drift: float = 0.5
    divergence_margin: float = 0.05  # rise in train reward that the second judge must follow
    first_entropy: float | None = None
    first_length: float | None = None
    first_reward: float | None = None
    first_second: float | None = None
    alarms: list[dict] = field(default_factory=list)

    def check(self, step: int, m: dict[str, float]) -> tuple[list[str], str | None]:
        """Returns (alarm names raised this step, action: None | "stop" | "raise_beta")."""
        if self.first_entropy is None:
            self.first_entropy, self.first_length = m["policy/entropy"], m["length/mean"]
            self.first_reward, self.first_second = m["reward/score"], m["second/score"]
        raised, action = [], None
        if self.kl_budget is not None and m["kl/k1"] > self.kl_budget:
            raised.append("kl_budget")
            action = self.kl_budget_action
        if m["policy/entropy"] < self.entropy_floor * self.first_entropy:
            raised.append("entropy_collapse")
        if not self.length_drift * self.first_length <= m["length/mean"] <= self.first_length / self.length_drift:
            raised.append("length_drift")
        if m.get("samples/repetition_3", 0.0) > 0.5:
            raised.append("repetition")
        reward_gain = m["reward/score"] - self.first_reward
        second_gain = m["second/score"] - self.first_second
        if reward_gain > self.divergence_margin and second_gain <= 0:
            raised.append("reward_divergence")
        for name in raised:
            self.alarms.append({"step": step, "alarm": name})
        return raised, action

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("first_entropy", "first_length", "first_reward", "first_second", "alarms")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
