from pathlib import Path

import numpy as np
import pytest
import torch

from hhh.models import LoraSettings, attach_lora, resolve, tiny_causal_lm
from hhh.models import spec as spec_mod


def test_resolve_bundled_points_at_the_wheel_file():
    src = resolve("bundled:smollm2-135m-instruct")
    assert src.kind == "bundled" and src.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bundled:nope", "unknown bundled model 'nope'"),
        ("missing.gguf", "GGUF file not found"),
        ("./no/such/dir", "not a folder with config.json"),
        ("a/b/c", "expected bundled:NAME"),
        ("", "empty"),
    ],
)
def test_resolve_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve(spec)


def test_resolve_local_folder_and_hub_id(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)).kind == "local"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_tokenizer_pads_left_with_a_token_distinct_from_eos(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"


def test_adapter_disabled_forward_equals_base_model(tiny):
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        base = tiny(input_ids=ids).logits.clone()
    model = attach_lora(tiny, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # make the adapter do something: LoRA B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(disabled, base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_tiny_model_uses_the_tokenizer_vocabulary(tokenizer):
    m = tiny_causal_lm(tokenizer)
    assert m.config.vocab_size == len(tokenizer) and m.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.slow
def test_gguf_conversion_is_cached_and_matches_the_gguf_weights(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HHH_HOME", str(tmp_path))
    gguf = resolve("bundled:smollm2-135m-instruct").location
    rng = torch.random.get_rng_state()
    folder = spec_mod.convert_gguf(gguf, progress=False)
    # a conversion inside a run leaves the run's random numbers where they were
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert folder.parent == tmp_path / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not list((tmp_path / "models").glob("*.tmp-*")), "no temporary folder left behind"

    converted = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)

    # second call: cache hit, no conversion (conversion would call from_pretrained on the GGUF)
    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert spec_mod.convert_gguf(gguf, progress=False) == folder


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_a_cpu_without_its_matmul_instructions_says_it_will_be_slow(tiny_dir, dtype, capsys):
    """bf16/fp16 weights on a CPU whose oneDNN has no native kernels for them (an AVX2-only CPU: no avx512_bf16,
    avx512_fp16 or AMX) run their multiplies several times slower than fp32; loading such a model says so in one
    line on stderr. Where the kernels exist (this test then checks the other side), nothing is said."""
    import torch

    from hhh.models.load import load_causal_lm

    native = {"bfloat16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
              "float16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]()
    model = load_causal_lm(tiny_dir, device="cpu", dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    said = [line for line in capsys.readouterr().err.splitlines() if "slower than float32" in line]
    if native:
        assert said == []
    else:
        assert len(said) == 1 and dtype in said[0] and "bench/matmul_dtypes.py" in said[0]
    load_causal_lm(tiny_dir, device="cpu", dtype="float32")
    assert "slower than float32" not in capsys.readouterr().err


def _small_gguf(path: Path, pre: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_scalar_fields_are_read_once_per_file_version(tmp_path, monkeypatch):
    """Reading a GGUF's metadata parses every array in it (the bundled file's 49k-token vocabulary: ~10 s on a slow
    CPU, paid by every `hhh export`). The scalar fields are kept beside the conversion cache and read again only when
    the file changes."""
    import gguf

    monkeypatch.setenv("HHH_HOME", str(tmp_path / "home"))
    reads = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: reads.append(a) or real(*a, **k))
    path = _small_gguf(tmp_path / "m.gguf", "smollm")
    fields = spec_mod.gguf_scalar_fields(path)
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["general.architecture"] == "llama"
    assert "tokenizer.ggml.tokens" not in fields  # arrays are not kept
    assert spec_mod.gguf_scalar_fields(path) == fields and len(reads) == 1
    spec_mod._scalar_fields.cache_clear()  # a new process: the file beside the cache answers
    assert spec_mod.gguf_scalar_fields(path) == fields and len(reads) == 1
    path.unlink()
    _small_gguf(path, "gpt-2-longer")  # another file under the same name: read again
    assert spec_mod.gguf_scalar_fields(path)["tokenizer.ggml.pre"] == "gpt-2-longer" and len(reads) == 2
