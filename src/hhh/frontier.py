"""The reward-vs-KL frontier (`hhh frontier`): which method buys the most held-out reward per nat of KL.

After Figure 2 of the DPO paper (Rafailov et al. 2023): every method trains on the detox task at several
KL strengths, each adapter is scored on held-out prompts, and held-out reward is plotted against KL to the
reference, one curve per method, all starting from the base model at KL 0.

  1. base model: load once, score it on the eval prompts (the KL = 0 point)
  2. DPO pairs: sampled once from the base on the training prompts, ranked by the reward, shared by every beta
  3. for each method and strength: train a LoRA adapter on the shared base (PPO, GRPO, RLOO: the same
     steps; DPO: the shared pairs), score it on the eval prompts with the same seed, remove the adapter
  4. points.jsonl (one line per finished run: a resumed frontier skips those), frontier.md, frontier.png

The KL of a point is measured on its own eval samples: the mean over completions of sum_t log pi/ref (k1).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from hhh import metrics as M
from hhh.config import FrontierConfig, OnlineSettings, PolicyJobSettings
from hhh.jobs import JOBS, check_prompt_sets, reopen_run, trained_adapter
from hhh.runs import RunDir

# method -> (the command whose trainer it runs, the KL-strength setting varied)
METHODS = {"ppo": ("detox", "kl_coef"), "grpo": ("grpo", "beta"), "rloo": ("rloo", "kl_coef"), "dpo": ("dpo", "beta")}
LABELS = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}


def method_config(config: FrontierConfig, method: str, strength: float, out: Path, pairs: Path | None = None):
    """The config of one frontier run: the frontier's model, LoRA, sampling, prompts and reward, the method's
    KL coefficient set to `strength` and held fixed (no KL-budget guard raising it), no held-out split (every
    training prompt trains; the frontier's own eval is the held-out score); DPO trains on the shared `pairs`."""
    command, field = METHODS[method]
    cls = JOBS[command].config
    shared = set(PolicyJobSettings.model_fields) - {"eval", "out"}
    values: dict[str, Any] = {**config.model_dump(include=shared), field: strength, "out": str(out)}
    if issubclass(cls, OnlineSettings):
        values.update(kl_budget=None, val_prompts=0)
        if config.steps is not None:
            values["steps"] = config.steps
    else:
        if config.dpo_pair_prompts is not None:
            values["pair_prompts"] = config.dpo_pair_prompts
        if pairs is not None:
            values["data"] = str(pairs)
    return cls(**values)


def point_name(method: str, strength: float) -> str:
    return f"{method}-{METHODS[method][1]}-{strength:g}"


def _point(method: str, strength: float | None, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"method": method, "kl_field": METHODS[method][1] if method in METHODS else None,
            "strength": strength, "kl": metrics.get(M.KL_EVAL, 0.0), "reward": metrics[M.REWARD_MEAN],
            "toxicity": metrics[M.TOXICITY], "toxicity_ci95": metrics[M.TOXICITY + "_ci95"],
            "frac_toxic": metrics[M.TOXIC_FRACTION], "vader_neg": metrics[M.VADER_NEG],
            "distinct_2": metrics[M.DISTINCT_2], "length": metrics[M.LENGTH], "seconds": round(seconds, 1)}


def read_points(run: RunDir) -> list[dict[str, Any]]:
    path = run.path / "points.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _add_point(run: RunDir, point: dict[str, Any]) -> None:
    with open(run.path / "points.jsonl", "a") as f:
        f.write(json.dumps(point) + "\n")


def _dpo_pairs(config: FrontierConfig, run: RunDir, base, tokenizer, console):
    """2. pairs sampled once from the base, kept in the run folder (a resumed frontier reads them back)."""
    from hhh.train.dpo import build_pairs

    path = run.path / "pairs.jsonl"
    if not path.is_file():
        pairs = build_pairs(method_config(config, "dpo", config.dpo_beta[0], run.path), base, tokenizer, console)
        if not len(pairs):
            raise ValueError("the base model's samples gave no DPO pairs (every prompt's samples scored alike)")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                               for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True)))
        tmp.replace(path)
    return path


