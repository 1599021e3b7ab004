"""Model specs, bundled model conversion, loading with LoRA, tiny test models.

Names are imported on first use, so that `hhh.models.spec` (what configs read) loads without torch.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_MODEL": "hhh.models.spec",
    "ModelSource": "hhh.models.spec",
    "convert_gguf": "hhh.models.spec",
    "hhh_home": "hhh.models.spec",
    "local_path": "hhh.models.spec",
    "resolve": "hhh.models.spec",
    "LoraSettings": "hhh.models.load",
    "attach_lora": "hhh.models.load",
    "load_adapter": "hhh.models.load",
    "load_causal_lm": "hhh.models.load",
    "load_tokenizer": "hhh.models.load",
    "pick_device": "hhh.models.load",
    "prepare_tokenizer": "hhh.models.load",
    "tiny_causal_lm": "hhh.models.load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hhh.models' has no attribute {name!r}")
