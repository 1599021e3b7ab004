"""Model specs, bundled model conversion, loading with LoRA, tiny test models."""

from hhh.models.load import (
    LoraSettings,
    attach_lora,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    prepare_tokenizer,
    tiny_causal_lm,
)
from hhh.models.spec import DEFAULT_MODEL, ModelSource, convert_gguf, hhh_home, local_path, resolve

__all__ = [
    "DEFAULT_MODEL",
    "LoraSettings",
    "ModelSource",
    "attach_lora",
    "convert_gguf",
    "hhh_home",
    "load_adapter",
    "load_causal_lm",
    "load_tokenizer",
    "local_path",
    "pick_device",
    "prepare_tokenizer",
    "resolve",
    "tiny_causal_lm",
]
