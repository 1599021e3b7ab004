import json
import math
import subprocess
import sys

import pytest
import torch

from hhh.config import DPOConfig
from hhh.models import LoraSettings
from hhh.models.policy import build_policy
from hhh.runs import RunDir
from hhh.train.dpo import minibatches, preference_loss, sequence_logps, train_dpo
from hhh.train.rm import Pairs


def toy_pairs(n=8):
    """The same preference everywhere: answer 'yes thank you' over 'no go away'."""
    prompts = [f"Question {i}?" for i in range(n)]
    return Pairs(prompts, ["yes thank you"] * n, ["no go away"] * n, [False] * n, [None] * n)


@pytest.mark.parametrize("loss, at_start", [("sigmoid", math.log(2)), ("robust", math.log(2)), ("ipo", 25.0),
                                            ("hinge", 1.0), ("kto", 0.5)])
def test_losses_at_step_0_where_the_policy_is_the_reference(tiny, tokenizer, loss, at_start):
    """A fresh LoRA adapter (B = 0) is the reference: h = 0, so DPO = log 2, IPO = (0 - 1/(2*0.1))^2 = 25,
    hinge = max(0, 1 - 0) = 1, KTO = 1 - sigma(0) = 1/2 (z0 = 0)."""
    config = DPOConfig(loss=loss, batch_size=4)
    policy = build_policy(tiny, LoraSettings(top_layers=1))
    mb = minibatches(toy_pairs(4), tokenizer, config, "cpu")[0]
    pi = sequence_logps(policy, mb, 1.0)[:2]
    ref = sequence_logps(policy, mb, 1.0, reference=True)[:2]
    kl = torch.zeros(()) if loss == "kto" else None
    assert preference_loss(config, pi, ref, kl).item() == pytest.approx(at_start, abs=1e-5)


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_a_tiny_model_raises_its_margin_on_a_toy_preference(tiny, tokenizer, tmp_path, loss):
    config = DPOConfig(loss=loss, batch_size=4, epochs=6, lr=3e-2, lora_layers=None,
                       beta=2.0 if loss == "simpo" else 0.1)
    run = RunDir.create("dpo", config, str(tmp_path / "run"))
    policy = train_dpo(config, run, toy_pairs(), base=tiny, tokenizer=tokenizer, console=None)
    metrics = run.metrics()
    first, last = metrics[0], metrics[-1]
    assert last["loss/dpo"] < first["loss/dpo"]
    # the policy now prefers the chosen answer more than the reference does, on unseen prompts too
    unseen = Pairs(["Another one?", "And this?"], ["yes thank you"] * 2, ["no go away"] * 2, [False] * 2, [None] * 2)
    mb = minibatches(unseen, tokenizer, config, "cpu")[0]
    with torch.no_grad():
        pi = sequence_logps(policy, mb, 1.0)[0]
        ref = sequence_logps(policy, mb, 1.0, reference=True)[0]
    margin = (pi[:2] - ref[:2]) - (pi[2:] - ref[2:])
    assert (margin > 0).all() and last["rewards/accuracy"] == 1.0
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_logs_both_logps_and_the_implicit_rewards(tiny, tokenizer, tmp_path):
    config = DPOConfig(batch_size=4, epochs=1)
    run = RunDir.create("dpo", config, str(tmp_path / "run"))
    train_dpo(config, run, toy_pairs(), base=tiny, tokenizer=tokenizer, console=None)
    m = run.metrics()[0]
    for key in ("loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected", "grad_norm", "lr"):
        assert key in m
    assert m["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5) and m["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert len(run.metrics()) == 2  # 8 pairs / 4 per step


def test_dpo_command_on_a_pairs_file_and_on_self_built_pairs(tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes please", "rejected": "no"}) + "\n"
                             for i in range(6)))
    common = ["--model", tiny_dir, "--max-new-tokens", "6", "--eval-max-prompts", "2", "--eval-samples", "2",
              "--batch-size", "4", "--epochs", "1"]
    for extra, out in ((["--data", str(pairs)], "a"), (["--pair-prompts", "6", "--pair-samples", "2",
                                                        "--reward", "length:3"], "b")):
        proc = subprocess.run([sys.executable, "-m", "hhh.cli", "dpo", *common, *extra, "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run = tmp_path / out
        assert (run / "eval_before.json").is_file() and (run / "eval.json").is_file() and (run / "report.html").is_file()
        assert json.loads((run / "summary.json").read_text())["loss"] == "sigmoid"
    assert json.loads((tmp_path / "a" / "pairs.json").read_text())["pairs"] == 6


@pytest.mark.parametrize("argv, message", [(["dpo", "--loss", "xpo"], "flag --loss"),
                                           (["dpo", "--data", "missing.jsonl"], "no such file"),
                                           (["dpo", "--label-smoothing", "0.7"], "flag --label-smoothing")])
def test_dpo_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from hhh.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
