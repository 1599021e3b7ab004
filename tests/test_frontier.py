import json
import subprocess
import sys

import pytest

from hhh.config import DetoxConfig, DPOConfig, FrontierConfig, GRPOConfig, RLOOConfig
from hhh.frontier import frontier, method_config, read_points
from hhh.runs import RunDir
from tests import toy_rewards


def test_each_method_gets_its_kl_strength_held_fixed(tmp_path):
    config = FrontierConfig(steps=3, dpo_pair_prompts=7, max_new_tokens=20, lora_r=4)
    for method, cls, field in [("ppo", DetoxConfig, "kl_coef"), ("grpo", GRPOConfig, "beta"),
                               ("rloo", RLOOConfig, "kl_coef"), ("dpo", DPOConfig, "beta")]:
        cfg = method_config(config, method, 0.37, tmp_path / method)
        assert type(cfg) is cls and getattr(cfg, field) == 0.37
        assert cfg.max_new_tokens == 20 and cfg.lora_r == 4 and cfg.out == str(tmp_path / method)
        if cls is DPOConfig:
            assert cfg.pair_prompts == 7
        else:  # no KL-budget guard raising the coefficient, no held-out split, the frontier's steps
            assert cfg.kl_budget is None and cfg.val_prompts == 0 and cfg.steps == 3


def test_quick_fills_only_the_fields_not_given():
    quick = FrontierConfig(quick=True, eval={"samples": 3}).resolved()
    assert quick.steps == 5 and quick.max_new_tokens == 32 and quick.eval.max_prompts == 48
    assert quick.eval.samples == 3 and quick.eval.prompts == ["redteam:eval"]  # set explicitly: kept
    assert FrontierConfig(eval={"samples": 3}).resolved().steps is None  # not quick: untouched


SMALL = dict(methods=["ppo", "grpo", "rloo", "dpo"], ppo_kl_coef=[0.05], grpo_beta=[0.0, 0.5], rloo_kl_coef=[0.1],
             dpo_beta=[0.1, 0.5], steps=2, dpo_pair_prompts=8, max_new_tokens=6, eval={"max_prompts": 2, "samples": 2},
             lora_r=4, lora_alpha=8, reward="tests.toy_rewards:short_then_ctrl_c")


def test_frontier_interrupted_and_resumed_equals_an_uninterrupted_one(tiny_dir, tmp_path):
    toy_rewards.CALLS.update(n=0, interrupt_at=None)
    straight = frontier(FrontierConfig(model=tiny_dir, out=str(tmp_path / "straight"), **SMALL))
    points = read_points(straight)
    assert [p["name"] for p in points] == ["base", "ppo-kl_coef-0.05", "grpo-beta-0", "grpo-beta-0.5",
                                           "rloo-kl_coef-0.1", "dpo-beta-0.1", "dpo-beta-0.5"]
    assert points[0]["kl"] == 0 and all(p["kl"] != 0 for p in points[1:])  # each scored with its adapter
    # Every adapter starts from the bare base: the first rollout of each online run is the reference's.
    for name in ("ppo-kl_coef-0.05", "grpo-beta-0", "grpo-beta-0.5", "rloo-kl_coef-0.1"):
        first = json.loads((straight.path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert abs(first["kl/k1"]) < 1e-4, name
        assert (straight.path / name / "adapter" / "adapter_config.json").is_file()
    table = (straight.path / "frontier.md").read_text()
    assert table.count("\n| ") == 1 + len(points) and "| GRPO | beta = 0.5 |" in table
    assert (straight.path / "frontier.png").stat().st_size > 10_000

    # Ctrl-C in the first GRPO run (the reward's 4th call: pairs 1, PPO 2): points before it are kept
    toy_rewards.CALLS.update(n=0, interrupt_at=4)
    cut = frontier(FrontierConfig(model=tiny_dir, out=str(tmp_path / "cut"), **SMALL))
    assert [p["name"] for p in read_points(cut)] == ["base", "ppo-kl_coef-0.05"]
    assert not (cut.path / "frontier.md").exists()
    toy_rewards.CALLS.update(n=0, interrupt_at=None)
    frontier(resume=str(cut.path))

    def strip(ps):
        return [{k: v for k, v in p.items() if "seconds" not in k} for p in ps]

    assert strip(read_points(cut)) == strip(points)


def test_frontier_command_quick(tiny_dir, tmp_path):
    out = tmp_path / "f"
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "frontier", "--quick", "--model", tiny_dir,
                           "--methods", "grpo,dpo", "--grpo-beta", "0.1", "--dpo-beta", "0.1", "--steps", "1",
                           "--max-new-tokens", "6", "--eval-max-prompts", "2", "--dpo-pair-prompts", "4",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = (out / "config.toml").read_text()
    assert "[eval]\nprompts" in config and "samples = 2" in config  # quick's value
    assert "max_prompts = 2" in config and "steps = 1" in config  # the flags' over quick's
    assert [p["name"] for p in read_points(RunDir(out))] == ["base", "grpo-beta-0.1", "dpo-beta-0.1"]
    assert (out / "frontier.png").is_file() and "plot:" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ppo,sac"], "methods"),
    (["--grpo-beta", "0.1,x"], "grpo_beta"),
    (["--eval-prompts", "nosuch:set"], "nosuch"),
])
def test_frontier_errors_are_one_line(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "frontier", *argv, "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x").exists()
