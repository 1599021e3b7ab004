"""hhh's DPO and GRPO against TRL's DPOTrainer and GRPOTrainer: seconds per step and peak memory.

Same machine, same session, same bundled model (fp32), same LoRA (r 16, alpha 32, top 10 layers, the
modules hhh adapts), same data, same step sizes:
  DPO   8 pairs per step, beta 0.1; TRL computes reference log-probs every step (its default), hhh once
        per minibatch before training (that pass is counted in hhh's time)
  GRPO  16 completions per step (4 prompts x 4), 48 new tokens at temperature 0.7, beta 0.04, reward
        1 - P(offensive) on the red-team train prompts; sampling is part of each step for both
Each of the four runs in its own process, so peak memory (max RSS, model load included) is its own. The first
step of each is warm-up and not timed. Prints one line per run and the hhh/TRL ratios.

    make bench-trl          # installs trl==1.16.0 (--no-deps) into .venv, then runs this
    .venv/bin/python bench/vs_trl.py [--dpo-steps 4] [--grpo-steps 3]
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import time

MODEL = "bundled:smollm2-135m-instruct"
WORDS = ("the a you I we it is not can will help please sorry people think know good bad right wrong "
         "never always maybe really just like want need say tell make").split()


def pairs(n: int) -> list[dict]:
    """n prompt/chosen/rejected rows: red-team train prompts, random-word answers of ~40 words (~50 tokens)."""
    from hhh.data import load_prompts

    rng = random.Random(0)
    prompts = load_prompts("redteam:train")[:n]
    return [{"prompt": p, "chosen": " ".join(rng.choice(WORDS) for _ in range(40)),
             "rejected": " ".join(rng.choice(WORDS) for _ in range(40))} for p in prompts]


def lora(model):
    from hhh.config import PolicyJobSettings
    from hhh.models.load import lora_config

    return lora_config(model, PolicyJobSettings().lora())


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_timer():
    """A TrainerCallback recording each optimizer step's wall time."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.time() - self.t0)

    return Timer()


def toxicity_reward():
    from hhh.rewards import build_reward

    reward = build_reward("toxicity")

    def score(prompts, completions, **kw):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        plain = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return reward.score(plain, texts).tolist()

    return score


def trl_dpo(steps: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hhh.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs(8 * steps)]
    timer = step_timer()
    args = DPOConfig(output_dir="/tmp/bench-trl-dpo", per_device_train_batch_size=8, max_steps=steps,
                     learning_rate=5e-4, beta=0.1, report_to="none", save_strategy="no", logging_steps=1,
                     use_cpu=True, bf16=False, dataloader_num_workers=0, max_length=256)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora(model), callbacks=[timer])
    trainer.train()
    return {"s_per_step": sum(timer.times[1:]) / (len(timer.times) - 1), "steps": len(timer.times)}


def hhh_dpo(steps: int) -> dict:
    from rich.console import Console

    from hhh.config import DPOConfig
    from hhh.data.pairs import Pairs
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import RunDir
    from hhh.train.dpo import train_dpo

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    rows = pairs(8 * steps)
    data = Pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                 [False] * len(rows), [None] * len(rows))
    config = DPOConfig(batch_size=8, epochs=1, lr=5e-4, beta=0.1, out="/tmp/bench-hhh-dpo")
    run = RunDir.create("dpo", config, config.out, exist_ok=True)
    t0 = time.time()
    train_dpo(config, run, data, base=model, tokenizer=tok, console=Console(quiet=True))
    total = time.time() - t0
    step_s = [m["time/step_s"] for m in run.metrics()[-steps:]]
    # reference pass + every step, per step: what a user waits for
    return {"s_per_step": total / steps, "s_per_step_steps_only": sum(step_s[1:]) / (steps - 1), "steps": steps}


def trl_grpo(steps: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in load_prompts("redteam:train")[: 4 * steps]]
    timer = step_timer()
    args = GRPOConfig(output_dir="/tmp/bench-trl-grpo", per_device_train_batch_size=16, num_generations=4,
                      steps_per_generation=1, max_completion_length=48, temperature=0.7, beta=0.04,
                      learning_rate=1e-3, max_steps=steps, report_to="none", save_strategy="no", logging_steps=1,
                      use_cpu=True, bf16=False, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=toxicity_reward(), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora(model),
                          callbacks=[timer])
    trainer.train()
    return {"s_per_step": sum(timer.times[1:]) / (len(timer.times) - 1), "steps": len(timer.times)}


def hhh_grpo(steps: int) -> dict:
    from rich.console import Console

    from hhh.config import GRPOConfig
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import RunDir
    from hhh.train.grpo import train

    tok, model = load_tokenizer(MODEL), load_causal_lm(MODEL)
    config = GRPOConfig(steps=steps, prompts_per_step=4, group_size=4, minibatch_size=16, beta=0.04, lr=1e-3,
                        val_prompts=0, out="/tmp/bench-hhh-grpo")
    run = RunDir.create("grpo", config, config.out, exist_ok=True)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)
    train(config, run, base=model, tokenizer=tok, console=Console(quiet=True))
    step_s = [m["time/step_s"] for m in run.metrics()]
    return {"s_per_step": sum(step_s[1:]) / (len(step_s) - 1), "steps": len(step_s)}


WORKERS = {"trl-dpo": trl_dpo, "hhh-dpo": hhh_dpo, "trl-grpo": trl_grpo, "hhh-grpo": hhh_grpo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpo-steps", type=int, default=4)
    parser.add_argument("--grpo-steps", type=int, default=3)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        steps = args.dpo_steps if args.worker.endswith("dpo") else args.grpo_steps
        result = WORKERS[args.worker](steps)
        print("RESULT " + json.dumps({**result, "peak_gb": peak_gb()}))
        return
    results = {}
    for name in WORKERS:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--dpo-steps", str(args.dpo_steps),
                               "--grpo-steps", str(args.grpo_steps)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[0][7:])
        r = results[name]
        print(f"{name:9s} {r['s_per_step']:6.2f} s/step  peak {r['peak_gb']:.2f} GB  ({r['steps']} steps)", flush=True)
    for task in ("dpo", "grpo"):
        h, t = results[f"hhh-{task}"], results[f"trl-{task}"]
        print(f"{task}: hhh/TRL time per step {h['s_per_step'] / t['s_per_step']:.2f}x, "
              f"peak memory {h['peak_gb'] / t['peak_gb']:.2f}x")


if __name__ == "__main__":
    main()
