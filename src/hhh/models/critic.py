"""PPO's critic: a value head V(s_t) on the policy's last hidden state (shared backbone), or on the last hidden
state of a second LoRA adapter "critic" on the same base (separate critic: the value loss never moves the policy).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hhh.models.policy import Forward, Policy, Tokens, load_adapter_weights


class Critic(nn.Module):
    def __init__(self, policy: Policy, *, separate: bool = False, lora=None, seed: int = 0) -> None:
        super().__init__()
        self.separate = separate
        self.head = nn.Linear(policy.lm.config.hidden_size, 1)
        # Zero init: V = 0 everywhere at step 0, so the first advantages are the returns themselves.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(policy.lm.parameters()).device)
        self._policy = [policy]  # not a submodule: the policy's parameters are not the critic's
        if separate:
            policy.add_adapter("critic", lora, seed=seed + 1)  # another stream than the policy's adapter

    @property
    def needs_hidden(self) -> bool:
        """Whether the policy's own pass must return its hidden states (shared backbone)."""
        return not self.separate

    def values(self, tokens: Tokens, policy_pass: Forward) -> Tensor:
        """(B, R) V(s_t) for the state before each response token."""
        hidden = self._policy[0].hidden_states(tokens, "critic") if self.separate else policy_pass.hidden
        return self.head(hidden).squeeze(-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The head's (the separate critic's adapter trains among the policy's trainable parameters)."""
        return list(self.head.parameters())

    def save(self, folder: str | Path) -> None:
        """value_head.pt (+ critic/, a PEFT adapter, for a separate critic)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.separate:
            self._policy[0].lm.save_pretrained(folder, selected_adapters=["critic"])  # peft writes folder/critic
        torch.save(self.head.state_dict(), folder / "value_head.pt")

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        if self.separate:
            load_adapter_weights(self._policy[0].lm, folder / "critic", "critic")
        self.head.load_state_dict(torch.load(folder / "value_head.pt", weights_only=True))