def frontier(config: FrontierConfig | None = None, *, resume: str | None = None, console=None) -> RunDir:
    """Run (or resume) the frontier; returns the run folder with points.jsonl, frontier.md and frontier.png.

    >>> run = frontier(FrontierConfig(quick=True, methods=["grpo", "dpo"]))  # doctest: +SKIP
    >>> [(p["method"], p["kl"], p["reward"]) for p in read_points(run)]  # doctest: +SKIP
    """
    from rich.console import Console

    from hhh.evaluate import evaluate, set_and_samples
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import seed_everything
    from hhh.train.loop import GracefulStop

    console = console or Console()
    if resume:
        config, run = reopen_run(FrontierConfig, resume, console)
    else:
        config = (config or FrontierConfig()).resolved()
        check_prompt_sets([config.prompts, *config.eval.prompts])  # fail before a model loads
        run = RunDir.create("frontier", config, config.out)
    key = set_and_samples(config.eval.prompts[0], config.eval.samples)[0]  # the eval set's name in results
    done = {p["name"] for p in read_points(run)}
    todo = [(m, s) for m in config.methods for s in config.strengths(m) if point_name(m, s) not in done]
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    with GracefulStop(console) as stop:
        # 1. the base model: KL 0
        if "base" not in done:
            t0 = time.time()
            console.print("[bold]base model")
            metrics = evaluate(config.eval_config(reward=config.scorer), model=base, tokenizer=tokenizer, run=run,
                               console=console, tag="base")[key]
            _add_point(run, {"name": "base", **_point("base", None, metrics, time.time() - t0)})
        pairs = _dpo_pairs(config, run, base, tokenizer, console) if any(m == "dpo" for m, _ in todo) else None
        # 3. one adapter per method and strength, each on the same base
        for i, (method, strength) in enumerate(todo):
            if stop.requested:
                break
            name = point_name(method, strength)
            console.print(f"[bold]{len(done) + i}/{len(todo) + len(done)} {LABELS[method]}, "
                          f"{METHODS[method][1]} = {strength:g}")
            shutil.rmtree(run.path / name, ignore_errors=True)  # a run cut short earlier starts over
            cfg = method_config(config, method, strength, run.path / name, pairs if method == "dpo" else None)
            sub = RunDir.create(method, cfg, cfg.out)
            t0 = time.time()
            seed_everything(config.seed)
            with trained_adapter(METHODS[method][0], cfg, sub, base=base, tokenizer=tokenizer, console=console) as trained:
                if not stop.requested:
                    train_s = time.time() - t0
                    metrics = evaluate(config.eval_config(str(sub.path / "adapter"), reward=config.scorer),
                                       model=trained.model, tokenizer=tokenizer, run=sub, console=console)[key]
                    _add_point(run, {"name": name, **_point(method, strength, metrics, time.time() - t0),
                                     "train_seconds": round(train_s, 1)})
    points = read_points(run)
    if stop.requested:
        console.print(f"[yellow]stopped; {len(points)} points kept. Continue with: hhh frontier --resume {run.path}")
        return run
    table = write_table(run, points, config)
    plot_frontier(points, run.path / "frontier.png", scorer=config.scorer)
    console.print(table)
    console.print(f"plot: {run.path / 'frontier.png'}")
    return run


def write_table(run: RunDir, points: list[dict[str, Any]], config: FrontierConfig) -> str:
    """frontier.md: one row per point, by method then KL."""
    order = {m: i for i, m in enumerate(["base", *METHODS])}
    rows = sorted(points, key=lambda p: (order[p["method"]], p["kl"]))
    lines = [f"Held-out score ({config.scorer}) on {config.eval.prompts[0]} "
             f"({config.eval.max_prompts or 'all'} prompts x {config.eval.samples} samples, seed {config.seed}); "
             "KL = mean over completions of sum_t log pi/ref (nats).", "",
             "| method | KL strength | KL (nats) | held-out reward | toxicity [95% CI] | frac > 0.5 | VADER neg "
             "| distinct-2 | minutes |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in rows:
        strength = "-" if p["strength"] is None else f"{p['kl_field']} = {p['strength']:g}"
        lo, hi = p["toxicity_ci95"]
        lines.append(f"| {LABELS.get(p['method'], p['method'])} | {strength} | {p['kl']:.2f} | {p['reward']:.3f} | "
                     f"{p['toxicity']:.3f} [{lo:.3f}, {hi:.3f}] | {p['frac_toxic']:.3f} | {p['vader_neg']:.3f} | "
                     f"{p['distinct_2']:.2f} | {p['seconds'] / 60:.1f} |")
    text = "\n".join(lines) + "\n"
    (run.path / "frontier.md").write_text(text)
    return text


def plot_frontier(points: list[dict[str, Any]], out: Path, *, scorer: str = "toxicity") -> Path:
    """Held-out reward against KL, one line per method through its points in order of KL, each from the base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((p for p in points if p["method"] == "base"), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, marker in zip(METHODS, "osD^", strict=True):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        if not mine:
            continue
        line = ([base] if base else []) + mine
        ax.plot([p["kl"] for p in line], [p["reward"] for p in line], marker=marker, label=LABELS[method])
        for p in mine:
            ax.annotate(f"{p['strength']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
    if base:
        ax.scatter([0], [base["reward"]], color="black", zorder=3, label="base model")
    ax.set_xlabel("KL(policy || reference), nats per completion (held-out prompts)")
    ax.set_ylabel(f"held-out reward ({scorer})")
    ax.set_title("Reward vs KL on held-out red-team prompts (labels: KL coefficient)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
