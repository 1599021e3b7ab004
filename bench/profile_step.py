"""Where a GRPO step's time goes: torch's profiler over one step on the bundled model (after a warm-up step), by
phase (rollout, reference pass, update, scoring) and by operator.

The same setting as bench/vs_trl.py's GRPO row: 16 completions (4 prompts x 4), 48 new tokens at temperature 0.7,
fp32, LoRA r 16 on the top 10 layers. The phases are marked by wrapping functions of hhh.engines and
hhh.train.groups in record_function (nothing in hhh changes). Prints two tables; --out FILE also writes them as markdown.

    .venv/bin/python bench/profile_step.py [--out docs/profile-grpo.md]
"""

import argparse
import functools
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = {("engines", "sample"): "1. rollout (prefill + 48 decode steps)",
          ("groups", "old_and_reference_logprobs"): "3. reference pass",
          ("groups", "update"): "5. update (forward + backward + AdamW)"}


def marked(module, name: str, label: str):
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with record_function(label):
            return fn(*a, **kw)

    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args()

    from rich.console import Console

    import hhh.engines as engines
    import hhh.train.groups as groups
    from hhh.config import GRPOConfig
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.spec import DEFAULT_MODEL
    from hhh.runs import RunDir
    from hhh.train.grpo import train

    for (module, name), label in PHASES.items():
        marked({"engines": engines, "groups": groups}[module], name, label)
    tok, model = load_tokenizer(DEFAULT_MODEL), load_causal_lm(DEFAULT_MODEL, device="cpu")
    config = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, minibatch_size=16, beta=0.04, lr=1e-3,
                        val_prompts=0, out="/tmp/profile-grpo")
    run = RunDir.create("grpo", config, config.out, exist_ok=True)
    (run.path / "metrics.jsonl").unlink(missing_ok=True)

    # step 1 is the warm-up; the profiler records step 2 only (schedule: skip the first logged step)
    seen = {"steps": 0}
    real_log = run.log

    def log(m):
        real_log(m)
        seen["steps"] += 1
        if seen["steps"] == 1:
            prof.start()

    run.log = log  # type: ignore[method-assign]
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    t0 = time.time()
    train(config, run, base=model, tokenizer=tok, console=Console(quiet=True))
    prof.stop()
    step_s = run.metrics()[-1]["time/step_s"]
    events = prof.key_averages()
    total = step_s * 1e6
    lines = [f"GRPO step on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}: {step_s:.2f} s (profiled; {time.time() - t0:.0f} s for both steps)", "",
             "| phase | seconds | share of the step |", "|---|---|---|"]
    accounted = 0.0
    for label in PHASES.values():
        ev = [e for e in events if e.key == label]
        if ev:
            us = ev[0].cpu_time_total
            accounted += us
            lines.append(f"| {label} | {us / 1e6:.2f} | {us / total:.0%} |")
    lines.append(f"| the rest (reward, KL, logging, Python) | {(total - accounted) / 1e6:.2f} | "
                 f"{(total - accounted) / total:.0%} |")
    lines += ["", "| operator | self seconds | share of the step | calls |", "|---|---|---|---|"]
    ops = sorted((e for e in events if e.key not in PHASES.values()), key=lambda e: -e.self_cpu_time_total)
    for e in ops[:15]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} | "
                     f"{e.count} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
