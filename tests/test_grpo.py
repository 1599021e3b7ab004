import json
import subprocess
import sys

import pytest

from hhh.config import GRPOConfig, RLOOConfig
from hhh.runs import RunDir
from hhh.train.grpo import train_online
from tests import toy_rewards
from tests.test_ppo import hello_model

TOY = dict(prompts="redteam:train", reward="tests.toy_rewards:hello", second_scorer="length:8", prompts_per_step=4,
           group_size=4, minibatch_size=8, micro_batch_size=8, max_new_tokens=6, lr=1e-2, lora_r=8, lora_alpha=16,
           val_prompts=4, val_every=3, checkpoint_every=2)


def run_online(cls, tokenizer, tmp_path, name, resume=False, **overrides):
    config = cls(**{**TOY, **overrides, "out": str(tmp_path / name)})
    run = RunDir(config.out) if resume else RunDir.create(name, config, config.out)
    return run, train_online(config, run, base=hello_model(tokenizer), tokenizer=tokenizer, resume=resume)


@pytest.mark.parametrize("cls, extra", [(GRPOConfig, {}), (GRPOConfig, {"aggregation": "token", "epochs": 2}),
                                        (RLOOConfig, {}), (RLOOConfig, {"advantage": "reinforce++"})])
def test_critic_free_rl_raises_a_simple_reward(cls, extra, tokenizer, tmp_path):
    run, (_, steps, best, stopped) = run_online(cls, tokenizer, tmp_path, "learn", steps=20, **extra)
    m = run.metrics()
    early = sum(x["reward/score"] for x in m[:3]) / 3
    late = sum(x["reward/score"] for x in m[-3:]) / 3
    assert late > early + 0.2, (early, late)
    assert steps == 20 and stopped is None and best is not None
    # The first rollout is the reference's. Old log-probs are the sampler's (KV cache), the reference's a fresh
    # pass: equal up to float rounding.
    assert abs(m[0]["kl/k1"]) < 1e-4 and m[-1]["kl/k1"] > 0.01
    for key in ("reward/score", "kl/k1", "kl/k3", "policy/entropy", "loss/policy", "length/mean", "second/score",
                "samples/distinct_2", "alarms", "time/step_s"):
        assert key in m[-1], key


def test_grpo_with_equal_rewards_does_not_move_the_policy(tokenizer, tmp_path):
    """A constant reward: every group advantage is 0, and with beta = 0 the loss has no gradient: LoRA B stays 0."""
    run, (policy, *_) = run_online(GRPOConfig, tokenizer, tmp_path, "flat", steps=2, beta=0.0,
                                   reward="tests.toy_rewards:constant", val_prompts=0)
    assert all(x["advantage/abs_mean"] == 0 for x in run.metrics())
    assert all(float(p.detach().abs().max()) == 0 for n, p in policy.named_parameters() if "lora_B" in n)


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tokenizer, tmp_path):
    straight, _ = run_online(GRPOConfig, tokenizer, tmp_path, "straight", steps=4)
    toy_rewards.CALLS.update(n=0, interrupt_at=2)
    cut, (_, steps, _, stopped) = run_online(GRPOConfig, tokenizer, tmp_path, "cut", steps=4,
                                             reward="tests.toy_rewards:hello_then_ctrl_c")
    assert stopped == "interrupted" and steps == 2
    assert json.loads((cut.path / "checkpoints" / "last" / "state.json").read_text())["step"] == 2
    toy_rewards.CALLS.update(n=0, interrupt_at=None)
    run_online(GRPOConfig, tokenizer, tmp_path, "cut", resume=True, steps=4, reward="tests.toy_rewards:hello_then_ctrl_c")

    def strip(ms):
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]

    assert strip(cut.metrics()) == strip(straight.metrics())


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_commands_as_a_user_runs_them(command, tiny_dir, tmp_path):
    out = tmp_path / command
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", command, "--model", tiny_dir, "--steps", "2",
                           "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--val-prompts", "2",
                           "--eval-max-prompts", "2", "--eval-samples", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "report.html").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    # --resume reads the kind and settings from the run folder; a finished run only evaluates again
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", command, "--resume", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"hhh {command} --resume" not in proc.stdout and len((out / "metrics.jsonl").read_text().splitlines()) == 2
