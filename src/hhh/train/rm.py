"""Reward model training (`hhh rm train`) and evaluation (`hhh rm eval`) on preference pairs.

    # 1. pairs: JSONL, hf:, or the preference store; held-out prompts split off (no prompt on both sides)
    # 2. model: backbone + scalar head (+ LoRA)
    # 3. epochs over shuffled minibatches: chosen and rejected in one forward, Bradley-Terry loss
    # 4. held-out eval after each epoch: pairwise accuracy, loss, calibration
    # 5. normalisation statistics of rewards on the training completions, saved with the model
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from hhh import metrics as M
from hhh.config import RMConfig, RMEvalConfig
from hhh.data.pairs import Pairs, load_pairs
from hhh.losses import bradley_terry_loss
from hhh.runs import RunDir, seed_everything
from hhh.train.loop import GracefulStop, clip_and_step, linear_decay


def split_by_prompt(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Hold out a `fraction` of the prompts (all their pairs), so no held-out prompt was trained on."""
    prompts = sorted(set(pairs.prompts))
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_eval = math.ceil(fraction * len(prompts)) if fraction > 0 else 0
    held = {prompts[i] for i in order[:n_eval]}
    train = [i for i, p in enumerate(pairs.prompts) if p not in held]
    evals = [i for i, p in enumerate(pairs.prompts) if p in held]
    return pairs.take(train), pairs.take(evals)


