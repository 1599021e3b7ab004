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

    from hhh.config import CompressConfig
    from hhh.optimize.compress import make_variant

    original = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = original(ids).logits
    for method in ("int8-weight", "int8-dynamic"):
        folder = make_variant(method, tiny_dir, tmp_path / method, config=CompressConfig(source=tiny_dir))
        back = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
        assert type(back.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"  # still int8 after reload
        with torch.no_grad():
            got = back(ids).logits
        relative = (got - ref).norm() / ref.norm()
        assert 0 < relative < 0.05, (method, float(relative))
    assert main(["export", str(tmp_path / "int8-weight"), "--out", str(tmp_path / "q.gguf")]) == 2  # one-line error
    assert not (tmp_path / "q.gguf").exists()


@pytest.fixture
def compressed(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from hhh.models import DEFAULT_MODEL
    from hhh.models.spec import local_path

    # the tokenizer as a model ships it (pad == EOS), not as hhh prepares it for sampling
    AutoTokenizer.from_pretrained(local_path(DEFAULT_MODEL)).save_pretrained(tiny_dir)
    run = make_run(tiny_dir, tmp_path / "run")
    out = tmp_path / "compress"
    args = ["compress", str(run), "--out", str(out), "--methods", "int8-weight,wanda,wanda+lora,drop-layers,distill",
            "--max-prompts", "2", "--answer-prompts", "4", "--calibration-prompts", "4", "--samples-per-prompt", "1",
            "--speed-tokens", "4", "--max-new-tokens", "8", "--student-layers", "1", "--distill-examples", "2",
            "--distill-steps", "3", "--recover-steps", "2"]
    assert main(args) == 0
    return out


def test_compress_writes_the_table_and_resumes_only_what_is_missing(compressed, capsys):
    rows = {r["name"]: r for r in json.loads((compressed / "table.json").read_text())["rows"]}
    assert list(rows) == ["original", "int8-weight", "wanda", "wanda+lora", "drop-layers", "distill",
                          "base (unaligned)"]
    recovered = json.loads((compressed / "variants" / "wanda+lora" / "hhh_provenance.json").read_text())
    assert len(recovered["recover_loss"]) == 2 and recovered["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows["wanda+lora"]["nonzero_parameters"] == rows["wanda"]["nonzero_parameters"]  # no zero refilled
    assert rows["wanda+lora"]["kl_to_original"] != rows["wanda"]["kl_to_original"]  # the fine-tune changed it
    original = rows["original"]
    assert original["kl_to_original"] == pytest.approx(0, abs=1e-6) and original["top1_agreement"] == 1.0
    assert rows["wanda"]["nonzero_parameters"] < original["nonzero_parameters"]
    assert rows["drop-layers"]["parameters"] == rows["distill"]["parameters"] < original["parameters"]
    provenance = json.loads((compressed / "variants" / "distill" / "hhh_provenance.json").read_text())
    assert len(provenance["layers_kept"]) == 1 and len(provenance["distill_loss"]) == 3
    assert rows["wanda"]["kl_to_original"] > 0 and rows["base (unaligned)"]["kl_to_original"] > 0
    assert all(rows[n]["seconds_making"] > 0 for n in ("int8-weight", "wanda", "drop-layers", "distill"))
    for r in rows.values():
        assert r["seconds_measuring"] > 0
        assert r["tokens_per_s_batch1"] > 0 and r["peak_rss_mib"] > r["model_mib"] > 0
        assert 0 <= r["eval"]["redteam:eval"]["toxicity/mean"] <= 1 and "refusal_rate" in r["eval"]["benign:eval"]
    assert (compressed / "plot_compress.png").stat().st_size > 0
    # every variant ships the original's tokenizer as it was, not hhh's sampling choices (pad token, padding side)
    shipped = json.loads((compressed / "original" / "tokenizer_config.json").read_text())
    for name in ("int8-weight", "wanda", "drop-layers", "distill"):
        config = json.loads((compressed / "variants" / name / "tokenizer_config.json").read_text())
        assert (config.get("pad_token"), config.get("padding_side")) == (shipped.get("pad_token"),
                                                                         shipped.get("padding_side")), name
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


def test_layer_dropped_copy_is_the_model_without_those_layers(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from hhh.models import tiny_causal_lm
    from hhh.optimize.distill import layer_dropped

    teacher = tiny_causal_lm(tokenizer, layers=3, seed=0)
    ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    student = layer_dropped(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and len(teacher.model.layers) == 3  # the teacher is untouched
    with torch.no_grad():
        assert torch.equal(layer_dropped(teacher, [0, 1, 2])(ids).logits, teacher(ids).logits)
        by_hand = teacher.model.layers
        teacher.model.layers = torch.nn.ModuleList([by_hand[0], by_hand[2]])
        expected = teacher(ids).logits
        teacher.model.layers = by_hand
        assert torch.equal(student(ids).logits, expected)
        generated = student.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)  # cache indices ok
    assert generated.shape[1] == ids.shape[1] + 4
    student.save_pretrained(tmp_path / "student")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "student")(ids).logits, expected)
    with pytest.raises(ValueError, match="within 0..2"):
        layer_dropped(teacher, [3])


def test_layer_importance_finds_a_layer_that_does_nothing(tokenizer):
    """A layer whose attention output and MLP down projections are zero adds nothing to the residual stream:
    removing it changes nothing (KL exactly 0); removing any other layer does."""
    from hhh.models import tiny_causal_lm
    from hhh.optimize.distill import keep_by_importance, layer_importance
    from hhh.rollout import tokens_from_ids

    model = tiny_causal_lm(tokenizer, layers=3, seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    gen = torch.Generator().manual_seed(0)
    batch = tokens_from_ids([torch.randint(0, 1000, (6,), generator=gen).tolist() for _ in range(2)],
                            [torch.randint(0, 1000, (5,), generator=gen).tolist() for _ in range(2)], 0, "cpu")
    importance = layer_importance(model, [batch])
    assert importance[1] == pytest.approx(0.0, abs=1e-6) and min(importance[0], importance[2]) > 1e-4
    assert keep_by_importance(importance, 2) == [0, 2]
    assert keep_by_importance([0.5, 0.1, 0.3, 0.2], 2) == [0, 2]  # by hand: the two costliest, in model order


def test_distillation_lowers_the_students_kl_to_the_teacher(tokenizer):
    from hhh.models import tiny_causal_lm
    from hhh.models.load import prepare_tokenizer
    from hhh.optimize.distill import distill, layer_dropped
    from hhh.optimize.measure import fidelity, reference

    teacher = tiny_causal_lm(tokenizer, layers=4, seed=0)
    with torch.no_grad():  # a random tiny model is near uniform; sharpen it so there is something to learn
        teacher.model.norm.weight.mul_(30.0)
    tok = prepare_tokenizer(tokenizer)
    prompts = ["How do I cook rice?", "Name a colour.", "Say hello.", "What is two plus two?"]
    data = reference(teacher, tok, prompts, max_new_tokens=8, seed=0, batch_size=2, logprobs=False).tokens
    held_out = reference(teacher, tok, prompts, max_new_tokens=8, seed=0, batch_size=2)  # same answers, with log-probs
    student = layer_dropped(teacher, [0, 3])
    before = fidelity(student, held_out)["kl_to_original"]
    losses = distill(teacher, student, tok, data, steps=30, lr=1e-3, temperature=1.0, alpha=0.9)
    after = fidelity(student, held_out)["kl_to_original"]
    assert after < 0.5 * before, (before, after)  # measured: 0.244 -> 0.021 nats per token
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad or p.grad is not None for p in student.parameters())


def test_rebatch_keeps_every_row_and_trims_padding(tokenizer):
    """Answers sampled 64 at a time train 8 at a time: the smaller batches hold the same rows in order, padded only
    to their own longest row, and a model reads the same logits from them as from the wide batch."""
    from hhh.models import tiny_causal_lm
    from hhh.optimize.distill import rebatch
    from hhh.rollout import response_logits, tokens_from_ids

    queries = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]
    responses = [[20], [21, 22, 23, 24, 25], [26, 27], [28, 29]]
    wide = tokens_from_ids(queries, responses, 0, "cpu")
    parts = rebatch([wide], 2)
    assert [len(p) for p in parts] == [2, 2]
    assert parts[0].query_ids.shape == (2, 6) and parts[0].response_ids.shape == (2, 5)
    assert parts[1].query_ids.shape == (2, 3) and parts[1].response_ids.shape == (2, 2)  # was (2, 6) and (2, 5)
    for i, row in enumerate(range(4)):
        part, j = parts[i // 2], i % 2
        assert part.query_ids[j][part.query_mask[j].bool()].tolist() == queries[row]
        assert part.response_ids[j][part.response_mask[j].bool()].tolist() == responses[row]
    model = tiny_causal_lm(tokenizer, layers=2, seed=0).eval()
    with torch.no_grad():
        full = response_logits(model, wide.query_ids, wide.query_mask, wide.response_ids, wide.response_mask)
        small = response_logits(model, parts[1].query_ids, parts[1].query_mask, parts[1].response_ids,
                                parts[1].response_mask)
    assert torch.allclose(small, full[2:, :2], atol=1e-5)
    assert [len(p) for p in rebatch([wide, parts[1]], 3, limit=5)] == [3, 2]  # across batches, first `limit` rows


def test_lora_recovery_after_pruning_lowers_kl_and_keeps_every_zero(tokenizer):
    """Magnitude pruning at 70%, then a short LoRA fine-tune on the original's outputs, merged back: closer to the
    original than the pruned model was, every pruned weight still exactly zero, and a plain model again."""
    from hhh.models import tiny_causal_lm
    from hhh.models.load import prepare_tokenizer
    from hhh.optimize.distill import recover
    from hhh.optimize.measure import fidelity, reference

    teacher = tiny_causal_lm(tokenizer, layers=2, seed=0)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(10.0)  # peaked enough that pruning costs something measurable
    tok = prepare_tokenizer(tokenizer)
    prompts = ["How do I cook rice?", "Name a colour.", "Say hello.", "What is two plus two?"]
    data = reference(teacher, tok, prompts, max_new_tokens=8, seed=0, batch_size=2, logprobs=False).tokens
    held_out = reference(teacher, tok, prompts, max_new_tokens=8, seed=0, batch_size=2)
    student = type(teacher)(teacher.config)
    student.load_state_dict(teacher.state_dict())
    prune.magnitude(student.eval(), 0.7)
    zeros = {name: layer.weight == 0 for name, layer in prune.prunable(student)}
    before = fidelity(student, held_out)["kl_to_original"]
    recovered, losses = recover(teacher, student, tok, data, steps=30, lr=3e-3, temperature=1.0, alpha=0.9)
    after = fidelity(recovered, held_out)["kl_to_original"]
    assert after < 0.8 * before, (before, after)  # measured: 0.313 -> 0.199 nats per token
    assert losses[-1] < losses[0]
    assert not hasattr(recovered, "peft_config") and type(recovered) is type(teacher)
    for name, layer in prune.prunable(recovered):
        assert bool((layer.weight[zeros[name]] == 0).all()), name
    assert prune.sparsity_of(recovered) == pytest.approx(0.7, abs=0.001)
