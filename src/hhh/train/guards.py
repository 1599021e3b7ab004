"""Guards against reward hacking, checked after every step.

A policy can raise a learned or heuristic reward by exploiting it instead of improving: drifting
far from the reference (KL), collapsing to a few safe strings (entropy, distinct-n, repetition),
emitting empty or endless answers (length), or pleasing the trained-on scorer while an independent
judge sees no gain (divergence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hhh import metrics as M


@dataclass
class Guards:
    kl_budget: float | None  # nats per completion; the defaults live in hhh.config.OnlineSettings
    kl_budget_action: str
    entropy_floor: float
    length_drift: float
    divergence_margin: float = 0.05  # rise in train reward that the second judge must follow
    first_entropy: float | None = None
    first_length: float | None = None
    first_reward: float | None = None
    first_second: float | None = None
    alarms: list[dict] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings) -> Guards:
        """From a config with OnlineSettings fields."""
        return cls(settings.kl_budget, settings.kl_budget_action, settings.entropy_floor, settings.length_drift)

    def check(self, step: int, m: dict[str, float]) -> tuple[list[str], str | None]:
        """Returns (alarm names raised this step, action: None | "stop" | "raise_beta")."""
        if self.first_entropy is None or self.first_length is None or self.first_reward is None \
                or self.first_second is None:
            self.first_entropy, self.first_length = m[M.ENTROPY], m[M.LENGTH]
            self.first_reward, self.first_second = m[M.REWARD_MEAN], m[M.SECOND_MEAN]
        raised, action = [], None
        if self.kl_budget is not None and m[M.KL] > self.kl_budget:
            raised.append("kl_budget")
            action = self.kl_budget_action
        if m[M.ENTROPY] < self.entropy_floor * self.first_entropy:
            raised.append("entropy_collapse")
        if not self.length_drift * self.first_length <= m[M.LENGTH] <= self.first_length / self.length_drift:
            raised.append("length_drift")
        if m.get(M.REPETITION_3, 0.0) > 0.5:
            raised.append("repetition")
        reward_gain = m[M.REWARD_MEAN] - self.first_reward
        second_gain = m[M.SECOND_MEAN] - self.first_second
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
