"""A LoRA policy with a value head, whose reference is the same base weights.

One copy of the base weights serves three roles:
  policy     base + the trainable adapter "default"
  reference  base with the adapter disabled, or base + a frozen "reference" adapter when training
             starts from an existing adapter
  critic     a value head on the policy's last hidden state (shared backbone, default), or on the
             last hidden state of a second adapter "critic" (separate critic: the value loss then
             never moves the policy)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hhh.losses import entropy_from_logprobs
from hhh.rollout import positions


@dataclass(frozen=True)
class Forward:
    logprobs: Tensor  # (B, R) log pi(a_t | s_t) at the temperature
    entropy: Tensor | None  # (B, R) entropy of pi(. | s_t) at the temperature
    values: Tensor | None  # (B, R) V(s_t), the state before token t
    trunk: Tensor | None = None  # (B, Q+R, H) hidden states entering the first adapted layer


# Architectures whose decoder takes `inputs_embeds` unscaled into its first layer, so that the frozen
# trunk's output can be fed to the adapted top layers directly.
_SPLITTABLE = {"llama", "mistral", "qwen2", "qwen3"}


def frozen_trunk_depth(lm) -> int:
    """How many bottom layers carry no adapter (0 when every layer does or the model is not splittable)."""
    if lm.config.model_type not in _SPLITTABLE:
        return 0
    layers = _decoder_layers(lm)
    for i, layer in enumerate(layers):
        if any("lora_" in n for n, _ in layer.named_parameters()):
            return i
    return 0


def _decoder_layers(lm) -> nn.ModuleList:
    return lm.get_base_model().model.layers


class PolicyWithValue(nn.Module):
    def __init__(self, lm, *, has_reference_adapter: bool = False, separate_critic: bool = False) -> None:
        super().__init__()
        self.lm = lm  # a peft.PeftModel with a trainable adapter named "default"
        self.has_reference_adapter = has_reference_adapter
        self.separate_critic = separate_critic
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        # Zero init: V = 0 everywhere at step 0, so the first advantages are the returns themselves.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(lm.parameters()).device)
        # Layers below the first adapted one compute the same thing for policy and reference and need
        # no gradient: their output (the "trunk") is computed once per batch and reused by the
        # reference pass and every PPO epoch, which then run only the adapted top layers.
        self.split = frozen_trunk_depth(lm)
        # The parameters that train, fixed here. PEFT's set_adapter (also run when disable_adapter() exits)
        # rewrites requires_grad of every adapter to "active or not", which would freeze the critic's LoRA after
        # the first reference pass; every adapter switch below puts this set back instead.
        self._trainable = {id(p) for p in self.parameters() if p.requires_grad}
        self.eval()

    def train(self, mode: bool = True):
        # Dropout stays off in every pass, training ones included (TRL's disable_dropout does the same): the
        # reference and old-policy log-probs are dropout-free, so a dropped-out training pass would put noise into
        # every ratio and margin. A fresh LoRA layer is created in train mode, so this is set here, not by the loader.
        return super().train(False)

    @contextmanager
    def _top_layers_only(self):
        decoder = self.lm.get_base_model().model
        layers = decoder.layers
        decoder.layers = layers[self.split :]
        try:
            yield
        finally:
            decoder.layers = layers

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if id(p) in self._trainable]

    def _restore_trainable(self) -> None:
        for p in self.lm.parameters():
            p.requires_grad_(id(p) in self._trainable)

    def forward_response(
        self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
        *, temperature: float, values: bool = True, entropy: bool = False, entropy_grad: bool = True,
        trunk: Tensor | None = None, keep_trunk: bool = False,
    ) -> Forward:
        """Log-probs (and entropy, values) of the response tokens.

        entropy_grad=False: the entropy is only measured (no graph through the (B, R, V) probabilities).

        trunk: hidden states from an earlier `keep_trunk=True` call on the same tokens; only the adapted
        top layers then run. keep_trunk: return the trunk for later calls.
        """
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        R = response_ids.shape[1]
        kw = {"attention_mask": mask, "position_ids": positions(mask), "logits_to_keep": R + 1,
              "output_hidden_states": values and not self.separate_critic, "use_cache": False}
        captured: list[Tensor] = []
        if trunk is not None and self.split:
            with self._top_layers_only():
                out = self.lm(inputs_embeds=trunk, **kw)
        else:
            hook = None
            if keep_trunk and self.split:
                def grab(module, args, kwargs):
                    captured.append((args[0] if args else kwargs["hidden_states"]).detach())
                hook = _decoder_layers(self.lm)[self.split].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                out = self.lm(input_ids=ids, **kw)
            finally:
                if hook is not None:
                    hook.remove()
        # Only the R response positions' logits exist (logits_to_keep): never (B, Q+R, V).
        logits = out.logits[:, :-1].float() / temperature  # position t predicts response token t
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, response_ids[..., None]).squeeze(-1)
        ent = None
        if entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = entropy_from_logprobs(logp_all if entropy_grad else logp_all.detach())
        vals = None
        if values:
            hidden_states = out.hidden_states
            if self.separate_critic:
                trunk_in = trunk if trunk is not None else (captured[0] if captured else None)
                hidden_states = self._critic_hidden(ids, trunk_in, {**kw, "output_hidden_states": True,
                                                                    "logits_to_keep": 1})
            hidden = hidden_states[-1][:, -(R + 1) : -1].float()  # states before each response token
            vals = self.value_head(hidden).squeeze(-1)
        return Forward(logp, ent, vals, captured[0] if captured else None)

    @contextmanager
    def _adapter(self, name: str):
        self.lm.set_adapter(name)
        try:
            yield
        finally:
            self.lm.set_adapter("default")
            self._restore_trainable()

    def _critic_hidden(self, ids: Tensor, trunk: Tensor | None, kw: dict):
        with self._adapter("critic"):
            if trunk is not None and self.split:
                with self._top_layers_only():
                    return self.lm(inputs_embeds=trunk, **kw).hidden_states
            return self.lm(input_ids=ids, **kw).hidden_states

    @contextmanager
    def reference(self):
        """The reference policy: adapter disabled, or the frozen starting adapter."""
        if not self.has_reference_adapter:
            try:
                with self.lm.disable_adapter():
                    yield self
            finally:
                self._restore_trainable()
            return
        with self._adapter("reference"):
            yield self

    @torch.no_grad()
    def reference_logprobs(self, query_ids, query_mask, response_ids, response_mask, *, temperature: float,
                           trunk: Tensor | None = None) -> Tensor:
        with self.reference():
            return self.forward_response(query_ids, query_mask, response_ids, response_mask,
                                         temperature=temperature, values=False, trunk=trunk).logprobs

    def save(self, folder: str | Path) -> None:
        """PEFT adapter (loadable by peft.PeftModel.from_pretrained) + value_head.pt (+ critic/ adapter)."""
        folder = Path(folder)
        self.lm.save_pretrained(folder, selected_adapters=["default"])
        if self.separate_critic:
            self.lm.save_pretrained(folder, selected_adapters=["critic"])  # peft writes it to folder/critic
        torch.save(self.value_head.state_dict(), folder / "value_head.pt")

    def load(self, folder: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        set_peft_model_state_dict(self.lm, load_file(str(folder / "adapter_model.safetensors")), adapter_name="default")
        if self.separate_critic:
            critic = load_file(str(folder / "critic" / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.lm, critic, adapter_name="critic")
        self.value_head.load_state_dict(torch.load(folder / "value_head.pt", weights_only=True))


def build_policy(base, lora, *, seed: int = 0, init_adapter: str | None = None,
                 critic: str = "shared") -> PolicyWithValue:
    """Wrap a base causal LM: fresh LoRA (reference = adapter disabled) or, from `init_adapter`, a
    trainable copy of that adapter plus a frozen one as the reference. critic="separate" adds a
    second trainable adapter "critic" on the same base for the value function. Fresh adapters are
    initialised from `seed` alone, whatever ran before in the process."""
    from hhh.models.load import attach_lora, load_adapter, lora_config, seeded_init

    if critic not in ("shared", "separate"):
        raise ValueError(f"critic must be 'shared' or 'separate', got {critic!r}")
    if init_adapter is None:
        lm = attach_lora(base, lora, seed=seed)
    else:
        lm = load_adapter(base, init_adapter, trainable=True, name="default")
        lm = load_adapter(lm, init_adapter, trainable=False, name="reference")
    if critic == "separate":
        with seeded_init(seed + 1):  # another stream than the policy's adapter
            lm.add_adapter("critic", lora_config(base, lora))
    lm.set_adapter("default")
    trainable = (".default.", ".critic.")
    for n, p in lm.named_parameters():
        p.requires_grad_("lora_" in n and any(t in n for t in trainable))
    return PolicyWithValue(lm, has_reference_adapter=init_adapter is not None, separate_critic=critic == "separate")
