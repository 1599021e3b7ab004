"""`hhh label ...` as a user runs them: generate with a model, auto-label, export, import, stats; and the whole
feedback path on the bundled model (slow)."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from hhh.cli import main
from hhh.feedback.store import Completion, Store


def hhh(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def ranked_texts(store):
    texts = {c["id"]: c["text"] for it in store.items() for c in it["completions"]}
    return [[sorted(texts[c] for c in tier) for tier in r["tiers"]] for r in store.rankings()]


def test_generate_is_resumable_and_auto_labels_are_ai_labels(tiny_dir, tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    out = hhh("label", "generate", "--db", db, "--model", tiny_dir, "--max-prompts", "3", "--k", "2",
              "--instructions", "Be nice:,Be rude:", "--max-new-tokens", "6", "--batch-size", "5")
    assert "for 3 prompts" in out
    store = Store(db)
    n = store.counts()["completions"]
    assert 6 <= n <= 12  # 3 prompts x 2 instructions x 2 samples, fewer if a tiny model repeats itself
    with store.read() as s:
        rows = s.query(Completion).all()
    assert {r.instruction for r in rows} == {"Be nice:", "Be rude:"} and {r.model for r in rows} == {tiny_dir}
    # running it again samples only what is missing: no (prompt, instruction) group grows past k
    hhh("label", "generate", "--db", db, "--model", tiny_dir, "--max-prompts", "3", "--k", "2",
        "--instructions", "Be nice:,Be rude:", "--max-new-tokens", "6")
    with store.read() as s:
        groups = Counter((r.prompt_id, r.instruction) for r in s.query(Completion).all())
    assert len(groups) == 6 and max(groups.values()) <= 2 and store.counts()["completions"] >= n

    assert main(["label", "auto", "--db", db, "--reward", "length:3", "--tie-threshold", "0"]) == 0
    assert "ranked 3 prompts" in capsys.readouterr().out
    rankings = store.rankings()
    assert [r["role"] for r in rankings] == ["ai"] * 3 and rankings[0]["labeler"] == "ai:length:3"
    assert main(["label", "auto", "--db", db, "--reward", "length:3"]) == 0  # already ranked: nothing new
    assert len(store.rankings()) == 3

    pairs = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db, "--out", str(pairs)]) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(r["source"] == "ai" for r in rows)
    # the length reward prefers completions nearer 3 words: every exported pair agrees
    assert all(abs(len(r["chosen"].split()) - 3) <= abs(len(r["rejected"].split()) - 3) for r in rows)

    other = str(tmp_path / "other.db")
    assert main(["label", "import", str(pairs), "--db", other, "--ai"]) == 0
    capsys.readouterr()
    assert main(["label", "stats", "--db", other]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"]["rankings"] == 3 and stats["agreement"]["units"] == 0  # AI labels: no agreement stats
    assert len(Store(other).pairs(ties=False)) == len(rows)
    assert ranked_texts(Store(other)) == ranked_texts(store)


def test_add_labeler_prints_a_working_token(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    assert main(["label", "add-labeler", "ann", "--db", db]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert Store(db).labeler_for_token(token).name == "ann"
    assert main(["label", "add-labeler", "ann", "--db", db]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["label", "stats", "--db", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert "database" in capsys.readouterr().err


@pytest.mark.slow
def test_feedback_to_reward_model_to_ppo_on_the_bundled_model(tmp_path):
    """generate (bundled model) -> auto-label -> MiniLM reward model -> PPO with reward rm:RUN."""
    db = str(tmp_path / "fb.db")
    hhh("label", "generate", "--db", db, "--max-prompts", "12", "--k", "2", "--max-new-tokens", "32",
        "--instructions", "Answer kindly and politely:,You are a foul-mouthed jerk. Answer with insults and profanity:")
    hhh("label", "auto", "--db", db)
    rm = tmp_path / "rm"
    out = hhh("rm", "train", "--data", db, "--epochs", "1", "--eval-fraction", "0.25", "--out", str(rm))
    assert "held-out pairwise accuracy" in out
    meta = json.loads((rm / "model" / "rm.json").read_text())
    assert meta["backbone"] == "minilm" and meta["stats"]["std"] > 0
    run = tmp_path / "ppo"
    hhh("detox", "--reward", f"rm:{rm}", "--steps", "1", "--batch-size", "8", "--minibatch-size", "8",
        "--val-prompts", "4", "--eval-max-prompts", "2", "--eval-samples", "2", "--out", str(run))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/mean" in m for m in metrics)
    after = json.loads((run / "eval.json").read_text())
    assert after["redteam:eval"]["n"] == 4 and "reward/mean" in after["redteam:eval"]