def pair_rewards(model, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from one forward over the distinct (prompt, completion) texts.

    A prompt ranked with K completions gives K(K-1)/2 pairs but only K texts: batches that hold all pairs of
    their prompts (see `prompt_batches`) run K forwards instead of K(K-1), as InstructGPT does (sec. 3.5).
    """
    texts = list(dict.fromkeys(zip(pairs.prompts * 2, pairs.chosen + pairs.rejected, strict=True)))
    index = {t: i for i, t in enumerate(texts)}
    r = model(**model.encode([p for p, _ in texts], [c for _, c in texts]))
    chosen = torch.tensor([index[t] for t in zip(pairs.prompts, pairs.chosen, strict=True)], device=r.device)
    rejected = torch.tensor([index[t] for t in zip(pairs.prompts, pairs.rejected, strict=True)], device=r.device)
    return r[chosen], r[rejected]


def prompt_batches(pairs: Pairs, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Pair indices in batches of whole prompts (shuffled), each batch closed once it holds >= batch_size pairs."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(pairs.prompts):
        by_prompt.setdefault(p, []).append(i)
    groups = list(by_prompt.values())
    batches, current = [], []
    for g in rng.permutation(len(groups)):
        current += groups[g]
        if len(current) >= batch_size:
            batches.append(current)
            current = []
    return batches + ([current] if current else [])


def evaluate_pairs(model, pairs: Pairs, batch_size: int) -> dict:
    """Pairwise accuracy (ties left out), mean loss and calibration on `pairs`."""
    ordered = [i for i, t in enumerate(pairs.tie) if not t]
    pairs = pairs.take(ordered)
    if not len(pairs):
        return {"pairs": 0}
    texts = list(dict.fromkeys(zip(pairs.prompts * 2, pairs.chosen + pairs.rejected, strict=True)))
    scores = dict(zip(texts, model.score([p for p, _ in texts], [c for _, c in texts], batch_size=batch_size).tolist(),
                      strict=True))
    d = torch.tensor([scores[(p, c)] - scores[(p, r)] for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected,
                                                                          strict=True)], dtype=torch.float64)
    p = torch.sigmoid(d).numpy()
    return {"pairs": len(pairs), "accuracy": float((d > 0).double().mean()),
            "loss": float(-torch.nn.functional.logsigmoid(d).mean()),
            "mean_margin": float(d.mean()), "calibration": _calibration(p)}


def _calibration(p: np.ndarray, bins: int = 10) -> dict:
    """Reliability of P(chosen > rejected) = sigmoid(r_c - r_r): each pair is predicted with confidence
    max(p, 1-p) for the side it favours and is right when p > 1/2. ECE = sum_bins n_b/N |conf_b - acc_b|."""
    conf = np.maximum(p, 1 - p)
    right = (p > 0.5).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    table, ece = [], 0.0
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        inside = (conf >= lo) & ((conf < hi) if i < bins - 1 else (conf <= hi))
        if inside.any():
            c, a = float(conf[inside].mean()), float(right[inside].mean())
            table.append({"confidence": [round(float(lo), 3), round(float(hi), 3)], "n": int(inside.sum()),
                          "mean_confidence": c, "accuracy": a})
            ece += inside.mean() * abs(c - a)
    return {"ece": float(ece), "bins": table}


def train_rm(config: RMConfig, *, console=None) -> RunDir:
    """Train a reward model; returns its run folder (model/, eval.json, metrics.jsonl)."""
    from rich.console import Console
    from rich.progress import Progress

    from hhh.models.load import LoraSettings
    from hhh.models.reward_model import build_reward_model

    console = console or Console(stderr=True)
    pairs = load_pairs(config, skip_ties=config.ties == "skip")  # bad data fails before anything is created
    run = RunDir.create("rm", config, config.out)
    seed_everything(config.seed)
    # 1. pairs and the held-out split
    train, held_out = split_by_prompt(pairs, config.eval_fraction, config.seed)
    if not len(train):
        raise ValueError("no training pairs left after the held-out split")
    console.print(f"{len(train)} training pairs, {len(held_out)} held out ({len(set(held_out.prompts))} prompts)")
    # 2. model
    lora = None if config.lora is None else (LoraSettings(r=config.lora_r, alpha=config.lora_alpha) if config.lora else False)
    model = build_reward_model(config.backbone, lora=lora, max_length=config.max_length, device=config.device,
                               seed=config.seed)
    model.train()
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": config.lr}, {"params": model.head.parameters(), "lr": config.head_lr}],
                                  weight_decay=config.weight_decay)
    steps_per_epoch = len(prompt_batches(train, config.batch_size, np.random.default_rng(0)))
    scheduler = linear_decay(optimizer, steps_per_epoch * config.epochs)
    stop = GracefulStop()
    step, start = 0, time.time()
    report: dict = {}
    # 3. epochs over shuffled minibatches
    with stop, Progress(console=console, transient=True) as bar:
        task = bar.add_task("training reward model", total=steps_per_epoch * config.epochs)
        for epoch in range(config.epochs):
            for index in prompt_batches(train, config.batch_size, np.random.default_rng([config.seed, epoch])):
                batch = train.take(index)
                r_c, r_r = pair_rewards(model, batch)
                margin = torch.tensor([m or 0.0 for m in batch.margin], device=model.device)
                tie = torch.tensor(batch.tie, device=model.device)
                loss = bradley_terry_loss(r_c, r_r, margin=margin, tie=tie, center_coef=config.center_coef)
                optimizer.zero_grad()
                loss.backward()
                clip_and_step(model.parameters(), optimizer, scheduler, 1.0)
                step += 1
                ordered = ~tie
                acc = float(((r_c - r_r) > 0)[ordered].float().mean()) if ordered.any() else float("nan")
                run.log({"step": step, "epoch": epoch, M.LOSS_RM: loss.item(), M.RM_TRAIN_ACCURACY: acc,
                         M.RM_CHOSEN: r_c.mean().item(), M.RM_REJECTED: r_r.mean().item(),
                         "time/elapsed_s": time.time() - start})
                bar.advance(task)
                if stop.requested:
                    break
            # 4. held-out evaluation
            report = evaluate_pairs(model, held_out, config.batch_size) if len(held_out) else {"pairs": 0}
            run.log({"step": step, "epoch": epoch, **{M.RM_EVAL + k: v for k, v in report.items()
                                                      if isinstance(v, int | float)}})
            if "accuracy" in report:
                console.print(f"epoch {epoch + 1}: held-out accuracy {report['accuracy']:.3f} on {report['pairs']} pairs, "
                              f"loss {report['loss']:.3f}, ECE {report['calibration']['ece']:.3f}")
            if stop.requested:
                console.print("stopped early (Ctrl-C): saving the model as it is")
                break
    # 5. normalisation statistics on the training completions
    texts = sorted(set(zip(train.prompts + train.prompts, train.chosen + train.rejected, strict=True)))
    r = model.score([p for p, _ in texts], [c for _, c in texts], batch_size=config.batch_size)
    model.stats = {"mean": float(r.mean()), "std": float(r.std()) if len(r) > 1 else 1.0, "n": len(r)}
    model.save(run.path / "model", extra={"train_pairs": len(train), "held_out_pairs": len(held_out)})
    run.write_json("eval.json", {**report, "train_seconds": time.time() - start, "steps": step,
                                 "stopped_early": stop.requested, "stats": model.stats})
    return run


def eval_rm(config: RMEvalConfig) -> tuple[RunDir, dict]:
    """Accuracy and calibration of a trained reward model on every ordered pair of `config.data`."""
    from hhh.models.reward_model import load_reward_model

    pairs = load_pairs(config, skip_ties=True)
    model = load_reward_model(config.model, device=config.device)
    run = RunDir.create("rm-eval", config, config.out)
    report = evaluate_pairs(model, pairs, config.batch_size)
    run.write_json("eval.json", report)
    return run, report
