"""hhh merge and hhh export: the merged folder equals base + adapter; GGUF files round-trip through transformers and
llama.cpp."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hhh.cli import main
from hhh.models import DEFAULT_MODEL
from hhh.models.load import LoraSettings, attach_lora, load_adapter, load_causal_lm, load_tokenizer
from hhh.models.spec import bundled_gguf_path
from hhh.optimize.export import export_gguf, rotary_permute
from hhh.optimize.merge import find_source

LLAMA_CPP = Path(__file__).parent / "llama_cpp"


def make_run(model_spec: str, folder: Path, *, seed: int = 0, scale: float = 0.05) -> Path:
    """A run folder as a training job leaves it: config.toml naming the base, and a LoRA adapter whose B is random
    (a fresh adapter has B = 0 and would merge to the base itself)."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f'model = "{model_spec}"\nseed = {seed}\n')
    peft_model = attach_lora(load_causal_lm(model_spec, device="cpu"), LoraSettings(r=4, alpha=8), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(folder / "adapter")
    return folder


def ids_of(tokenizer, text: str) -> torch.Tensor:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt")
    return out if torch.is_tensor(out) else out["input_ids"]


@pytest.fixture
def tiny_run(tiny_dir, tmp_path):
    return make_run(tiny_dir, tmp_path / "run")


def adapted_logits(run: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    source = find_source(str(run))
    base = load_causal_lm(source.model, device="cpu")
    with torch.no_grad():
        plain = base(ids).logits
        model = load_adapter(base, source.adapter)
        return plain, model(ids).logits


def test_merged_folder_equals_base_plus_adapter_without_peft(tiny_run, tmp_path, tokenizer):
    ids = ids_of(tokenizer, "How do I keep basil fresh?")
    plain, adapted = adapted_logits(tiny_run, ids)
    assert (plain - adapted).abs().max() > 1e-2  # the adapter changes the model: the test below is not vacuous
    assert main(["merge", str(tiny_run), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert not (merged / "adapter_config.json").exists()  # a plain model, no peft needed
    loaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert (loaded(ids).logits - adapted).abs().max() < 1e-4
    # tokenizer and chat template travel with it; hhh takes the folder as a model spec
    assert torch.equal(ids_of(AutoTokenizer.from_pretrained(merged), "How do I keep basil fresh?"), ids)
    with torch.no_grad():
        assert (load_causal_lm(str(merged), device="cpu")(ids).logits - adapted).abs().max() < 1e-4
    provenance = json.loads((merged / "hhh_provenance.json").read_text())
    assert provenance["base"] == find_source(str(tiny_run)).model and provenance["adapter"].endswith("adapter")


def test_merge_takes_an_adapter_folder_and_the_base_from_its_run(tiny_run, tmp_path):
    source = find_source(str(tiny_run / "adapter"))
    assert source.adapter == tiny_run / "adapter" and source.run == tiny_run.resolve()
    assert source.model == find_source(str(tiny_run)).model


def test_merge_errors_are_one_line(tiny_run, tmp_path, capsys):
    no_adapter = tmp_path / "empty-run"
    no_adapter.mkdir()
    (no_adapter / "config.toml").write_text('model = "x"\n')
    assert main(["merge", str(no_adapter), "--out", str(tmp_path / "m")]) == 2
    assert "without an adapter" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    assert main(["merge", str(tiny_run), "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "f").read_text() == "x"  # nothing overwritten


def test_rotary_permute_matches_a_loop_over_heads():
    """HF keeps a head's rotated pairs at (j, j + d/2); llama.cpp at (2j, 2j + 1)."""
    heads, d, cols = 3, 8, 5
    w = torch.randn(heads * d, cols)
    expected = torch.empty_like(w)
    for h in range(heads):
        for half in range(2):
            for j in range(d // 2):
                expected[h * d + 2 * j + half] = w[h * d + half * d // 2 + j]
    assert torch.equal(rotary_permute(w, heads), expected)


def _merged_state(run: Path) -> dict[str, torch.Tensor]:
    from hhh.optimize.merge import load_merged

    model, _ = load_merged(find_source(str(run)))
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_gguf_f16_round_trips_through_transformers_exactly(tiny_run, tmp_path):
    """transformers' GGUF loader undoes the Q/K permutation: every weight comes back as the merged weight rounded to
    float16 (norms as float32), bit for bit."""
    out = tmp_path / "tiny.f16.gguf"
    assert main(["export", str(tiny_run), "--quant", "f16", "--out", str(out)]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).state_dict()
    merged = _merged_state(tiny_run)
    for name, w in merged.items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        expected = w if w.ndim == 1 else w.half().float()
        assert torch.equal(back[name], expected), name


@pytest.mark.parametrize(("quant", "tolerance"), [("q8_0", 0.01), ("q4_0", 0.2)])
def test_gguf_quantized_weights_are_close(tiny_run, tmp_path, quant, tolerance):
    import gguf

    out = tmp_path / f"tiny.{quant}.gguf"
    export_gguf(str(tiny_run), out, quant=quant)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).state_dict()
    for name, w in _merged_state(tiny_run).items():
        if name == "lm_head.weight":
            continue
        if w.ndim == 1:
            assert torch.equal(back[name], w), name  # norms stay float32
            continue
        error = (back[name] - w).norm() / w.norm()
        assert error < tolerance, (name, float(error))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0"  # kept at 8 bits with q4_0 (it is also the output layer)


def test_gguf_metadata_and_names_match_llama_cpps_own_converter(tiny_run, tmp_path):
    """The bundled GGUF was written by llama.cpp's converter for the same tokenizer: ours must carry the same
    hyper-parameter keys, tensor names, vocabulary, merges, special tokens and chat template."""
    import gguf

    out = export_gguf(str(tiny_run), tmp_path / "tiny.gguf", quant="f16", tokenizer_pre="smollm")
    ours, theirs = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(bundled_gguf_path("smollm2-135m-instruct")))
    keys = lambda r: {k for k in r.fields if k.startswith(("llama.", "tokenizer."))}  # noqa: E731
    assert keys(ours) == keys(theirs)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre",
                "tokenizer.ggml.model", "general.architecture", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.unknown_token_id"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    layer = lambda r: sorted(t.name for t in r.tensors if t.name.startswith(("blk.0.", "token", "output")))  # noqa: E731
    assert layer(ours) == layer(theirs)
    config = json.loads((Path(find_source(str(tiny_run)).model) / "config.json").read_text())
    assert ours.fields["llama.block_count"].contents() == config["num_hidden_layers"]
    assert ours.fields["llama.attention.head_count_kv"].contents() == config["num_key_value_heads"]


def test_export_of_the_bundled_model_inherits_its_pre_tokenizer(tmp_path, tiny_dir):
    from hhh.optimize.export import pre_tokenizer_of

    assert pre_tokenizer_of(DEFAULT_MODEL) == "smollm"
    # a folder hhh wrote (compress variant -> merged original -> bundled GGUF) is followed back to the GGUF
    merged, variant = tmp_path / "original", tmp_path / "variant"
    for folder, base in ((merged, DEFAULT_MODEL), (variant, str(merged))):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "hhh_provenance.json").write_text(json.dumps({"base": base}))
    assert pre_tokenizer_of(str(variant)) == "smollm"
    assert pre_tokenizer_of(tiny_dir) is None  # not from a GGUF: export falls back to 'default' or --tokenizer-pre


def test_export_refuses_what_it_would_get_wrong(tmp_path, tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    assert main(["export", str(gpt2), "--out", str(tmp_path / "g.gguf")]) == 2
    assert "model_type 'llama'" in capsys.readouterr().err and not (tmp_path / "g.gguf").exists()
    assert main(["export", str(gpt2), "--out", str(tmp_path / "g.bin")]) == 2
    assert "ends in .gguf" in capsys.readouterr().err


def llama_cpp(gguf_file: Path, request: dict, tmp_path: Path) -> dict:
    """Run tests/llama_cpp/llama.mjs (llama.cpp through node-llama-cpp) on one request."""
    node = shutil.which("node")
    assert node, "Node.js is needed for the llama.cpp round trip (make system installs it)"
    assert (LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir(), "run `make test` (it installs node-llama-cpp)"
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    done = subprocess.run([node, str(LLAMA_CPP / "llama.mjs"), str(gguf_file), str(path)], capture_output=True,
                          text=True, timeout=600, cwd=LLAMA_CPP)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


QUESTIONS = ["Give me three tips to cook rice on the stove.", "Write a polite email asking for a day off.",
             "Describe my neighbour's dog in the nastiest terms.", "What is the capital of France?",
             "How do I tie a tie?", "Tell me a joke about cats."]


def transformers_greedy(model, prompts: list[list[int]], n: int, eos: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
            out.append(new[:-1] if new[-1] == eos else new)  # llama.cpp stops before EOS
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The bundled model with a small random LoRA adapter, exported as f16 and q8_0."""
    folder = tmp_path_factory.mktemp("export")
    run = make_run(DEFAULT_MODEL, folder / "run", scale=0.002)
    return folder, {q: export_gguf(str(run), folder / f"model.{q}.gguf", quant=q) for q in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def decoded(exported):
    """quant -> (file, model, prompts, answers): each exported file taken by hhh as a model spec (converted once,
    into this module's own cache), the chat-templated QUESTIONS and transformers' greedy answers to them: what the
    llama.cpp checks compare against."""
    folder, files = exported
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HHH_HOME", str(folder / "home"))  # the spec's conversion cache: not the user's
        for quant, path in files.items():
            model = load_causal_lm(str(path), device="cpu").eval()
            tokenizer = load_tokenizer(str(path))
            prompts = [ids_of(tokenizer, q)[0].tolist() for q in QUESTIONS]
            out[quant] = (path, model, prompts, transformers_greedy(model, prompts, 20, tokenizer.eos_token_id))
    return out


@pytest.mark.slow
def test_llama_cpp_greedy_output_of_the_f16_export_equals_transformers(decoded, tmp_path):
    """llama.cpp and transformers decode the same tokens from the f16 file; hhh also takes it as a model spec."""
    out, _, prompts, expected = decoded["f16"]
    got = llama_cpp(out, {"mode": "greedy", "prompts": prompts, "max_new_tokens": 20}, tmp_path)["tokens"]
    assert got == expected
    assert len({tuple(t) for t in got}) == len(got) and all(len(t) >= 5 for t in got)  # real, distinct answers


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "tolerance", "tie"), [("f16", 0.002, 0.02), ("q8_0", 0.03, 0.2)])
def test_llama_cpp_next_token_distributions_match_transformers(decoded, tmp_path, quant, tolerance, tie):
    """Teacher-force transformers' greedy answers through llama.cpp and compare next-token distributions position by
    position. This is the check for Q8_0, whose free-running greedy text is not comparable token for token: llama.cpp
    also rounds the activations to 8 bits in every quantized matmul, and near-ties then flip (its own bundled Q4_1
    file decodes 4 of these 6 prompts differently from transformers). Measured: mean |p difference| of the top token
    0.0005 (f16) and 0.014 (q8_0, at most 0.09): a top-1 choice may flip only where the two best tokens are closer
    than `tie`."""
    out, model, prompts, answers = decoded[quant]
    top = llama_cpp(out, {"mode": "score", "prompts": prompts, "continuations": answers, "top": 5}, tmp_path)["top"]
    gaps, same_top1, diffs = [], [], []
    with torch.no_grad():
        for p, a, rows in zip(prompts, answers, top, strict=True):
            probs = model(torch.tensor([p + a])).logits[0, len(p) - 1:-1].softmax(-1)  # (len(a), V)
            assert len(rows) == len(a)
            for q, row in zip(probs, rows, strict=True):
                two = q.topk(2)
                gaps.append(float(two.values[0] - two.values[1]))
                same_top1.append(row[0][0] == int(two.indices[0]))
                diffs.append(abs(row[0][1] - float(q[row[0][0]])))
    gaps_, same = np.array(gaps), np.array(same_top1)
    assert same[gaps_ > tie].all()        # wherever transformers is not near a tie, llama.cpp picks the same token
    assert same.mean() >= 0.9
    assert np.mean(diffs) < tolerance     # and puts about the same probability on it


def test_the_commands_print_no_library_noise(tiny_run, tmp_path):
    """Installing torchao makes peft import it, and its import warns about CUDA kernels that cannot load on a CPU
    (and torch about enum registration): a user of `hhh merge` should see hhh's lines only."""
    import sys

    done = subprocess.run([sys.executable, "-m", "hhh.cli", "merge", str(tiny_run), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr, done.stderr[-2000:]
