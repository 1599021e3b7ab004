"""A LoRA policy whose reference is the same base weights, with its speed-ups inside.

One copy of the base weights serves every role:
  policy     base + the trainable adapter "default"
  reference  base with the adapter disabled, or base + a frozen "reference" adapter when training
             starts from an existing adapter
  others     more trainable adapters on the same base (PPO's separate critic, hhh.models.critic)

    policy = build_policy(base, lora, seed=0)
    with policy.frozen_trunk(batch, micro_batch_size=8):   # the unadapted bottom layers run once for the batch
        ref = policy.reference_logprobs(batch, temperature=0.7)
        new = policy(batch[rows], temperature=0.7)          # runs only the adapted top layers
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from torch import Tensor, nn

from hhh.losses import entropy_from_logprobs, output_logprobs
from hhh.rollout import Batch, Tokens, last_positions

__all__ = ["Forward", "Policy", "Tokens", "build_policy", "frozen_trunk_depth"]


@dataclass(frozen=True)
class Forward:
    logprobs: Tensor  # (B, R) log pi(a_t | s_t) at the temperature
    entropy: Tensor | None = None  # (B, R) entropy of pi(. | s_t) at the temperature
    hidden: Tensor | None = None   # (B, R, H) last hidden state before each response token (the state s_t)


# Architectures whose decoder takes `inputs_embeds` unscaled into its first layer, so that the frozen
# trunk's output can be fed to the adapted top layers directly.
_SPLITTABLE = {"llama", "mistral", "qwen2", "qwen3"}


def frozen_trunk_depth(lm) -> int:
    """How many bottom layers carry no adapter (0 when every layer does or the model is not splittable)."""
    if lm.config.model_type not in _SPLITTABLE:
        return 0
    for i, layer in enumerate(_decoder_layers(lm)):
        if any("lora_" in n for n, _ in layer.named_parameters()):
            return i
    return 0


def plain_output_layer(lm) -> nn.Linear | None:
    """The output layer when the logits are exactly `lm_head(last hidden state)` (a bias-free nn.Linear, no soft
    cap or logit scale in these architectures), so that `output_logprobs` may take the log-probs from the hidden
    states; None otherwise (a LoRA-wrapped head, another architecture)."""
    base = lm.get_base_model()
    head = base.get_output_embeddings()
    # _SPLITTABLE's architectures are also the ones checked to compute logits as lm_head(final norm's output)
    if base.config.model_type not in _SPLITTABLE or type(head) is not nn.Linear or head.bias is not None:
        return None
    return head


def _decoder_layers(lm) -> nn.ModuleList:
    return lm.get_base_model().model.layers


class _TrunkDone(Exception):
    """Raised by the hook on the first adapted layer: the trunk is all that pass was for."""


class Policy(nn.Module):
    def __init__(self, lm, *, has_reference_adapter: bool = False) -> None:
        super().__init__()
        self.lm = lm  # a peft.PeftModel with a trainable adapter named "default"
        self.has_reference_adapter = has_reference_adapter
        # Speed: layers below the first adapted one compute the same thing for policy and reference and need no
        # gradient. Inside `frozen_trunk` their output (the "trunk") is computed once per batch; the reference pass
        # and every update pass then run only the adapted top layers (with LoRA on the top 10 of 30 layers, a third
        # of the model).
        self.split = frozen_trunk_depth(lm)
        # Memory: with a plain frozen output layer the (B, R, V) logits of a pass exist a chunk at a time
        # (losses.output_logprobs) instead of as logits, scaled logits, log-softmax and entropy terms at once.
        self.head = plain_output_layer(lm)
        self._trunks: dict[int, tuple[Batch, Tensor]] = {}
        self._copies: dict[torch.dtype, nn.Module] = {}  # sampler(dtype)'s merged copies, one per dtype
        # The parameters that train, fixed here (and by add_adapter). PEFT's set_adapter (also run when
        # disable_adapter() exits) rewrites requires_grad of every adapter to "active or not", which would freeze
        # another trainable adapter after the first reference pass; every adapter switch puts this set back.
        self._trainable = {id(p) for p in self.parameters() if p.requires_grad}
        self.eval()

    def train(self, mode: bool = True):
        # Dropout stays off in every pass, training ones included (TRL's disable_dropout does the same): the
        # reference and old-policy log-probs are dropout-free, so a dropped-out training pass would put noise into
        # every ratio and margin. A fresh LoRA layer is created in train mode, so this is set here, not by the loader.
        return super().train(False)

    def add_adapter(self, name: str, lora, *, seed: int) -> None:
        """Another trainable adapter on the same base (initialised from `seed`); the policy stays active."""
        from hhh.models.load import lora_config, seeded_init

        with seeded_init(seed):
            self.lm.add_adapter(name, lora_config(self.lm.get_base_model(), lora))
        self.lm.set_adapter("default")
        for n, p in self.lm.named_parameters():
            if "lora_" in n and f".{name}." in n:
                self._trainable.add(id(p))
        self._restore_trainable()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if id(p) in self._trainable]

    def _restore_trainable(self) -> None:
        for p in self.lm.parameters():
            p.requires_grad_(id(p) in self._trainable)

    # --- the frozen trunk -------------------------------------------------------------------------------------
    @property
    def trunk_layer(self) -> nn.Module | None:
        """The first adapted decoder layer: the frozen trunk is what enters it (None: no trunk to cache)."""
        return _decoder_layers(self.lm)[self.split] if self.split else None

    @contextmanager
    def frozen_trunk(self, *batches: Batch, micro_batch_size: int | None = None, known: Tensor | None = None):
        """Within: every pass over `batches` or rows of them runs only the adapted top layers, on the frozen
        bottom layers' output computed here once (in micro-batches of `micro_batch_size` rows; None: whole).
        `known`: that output for the one batch given, already computed (the sampler's, Rollout.trunk, in the
        batch's layout): nothing runs here."""
        if not self.split:
            yield
            return
        if known is not None and (len(batches) != 1 or known.shape[:2] != batches[0].ids().shape):
            raise ValueError(f"a known trunk {tuple(known.shape)} needs one batch of the same (rows, positions)")
        for batch in batches:
            trunk = known if known is not None else self._batch_trunk(batch, micro_batch_size)
            self._trunks[id(batch)] = (batch, trunk)  # (B, Q+R, H); the batch is kept so its id stays unique
        try:
            yield
        finally:
            for batch in batches:
                self._trunks.pop(id(batch), None)

    def _batch_trunk(self, batch: Batch, micro_batch_size: int | None) -> Tensor:
        """(B, Q+R, H) the trunk of `batch`, in micro-batches of `micro_batch_size` rows (None: whole)."""
        size = micro_batch_size or len(batch)
        return torch.cat([self._trunk(batch[i:i + size]) for i in range(0, len(batch), size)])

    @torch.no_grad()
    def _trunk(self, tokens: Batch) -> Tensor:
        """(B, Q+R, H) hidden states entering the first adapted layer: the pass stops there."""
        captured: list[Tensor] = []

        def grab(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _TrunkDone

        hook = _decoder_layers(self.lm)[self.split].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.lm(input_ids=tokens.ids(), **self._kwargs(tokens, hidden=False))
        except _TrunkDone:
            pass
        finally:
            hook.remove()
        return captured[0]

    def _cached_trunk(self, tokens: Batch) -> Tensor | None:
        if tokens.source is None:
            hit = self._trunks.get(id(tokens))
            return None if hit is None else hit[1]
        hit = self._trunks.get(id(tokens.source))
        if hit is None or tokens.rows is None:
            return None
        return hit[1][tokens.rows.to(hit[1].device)]

    @contextmanager
    def _top_layers_only(self):
        # The decoder runs the layers it holds: for the length of one call it holds only the adapted ones.
        decoder = self.lm.get_base_model().model
        layers = decoder.layers
        decoder.layers = layers[self.split :]
        try:
            yield
        finally:
            decoder.layers = layers

    # --- passes -----------------------------------------------------------------------------------------------
    @property
    def takes_4d_masks(self) -> bool:
        """Whether the model's attention reads a 4D mask (PairTokens) as given: sdpa and eager do; flash-attention
        kernels take padding only. (The mask is used as given, so a sliding window would not apply: the bundled
        model has none.)"""
        return self.lm.config._attn_implementation in ("sdpa", "eager")

    def _kwargs(self, tokens: Batch, *, hidden: bool, last: bool = False) -> dict:
        """The model's arguments for `tokens`; logits at the positions that predict its response tokens (last:
        at the last position only, when only the hidden states are wanted)."""
        mask = tokens.attention()
        if mask.dim() == 4 and self.lm.config._attn_implementation != "sdpa":
            # eager attention adds the mask to its scores: 0 where allowed, the dtype's lowest value elsewhere
            dtype = next(self.lm.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        width = mask.shape[-1]
        keep = last_positions(width, 1, mask.device) if last else tokens.scored()
        return {"attention_mask": mask, "position_ids": tokens.position_ids(), "output_hidden_states": hidden,
                "use_cache": False, "logits_to_keep": keep}

    def _run(self, tokens: Batch, kw: dict, *, decoder: bool = False):
        """The model's output for `tokens` (decoder: the decoder's, last hidden state after the final norm and no
        logits)."""
        model = self.lm.get_base_model().model if decoder else self.lm
        trunk = self._cached_trunk(tokens)
        if trunk is None:
            return model(input_ids=tokens.ids(), **kw)
        with self._top_layers_only():
            return model(inputs_embeds=trunk, **kw)

    def forward(self, tokens: Batch, *, temperature: float, entropy: Literal["measure", "train"] | None = None,
                hidden: bool = False) -> Forward:
        """Log-probs of the response tokens at `temperature`; optionally the entropy ("measure": no graph through
        the (B, R, V) probabilities; "train": with one) and the last hidden state before each response token."""
        kw = self._kwargs(tokens, hidden=hidden)
        if self.head is not None and not self.head.weight.requires_grad:
            keep = kw.pop("logits_to_keep")
            out = self._run(tokens, kw, decoder=True)
            logp, ent = output_logprobs(out.last_hidden_state[:, keep], self.head.weight, tokens.response_ids,
                                        temperature, entropy=entropy is not None)
            if ent is not None and not (entropy == "train" and torch.is_grad_enabled()):
                ent = ent.detach()
            states = out.hidden_states[-1][:, keep].float() if hidden else None  # (B, R, H)
            return Forward(logp, ent, states)
        out = self._run(tokens, kw)
        # Only the scored positions' logits exist (logits_to_keep): never (B, Q+R, V).
        logits = out.logits.float()  # (B, R, V): the t-th predicts response token t
        if temperature != 1.0:  # x / 1 == x exactly, but a copy of (B, R, V) and its backward cost ~3% of a DPO step
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, tokens.response_ids[..., None]).squeeze(-1)  # (B, R)
        ent = None
        if entropy is not None:
            grad = entropy == "train" and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                ent = entropy_from_logprobs(logp_all if grad else logp_all.detach())
        states = out.hidden_states[-1][:, tokens.scored()].float() if hidden else None  # (B, R, H)
        return Forward(logp, ent, states)

    def hidden_states(self, tokens: Batch, adapter: str) -> Tensor:
        """(B, R, H) last hidden state before each response token, under another trainable adapter."""
        with self._adapter(adapter):
            out = self._run(tokens, self._kwargs(tokens, hidden=True, last=True))
        return out.hidden_states[-1][:, tokens.scored()].float()

    @contextmanager
    def _adapter(self, name: str):
        self.lm.set_adapter(name)
        try:
            yield
        finally:
            self.lm.set_adapter("default")
            self._restore_trainable()

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
    def reference_logprobs(self, tokens: Batch, *, temperature: float) -> Tensor:
        """(B, R) the reference's log-probs of the response tokens."""
        with self.reference():
            return self(tokens, temperature=temperature).logprobs

    @contextmanager
    def merged(self):
        """Within: the active adapter folded into copies of the adapted weights and the adapter layers bypassed,
        so a forward (sampling) runs plain linear layers and pays for no adapter matmuls. The same function up to
        float rounding; the base weights are put back untouched on exit (merging in place and subtracting again
        would move the frozen base, hence the reference, by rounding error every step). No gradients flow within.
        Adapters other than plain LoRA (DoRA and other variants): nothing is merged."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        name = self.lm.active_adapter
        adapted = [m for m in self.lm.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        if not adapted or any(not isinstance(m, LoraLinear) or name in m.lora_variant or m.merged for m in adapted):
            yield
            return
        swapped: list[tuple[nn.Module, nn.Parameter]] = []
        try:
            with torch.no_grad():
                for m in adapted:
                    base = m.get_base_layer()
                    swapped.append((base, base.weight))
                    # in the base's dtype: PEFT keeps a bf16 base's adapter in fp32, and the sum would be fp32
                    merged = (base.weight + m.get_delta_weight(name)).to(base.weight.dtype)
                    base.weight = nn.Parameter(merged, requires_grad=False)
            with self.lm.disable_adapter():
                yield
        finally:
            for base, weight in swapped:
                base.weight = weight
            self._restore_trainable()

    @contextmanager
    def sampler(self, dtype: torch.dtype | None = None):
        """Within: the model to sample from. `dtype` None or the weights' own: the policy itself with its adapter
        merged (`merged()`). Another dtype (bf16 on a CPU with native bf16 matmuls, where decoding runs ~2x
        faster): a plain copy of the whole model in that dtype, made once and kept (one more copy of the weights at
        2 bytes a number), whose adapted layers are rewritten at every entry with base + the active adapter's
        delta, computed in the weights' dtype and then cast (what PEFT's merge_and_unload followed by casting every
        parameter gives; buffers such as rotary frequencies keep their precision). Its log-probs differ from the training forward's by the rounding of `dtype`; Rollout.sampler_dtype
        says so to whoever uses them. Adapters merged() cannot fold (DoRA and other variants): the policy itself."""
        weights = self.lm.get_base_model().dtype
        copy = None if dtype is None or dtype == weights else self._refreshed_copy(dtype)
        if copy is None:
            with self.merged():
                yield self.lm
            return
        yield copy

    def _refreshed_copy(self, dtype: torch.dtype) -> nn.Module | None:
        import copy

        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        name = self.lm.active_adapter
        layers = {n: m for n, m in self.lm.get_base_model().named_modules()
                  if isinstance(m, LoraLayer) and name in m.lora_A}
        adapted = {n: m for n, m in layers.items()
                   if isinstance(m, LoraLinear) and name not in m.lora_variant and not m.merged}
        if not adapted or len(adapted) < len(layers):  # what merged() cannot fold, this cannot either
            return None
        model = self._copies.get(dtype)
        if model is None:
            # The base model with every adapter layer taken out (PEFT's unload, on a copy). The copy's parameters
            # are cast as they are copied (deepcopy takes them from its memo), so no second full-precision copy
            # exists even for a moment; tied weights stay tied; buffers (rotary frequencies) keep their precision.
            # Kept in a dict, not as an attribute: a submodule would join the policy's parameters.
            source = self.lm.base_model
            memo: dict[int, object] = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
                                       for p in source.parameters()}
            model = copy.deepcopy(source, memo).unload().eval()
            self._copies[dtype] = model
        with torch.no_grad():
            for n, m in adapted.items():
                target = model.get_submodule(n)
                assert isinstance(target, nn.Linear)  # unload put the plain layer back under the same name
                base = cast(Tensor, m.get_base_layer().weight)
                target.weight.copy_(base + m.get_delta_weight(name))
        return model

    # --- saving -----------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """The PEFT adapter (loadable by peft.PeftModel.from_pretrained)."""
        self.lm.save_pretrained(Path(folder), selected_adapters=["default"])

    def load(self, folder: str | Path) -> None:
        load_adapter_weights(self.lm, Path(folder), "default")


def load_adapter_weights(lm, folder: Path, name: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(lm, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)


def build_policy(base, lora, *, seed: int = 0, init_adapter: str | None = None) -> Policy:
    """Wrap a base causal LM: fresh LoRA (reference = adapter disabled) or, from `init_adapter`, a
    trainable copy of that adapter plus a frozen one as the reference. Fresh adapters are initialised from
    `seed` alone, whatever ran before in the process."""
    from hhh.models.load import attach_lora, load_adapter

    if init_adapter is None:
        lm = attach_lora(base, lora, seed=seed)
    else:
        lm = load_adapter(base, init_adapter, trainable=True, name="default")
        lm = load_adapter(lm, init_adapter, trainable=False, name="reference")
    lm.set_adapter("default")
    for n, p in lm.named_parameters():
        p.requires_grad_("lora_" in n and ".default." in n)
    return Policy(lm, has_reference_adapter=init_adapter is not None)
