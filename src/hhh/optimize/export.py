"""`hhh export --format gguf`: a Llama-architecture model (merged with its adapter) as one GGUF file for llama.cpp.

    tensors   HF names -> GGUF names (TENSORS below); Q and K rows permuted to llama.cpp's rotary layout
    types     f16:  every matrix F16;  q8_0 / q4_0: every matrix in blocks of 32 (the `gguf` package's quantizers);
              norms stay F32; with q4_0 the token embedding (also the output layer when tied) stays Q8_0, as
              llama.cpp's own Q4 files keep their embedding at a higher precision
    metadata  llama.* hyper-parameters, the BPE vocabulary and merges, special tokens and the chat template

The `gguf` package writes and quantizes; what is ours is the tensor map, the permutation and the metadata.

>>> from hhh.optimize.export import export_gguf
>>> export_gguf("runs/detox-20261129/run", "detox.q8_0.gguf", quant="q8_0")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

QUANTS = ("f16", "q8_0", "q4_0")
BLOCK = 32  # values per Q8_0 / Q4_0 block: a quantized row must be a multiple of it

# HF Llama parameter name (per layer after "model.layers.{i}.") -> GGUF tensor name (after "blk.{i}.")
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """The GGUF name of one HF Llama parameter (ValueError for a parameter llama.cpp's llama graph has no slot for)."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TENSORS:
        return f"blk.{int(parts[2])}.{LAYER_TENSORS[parts[3]]}"
    raise ValueError(f"parameter {hf_name!r} has no GGUF counterpart in the llama architecture")


def rotary_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q or K projection from HF's rotary layout (each head's first half of dimensions rotated with its
    second half) to llama.cpp's (dimension pairs 2j, 2j+1 rotated together): within each head, row h*d + s*d/2 + j
    moves to h*d + 2j + s. `heads` is the number of heads the matrix projects to (KV heads for K)."""
    rows = w.shape[0]
    d = rows // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_exportable(config) -> None:
    """One-line errors for models this writer would get wrong."""
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"GGUF export supports Llama-architecture models (model_type 'llama'), not "
                         f"{getattr(config, 'model_type', None)!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"GGUF export: models with {flag} are not supported")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported (only plain RoPE)")


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_theta": config.rope_theta, "rope_type": "default"}
    return dict(params)


def _token_list(tokenizer) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type (1 normal, 3 control, 4 user-defined, 5 unused)."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    size = max(len(by_id), max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(TokenType.CONTROL if text in special or _is_control(tokenizer, text) else TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _tokenizer_habits(tokenizer) -> tuple[bool, bool]:
    """(puts BOS before a text, puts a space before a text's first word), as llama.cpp must repeat them."""
    import json

    ids = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]

    def prefix(node) -> bool:
        if isinstance(node, dict):
            return node.get("add_prefix_space") is True or any(prefix(v) for v in node.values())
        return isinstance(node, list) and any(prefix(v) for v in node)

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    return bool(adds_bos), prefix(spec.get("pre_tokenizer"))


def _is_control(tokenizer, text: str) -> bool:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return any(tok.content == text and tok.special for tok in decoder.values())


def _tensor_type(name: str, array: np.ndarray, quant: str):
    """(GGML type, data to write) for one tensor."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if array.ndim == 1:
        return T.F32, array.astype(np.float32)
    kind = quant
    if quant == "q4_0" and name == "token_embd.weight":
        kind = "q8_0"
    if kind != "f16" and array.shape[-1] % BLOCK:
        kind = "f16"  # a row that does not split into blocks of 32 cannot be quantized
    qtype = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
    return qtype, quantize(array.astype(np.float32), qtype)


def write_gguf(model, tokenizer, path: str | Path, *, quant: str = "f16", name: str = "hhh model",
               tokenizer_pre: str = "default", progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `model` (a transformers Llama, adapter already merged) and `tokenizer` to one GGUF file at `path`.
    `tokenizer_pre` names llama.cpp's pre-tokenizer (the regex that splits text before BPE; 'smollm' for SmolLM2)."""
    import gguf
    from gguf import LlamaFileType

    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: expected one of {', '.join(QUANTS)}")
    config = model.config
    check_exportable(config)
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder for the GGUF file")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(heads))
        writer.add_head_count_kv(int(kv_heads))
        writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_dimension_count(int(head_dim))
        writer.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens, types = _token_list(tokenizer)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        adds_bos, prefix_space = _tokenizer_habits(tokenizer)
        writer.add_add_bos_token(adds_bos)
        writer.add_add_space_prefix(prefix_space)
        with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads merges, special ids, chat template
            tokenizer.save_pretrained(folder)
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
            special.add_special_token.pop("bos", None)  # written above, from what the tokenizer does
            special.add_to_gguf(writer, quiet=True)

        state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        packed = [k for k, v in state.items() if type(v) not in (torch.Tensor, torch.nn.Parameter)]
        if packed:  # a torchao folder: its int8 tensors would be exported as whatever .float() makes of them
            raise ValueError(f"GGUF export needs plain float weights; {packed[0]} is a {type(state[packed[0]]).__name__} "
                             "(a quantized variant): export the original and choose --quant")
        names = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
        for i, key in enumerate(names):
            w = state[key].detach().to(torch.float32).cpu()
            target = gguf_name(key)
            if key.endswith("self_attn.q_proj.weight"):
                w = rotary_permute(w, heads)
            elif key.endswith("self_attn.k_proj.weight"):
                w = rotary_permute(w, kv_heads)
            qtype, data = _tensor_type(target, w.numpy(), quant)
            writer.add_tensor(target, data, raw_dtype=qtype)  # a quantized row's byte shape -> its value shape
            if progress:
                progress(i + 1, len(names))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def gguf_origin(spec: str) -> Path | None:
    """The GGUF file a model spec goes back to: itself (bundled:, .gguf), or the base recorded in the
    hhh_provenance.json of a folder hhh wrote (merged, compressed), followed back."""
    import json

    from hhh.models.spec import resolve

    for _ in range(8):
        source = resolve(spec)
        if source.kind in ("bundled", "gguf"):
            return Path(source.location)
        record = Path(source.location) / "hhh_provenance.json"
        if source.kind != "local" or not record.is_file():
            return None
        spec = json.loads(record.read_text(encoding="utf-8")).get("base") or ""
        if not spec:
            return None
    return None


def pre_tokenizer_of(spec: str) -> str | None:
    """llama.cpp's pre-tokenizer name as recorded in the GGUF the model came from (None: not from a GGUF)."""
    origin = gguf_origin(spec)
    if origin is None:
        return None
    from hhh.models.spec import gguf_scalar_fields

    pre = gguf_scalar_fields(origin).get("tokenizer.ggml.pre")
    return str(pre) if pre is not None else None


def export_gguf(path: str, out: str | Path, *, quant: str = "f16", model: str | None = None,
                tokenizer_pre: str | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """A run (its adapter merged in), an adapter folder or a model spec, written as one GGUF file."""
    from hhh.optimize.merge import find_source, load_merged

    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {str(out)!r}: a GGUF file name ends in .gguf")
    if out.exists():
        raise FileExistsError(f"{out} exists (choose another --out)")
    source = find_source(path, model=model)
    pre = tokenizer_pre or pre_tokenizer_of(source.model) or "default"
    merged, tokenizer = load_merged(source)
    name = (f"{Path(source.model).name} + {source.adapter}" if source.adapter else source.model)
    return write_gguf(merged, tokenizer, out, quant=quant, name=name, tokenizer_pre=pre, progress=progress)
