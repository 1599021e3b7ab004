"""hhh compress: pruning by hand-worked examples, quantized variants close to fp32, the table end to end with resume."""

import json
import os

import pytest
import torch
from torch import nn

from hhh.cli import main
from hhh.optimize import prune
from tests.test_optimize import make_run


class Block(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)


class Toy(nn.Module):
    """A model whose one prunable Linear sits at layers.0.proj, as in a decoder."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(weight)])
        self.head = nn.Linear(weight.shape[0], 2)  # outside the decoder blocks: never pruned

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.layers[0].proj(input_ids))


def test_magnitude_and_wanda_by_hand():
    """One row W = [0.1, 0.5, 0.3, 0.2]; calibration inputs give feature norms ||X_j|| = [10, 1, 1, 1].
    Magnitude at 50% drops the two smallest |W|: 0.1 and 0.2 -> [0, 0.5, 0.3, 0].
    Wanda scores |W| * ||X|| = [1.0, 0.5, 0.3, 0.2] and drops 0.3 and 0.2 -> [0.1, 0.5, 0, 0]: the small weight on the
    loud feature stays."""
    w = torch.tensor([[0.1, 0.5, 0.3, 0.2]])
    # two real tokens (norms sqrt(6^2 + 8^2) = 10 and sqrt(1^2 + 0^2) = 1 ...) and one padded token that must not count
    x = torch.tensor([[[6.0, 1.0, 0.0, 1.0], [8.0, 0.0, 1.0, 0.0], [100.0, 100.0, 100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    toy = Toy(w)
    norms = prune.input_norms(toy, [(x, mask)])
    assert torch.allclose(norms["layers.0.proj"], torch.tensor([10.0, 1.0, 1.0, 1.0]))
    assert torch.equal(prune.magnitude(Toy(w), 0.5).layers[0].proj.weight, torch.tensor([[0.0, 0.5, 0.3, 0.0]]))
    assert torch.equal(prune.wanda(toy, [(x, mask)], 0.5).layers[0].proj.weight, torch.tensor([[0.1, 0.5, 0.0, 0.0]]))
    assert toy.head.weight.ne(0).all()


def test_pruning_reaches_the_asked_sparsity_and_drops_the_lowest_scores(tiny):
    before = {n: m.weight.clone() for n, m in prune.prunable(tiny)}
    embedding = tiny.model.embed_tokens.weight.clone()
    prune.magnitude(tiny, 0.3)
    assert prune.sparsity_of(tiny) == pytest.approx(0.3, abs=1e-3)
    for name, layer in prune.prunable(tiny):
        zero = layer.weight == 0
        assert before[name].abs()[zero].max() <= before[name].abs()[~zero].min()
    assert torch.equal(tiny.model.embed_tokens.weight, embedding)  # embeddings (and the tied head) stay dense


def test_wanda_prunes_each_output_row_to_the_same_share(tiny, tokenizer):
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    prune.wanda(tiny, [(ids, torch.ones_like(ids))], 0.5)
    for _, layer in prune.prunable(tiny):
        per_row = (layer.weight == 0).sum(1)
        assert torch.equal(per_row, torch.full_like(per_row, layer.weight.shape[1] // 2))


def test_sparsity_out_of_range_is_an_error(tiny):
    with pytest.raises(ValueError, match="sparsity"):
        prune.magnitude(tiny, 1.0)


def test_int8_variants_are_close_to_fp32_and_reload(tiny_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from hhh.optimize.compress import make_variant

    original = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = original(ids).logits
    for method in ("int8-weight", "int8-dynamic"):
        folder = make_variant(method, tiny_dir, tmp_path / method, sparsity=0.0, calibration=None)
        back = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
        assert type(back.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"  # still int8 after reload
        with torch.no_grad():
            got = back(ids).logits
        relative = (got - ref).norm() / ref.norm()
        assert 0 < relative < 0.05, (method, float(relative))


@pytest.fixture
def compressed(tiny_dir, tmp_path):
    run = make_run(tiny_dir, tmp_path / "run")
    out = tmp_path / "compress"
    args = ["compress", str(run), "--out", str(out), "--methods", "int8-weight,wanda", "--max-prompts", "2",
            "--answer-prompts", "4", "--calibration-prompts", "4", "--samples-per-prompt", "1", "--speed-tokens", "4",
            "--max-new-tokens", "8"]
    assert main(args) == 0
    return out


def test_compress_writes_the_table_and_resumes_only_what_is_missing(compressed, capsys):
    rows = {r["name"]: r for r in json.loads((compressed / "table.json").read_text())["rows"]}
    assert list(rows) == ["original", "int8-weight", "wanda", "base (unaligned)"]
    original = rows["original"]
    assert original["kl_to_original"] == pytest.approx(0, abs=1e-6) and original["top1_agreement"] == 1.0
    assert rows["wanda"]["nonzero_parameters"] < original["nonzero_parameters"]
    assert rows["wanda"]["kl_to_original"] > 0 and rows["base (unaligned)"]["kl_to_original"] > 0
    for r in rows.values():
        assert r["tokens_per_s_batch1"] > 0 and r["peak_rss_mib"] > r["model_mib"] > 0
        assert 0 <= r["eval"]["redteam:eval"]["toxicity/mean"] <= 1 and "refusal_rate" in r["eval"]["benign:eval"]
    assert (compressed / "plot_compress.png").stat().st_size > 0
    # the variants load as plain transformers folders and as hhh model specs
    from hhh.models.load import load_causal_lm

    load_causal_lm(str(compressed / "variants" / "wanda"), device="cpu")
    # resume: one row lost (an interruption), the others are read back untouched
    kept = (compressed / "rows" / "original.json").stat().st_mtime_ns
    os.remove(compressed / "rows" / "wanda.json")
    os.remove(compressed / "table.json")
    capsys.readouterr()
    assert main(["compress", "--resume", str(compressed)]) == 0
    assert "wanda: size" in capsys.readouterr().out
    assert (compressed / "rows" / "original.json").stat().st_mtime_ns == kept
    again = {r["name"]: r for r in json.loads((compressed / "table.json").read_text())["rows"]}
    assert again["wanda"]["perplexity"] == pytest.approx(rows["wanda"]["perplexity"])  # same seed, same numbers
    # the report rebuilds from the rows
    os.remove(compressed / "table.md")
    assert main(["optimize", "report", str(compressed)]) == 0
    assert "| wanda |" in (compressed / "table.md").read_text()


def test_compress_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run folder left behind by a bad source
    assert main(["compress", "--resume", str(tmp_path)]) == 2
    assert "not an hhh compress run folder" in capsys.readouterr().err
    assert main(["compress", "bundled:smollm2-135m-instruct", "--methods", "int4"]) == 2
    assert "methods" in capsys.readouterr().err
    assert main(["optimize", "report", str(tmp_path)]) == 2
    assert "no table.json" in capsys.readouterr().err
