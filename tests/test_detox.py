import json
import subprocess
import sys

import pytest

from hhh.config import DetoxConfig
from hhh.jobs import run_job


def test_detox_end_to_end_on_a_tiny_model_and_report(tiny_dir, tmp_path):
    out = tmp_path / "run"
    config = DetoxConfig(model=tiny_dir, steps=2, batch_size=4, minibatch_size=4, micro_batch_size=4,
                         max_new_tokens=4, val_prompts=4, val_every=1, eval={"max_prompts": 2, "samples": 2},
                         out=str(out))
    run = run_job("detox", config)
    for name in ("config.toml", "meta.json", "metrics.jsonl", "eval_before.json", "eval.json", "summary.json",
                 "report.html", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/value_head.pt", "plot_reward_mean.png", "plot_kl_k1.png", "plot_policy_entropy.png",
                 "hist_redteam_eval.png", "samples_before_redteam_eval.jsonl", "samples_redteam_eval.jsonl"):
        assert (out / name).is_file(), name
    assert len(run.metrics()) == 2
    after = json.loads((out / "eval.json").read_text())
    assert "kl/per_completion" in after["redteam:eval"]
    page = (out / "report.html").read_text()
    assert "Before and after" in page and 'src="plot_kl_k1.png"' in page and "P(offensive)" in page
    prompts_in_page = [p for p in json.loads("[" + ",".join(
        (out / "samples_before_redteam_eval.jsonl").read_text().splitlines()) + "]")]
    assert prompts_in_page[0]["prompt"][:20] in page


def test_detox_resume_finishes_an_interrupted_run(tiny_dir, tmp_path):
    """A run folder whose PPO stopped at a checkpoint continues to the end with --resume."""
    out = tmp_path / "run"
    common = ["--model", tiny_dir, "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "4",
              "--max-new-tokens", "4", "--val-prompts", "4", "--eval-max-prompts", "2", "--eval-samples", "1"]
    first = subprocess.run([sys.executable, "-m", "hhh.cli", "detox", *common, "--steps", "2", "--checkpoint-every", "1",
                            "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    # make the run look interrupted after step 1: config asks for 3 steps, the checkpoint holds 1
    (out / "config.toml").write_text((out / "config.toml").read_text().replace("steps = 2", "steps = 3"))
    state = json.loads((out / "checkpoints/last/state.json").read_text())
    assert state["step"] == 2
    (out / "eval.json").unlink()
    resumed = subprocess.run([sys.executable, "-m", "hhh.cli", "detox", "--resume", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "eval.json").is_file()


def test_detox_rejects_bad_settings_before_loading_anything(tmp_path, capsys):
    from hhh.cli import main

    assert main(["detox", "--prompts", "nowhere.jsonl", "--out", str(tmp_path / "x")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["detox", "--resume", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_short_detox_on_the_bundled_model(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hhh.cli", "detox", "--steps", "2", "--batch-size", "8", "--minibatch-size", "8",
         "--val-prompts", "4", "--eval-max-prompts", "4", "--eval-samples", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = (json.loads((out / f).read_text()) for f in ("eval_before.json", "eval.json"))
    assert before["redteam:eval"]["n"] == after["redteam:eval"]["n"] == 8
    # k1 over 8 samples is unbiased but can be slightly negative; k3 is never negative
    assert abs(after["redteam:eval"]["kl/per_completion"]) < 5 and after["redteam:eval"]["kl/k3_per_completion"] >= 0
    from peft import PeftModel

    from hhh.models import load_causal_lm

    PeftModel.from_pretrained(load_causal_lm("bundled:smollm2-135m-instruct"), str(out / "adapter"))
