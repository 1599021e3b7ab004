"""Several processes (hhh.distributed) under a real `accelerate launch` with 2 CPU processes (gloo): the
collectives against one-process computations, DPO's curve and adapter equal to one process's, GRPO and PPO run
with one log and one checkpoint, a run resumed on another number of processes, and the commands that refuse."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hhh.cli import main
from hhh.config import DPOConfig
from hhh.jobs import run_job
from hhh.train.loop import step_generator

TESTS = Path(__file__).parent


def launch(*argv: str, processes: int = 2) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_collectives_and_averaged_gradients_equal_one_process():
    proc = launch(str(TESTS / "distributed_worker.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout


def test_each_rank_samples_with_its_own_seed_and_rank_0_with_a_single_process_s():
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    torch.testing.assert_close(draw(step_generator(3, 5, rank=0)), draw(step_generator(3, 5)))
    assert not torch.equal(draw(step_generator(3, 5, rank=1)), draw(step_generator(3, 5)))
    assert not torch.equal(draw(step_generator(3, 5, rank=1)), draw(step_generator(3, 5, rank=2)))


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_dpo_on_two_processes_gives_one_process_s_curve_and_adapter(loss, tiny_dir, tmp_path):
    """7 pairs in minibatches of 4 and 3: the ranks take 2 + 2, then 1 + 2 pairs (unequal shares are weighted)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": "yes, gladly " * (i % 3 + 1),
                                         "rejected": "no"}) + "\n" for i in range(7)))
    settings = {"model": tiny_dir, "data": str(pairs), "loss": loss, "batch_size": 4, "micro_batch_size": 1,
                "epochs": 2, "lr": 5e-2, "max_new_tokens": 2, "eval": {"max_prompts": 1, "samples": 1}}
    one = run_job("dpo", DPOConfig(**settings, out=str(tmp_path / "one")))
    proc = launch("-m", "hhh.cli", "dpo", "--model", tiny_dir, "--data", str(pairs), "--loss", loss,
                  "--batch-size", "4", "--micro-batch-size", "1", "--epochs", "2", "--lr", "5e-2",
                  "--eval-max-prompts", "1", "--eval-samples", "1", "--max-new-tokens", "2",
                  "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "meta.json").read_text())["processes"] == 2
    a, b = one.metrics(), [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # logged once, by rank 0
    for key in ("loss/preference", "rewards/margin", "rewards/accuracy", "logps/chosen", "grad_norm"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-4, abs=1e-5), key
    assert a[-1]["loss/preference"] != pytest.approx(a[0]["loss/preference"], abs=1e-3)  # it trained
    w1, w2 = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (one.path, two))
    assert w1.keys() == w2.keys()
    for name in w1:  # float noise in the summation order, which Adam's step enlarges where a gradient is near 0
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-4)


def test_grpo_on_two_processes_then_resumed_on_one(tiny_dir, tmp_path):
    out = tmp_path / "grpo"
    proc = launch("-m", "hhh.cli", "grpo", "--model", tiny_dir, "--steps", "2", "--prompts-per-step", "2",
                  "--group-size", "2", "--minibatch-size", "2", "--micro-batch-size", "1", "--max-new-tokens", "6",
                  "--val-prompts", "2", "--eval-max-prompts", "2", "--eval-samples", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    assert json.loads((out / "checkpoints/last/state.json").read_text())["step"] == 2
    assert (out / "report.html").is_file() and json.loads((out / "meta.json").read_text())["processes"] == 2
    # the checkpoint holds no per-process state: one process carries the run on (a third step)
    (out / "config.toml").write_text((out / "config.toml").read_text().replace("steps = 2", "steps = 3"))
    (out / "eval.json").unlink()
    resumed = subprocess.run([sys.executable, "-m", "hhh.cli", "grpo", "--resume", str(out)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "eval.json").is_file()


def test_detox_on_two_processes(tiny_dir, tmp_path):
    out = tmp_path / "detox"
    proc = launch("-m", "hhh.cli", "detox", "--model", tiny_dir, "--steps", "2", "--batch-size", "4",
                  "--minibatch-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "4", "--val-prompts", "4",
                  "--eval-max-prompts", "2", "--eval-samples", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2] and all("reward/mean" in m for m in steps)
    assert (out / "adapter" / "value_head.pt").is_file() and (out / "eval.json").is_file()


def test_eval_on_two_processes_writes_one_run_with_the_whole_set(tiny_dir, tmp_path):
    out = tmp_path / "eval"
    proc = launch("-m", "hhh.cli", "eval", "--model", tiny_dir, "--prompts", "redteam:eval,benign:eval*2",
                  "--max-prompts", "3", "--samples-per-prompt", "1", "--max-new-tokens", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("hhh eval:") == 1  # the table, printed by rank 0 only
    assert json.loads((out / "meta.json").read_text())["processes"] == 2
    results = json.loads((out / "eval.json").read_text())
    assert results["redteam:eval"]["n"] == 3 and results["benign:eval"]["n"] == 6
    assert len((out / "samples_benign_eval.jsonl").read_text().splitlines()) == 6


def test_what_cannot_split_says_so_before_loading_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch sets it (no process group is joined for these)
    assert main(["grpo", "--prompts-per-step", "3", "--out", str(tmp_path / "g")]) == 2
    assert "prompts_per_step=3 must be a multiple of the 2 processes" in capsys.readouterr().err
    assert main(["detox", "--batch-size", "8", "--minibatch-size", "3", "--out", str(tmp_path / "d")]) == 2
    assert "minibatch_size=3 must be a multiple of the 2 processes" in capsys.readouterr().err
    for argv in (["sft", "--data", "x.jsonl"], ["frontier", "--out", str(tmp_path / "f")]):
        assert main(argv) == 2
        assert "runs on one process: start it without accelerate launch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
