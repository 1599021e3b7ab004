"""Loading causal LMs and tokenizers, LoRA adapters, and tiny random models for tests."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hhh.models.spec import load_error, local_path, quiet_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prepare_tokenizer(tokenizer):
    """Left padding, and a pad token distinct from EOS where the vocabulary has a spare one.

    SmolLM2 ships with pad == eos == <|im_end|>; padding with EOS teaches a model that EOS is noise.
    Every mask in hhh is built from positions, not from pad ids, so this is belt and braces.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in ("<|endoftext|>", "<pad>", tokenizer.unk_token):
            tid = tokenizer.convert_tokens_to_ids(candidate) if candidate else None
            if isinstance(tid, int) and tid >= 0 and tid != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = local_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise load_error(spec, e) from e
    return prepare_tokenizer(tokenizer)


def load_causal_lm(spec: str, *, device: str = "auto", dtype: str = "float32"):
    """Load a causal LM for training/eval: eval mode (dropout off), requested dtype and device."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path = local_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as e:
        raise load_error(spec, e) from e
    model.to(pick_device(device))  # type: ignore[arg-type]  # transformers' stubs type .to as a decorator
    model.eval()  # dropout off: PPO ratios must be 1 at the first minibatch
    if model.device.type == "cpu" and dtype != "float32" and not cpu_has_native(dtype):
        print(f"hhh: {spec}: dtype {dtype} on this CPU runs slower than float32 (its oneDNN has no native {dtype} "
              f"matmuls: no avx512_bf16/avx512_fp16/AMX); bench/matmul_dtypes.py measures by how much",
              file=sys.stderr, flush=True)
    return model


def cpu_has_native(dtype: str) -> bool:
    """Whether this CPU multiplies `dtype` ("bfloat16"/"float16") with native instructions (oneDNN's own check).
    Without them torch emulates the format in fp32 and converts every operand: 2-7x slower than fp32 on an AVX2
    EPYC (docs/profile-rollout.md)."""
    check = {"bfloat16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
             "float16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
    return bool(check())


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    # Adapt only the top N transformer blocks (None: all). Blocks below the first adapted one need no
    # backward pass and keep no activations, which cuts both the time and the memory of an update.
    top_layers: int | None = None


def lora_config(model, settings: LoraSettings):
    from peft import LoraConfig

    n_layers = model.config.num_hidden_layers
    layers = None
    if settings.top_layers is not None:
        if settings.top_layers <= 0:
            raise ValueError(f"lora top_layers must be positive, got {settings.top_layers}")
        if settings.top_layers < n_layers:  # asking for as many layers as the model has (or more) means all
            layers = list(range(n_layers - settings.top_layers, n_layers))
    return LoraConfig(
        layers_to_transform=layers,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


@contextmanager
def seeded_init(seed: int):
    """Random initialisation drawn from `seed` alone: PEFT and torch initialise from the global RNG, which anything
    earlier in the process (a GGUF conversion, an evaluation) may have advanced. The global state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def attach_lora(model, settings: LoraSettings, *, seed: int = 0):
    """Wrap `model` in a fresh trainable LoRA adapter (A drawn from `seed`, B = 0); the base weights stay frozen
    and shared."""
    from peft import get_peft_model

    with seeded_init(seed):
        return get_peft_model(model, lora_config(model, settings))


def load_adapter(model, adapter: str | Path, *, trainable: bool = False, name: str = "default"):
    """Attach a saved PEFT adapter to `model` (a base model, or a PeftModel to add `name` to)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter), adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter), adapter_name=name, is_trainable=trainable)


def tiny_causal_lm(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A randomly initialised Llama with the given tokenizer's vocabulary, for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@contextmanager
def adapter_on(model, adapter: str | Path):
    """`model` with a saved adapter on it for the length of the block, then the bare model again (PEFT puts its
    layers into the model in place; this takes them out)."""
    peft_model = load_adapter(model, adapter)
    try:
        yield peft_model
    finally:
        remove_adapters(peft_model)


def remove_adapters(peft_model):
    """Take every adapter's layers out of the base model they were put into; returns that base model."""
    return peft_model.unload()
