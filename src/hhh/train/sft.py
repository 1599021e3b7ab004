"""Supervised fine-tuning (SFT) of a LoRA adapter on demonstrations, with the loss on response tokens only.

    # 1. demonstrations: JSONL / hf: / preference store; a held-out share, split by prompt (seeded)
    # 2. tokens: chat-templated prompt + response + EOS; batches of similar length (length bucketing) or shuffled
    # 3. eval loss: token-mean NLL of the held-out responses at T = 1, before training and after every epoch
    # 4. epochs over the batches in a shuffled order: token-mean NLL of the response tokens (prompt tokens and
    #    padding carry no loss), micro-batches accumulate their share, clip, step; one log line per step
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext

import numpy as np
import torch

from hhh import losses as L
from hhh import metrics as M
from hhh.config import SFTConfig
from hhh.data.demos import Demos, load_demos
from hhh.models.policy import Policy
from hhh.rollout import Tokens, chat_prompt_ids, prompt_response_tokens
from hhh.runs import RunDir
from hhh.train.loop import GracefulStop, Trained, chunks, clip_and_step, linear_decay

TRUNK_CACHE_BYTES = 1 << 30  # cache the frozen layers' output for every batch when it fits in this


def split_demos(demos: Demos, fraction: float, seed: int) -> tuple[Demos, Demos]:
    """(train, held out): a seeded `fraction` of the distinct prompts, with all their demonstrations, is held out,
    so no held-out prompt is seen in training. At least one prompt stays in training."""
    keys = [p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in demos.prompts]
    distinct = list(dict.fromkeys(keys))
    n_held = min(int(round(fraction * len(distinct))), len(distinct) - 1)
    held = {distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))[:n_held]}
    return (demos.take([i for i, k in enumerate(keys) if k not in held]),
            demos.take([i for i, k in enumerate(keys) if k in held]))


def batches(demos: Demos, tokenizer, config: SFTConfig, device) -> list[Tokens]:
    """A fixed partition into batches of `batch_size`: by length (bucketing: each batch pads to its own longest
    row, which is close to the others) or in a seeded random order."""
    if not len(demos):
        return []
    if config.bucket:
        prompt_len = [len(ids) for ids in chat_prompt_ids(tokenizer, demos.prompts)]
        response_len = [min(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1, config.max_response_tokens)
                        for r in demos.responses]
        order = np.argsort(np.add(prompt_len, response_len), kind="stable").tolist()
    else:
        order = np.random.default_rng(config.seed).permutation(len(demos)).tolist()
    out = []
    for part in chunks(len(order), config.batch_size):
        b = demos.take(order[part])
        out.append(prompt_response_tokens(tokenizer, b.prompts, b.responses, config.max_response_tokens, device,
                                          ended=b.ends()))
    return out


def nll(policy: Policy, tokens: Tokens, n_tokens: float | None = None) -> torch.Tensor:
    """The SFT loss of a batch (or, with the minibatch's `n_tokens`, a micro-batch's share of it)."""
    return L.sft_loss(policy(tokens, temperature=1.0).logprobs, tokens.response_mask, n_tokens)


@torch.no_grad()
def eval_loss(policy: Policy, held: list[Tokens]) -> float | None:
    """Token-mean NLL over every held-out response token (None without held-out data)."""
    total = sum(float(b.response_mask.sum()) for b in held)
    if not total:
        return None
    return sum(float(nll(policy, b, total)) for b in held)


def train(config: SFTConfig, run: RunDir, *, base, tokenizer, console=None, resume: bool = False) -> Trained:
    """The jobs table's entry: demonstrations from `config.data`, then `train_sft`."""
    if not config.data:
        raise ValueError("hhh sft needs demonstrations: --data FILE.jsonl, hf:NAME[:SPLIT] or db:PATH")
    demos = load_demos(config.data, source=config.data_source, labelers=config.labelers, limit=config.max_examples)
    return train_sft(config, run, demos, base=base, tokenizer=tokenizer, console=console)


def train_sft(config: SFTConfig, run: RunDir, demos: Demos, *, base, tokenizer, console=None) -> Trained:
    """Train a LoRA adapter on `demos`; saves RUN/adapter, logs one line per step and the eval loss per epoch."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hhh.models.policy import build_policy

    console = console or Console(stderr=True)
    policy = build_policy(base, config.lora(), seed=config.seed)
    device = next(policy.parameters()).device
    # 1.-2. split, tokens, batches
    train_demos, held_demos = split_demos(demos, config.eval_fraction, config.seed)
    train_batches = batches(train_demos, tokenizer, config, device)
    held_batches = batches(held_demos, tokenizer, config, device)
    tokens = sum(float(b.response_mask.sum()) for b in train_batches)
    console.print(f"SFT on {len(train_demos)} demonstrations ({tokens:.0f} response tokens), {len(held_demos)} held out")
    run.write_json("sft_data.json", {"train": len(train_demos), "held_out": len(held_demos),
                                     "response_tokens": tokens, "source": config.data or "given"})
    width = sum(b.ids().numel() for b in train_batches + held_batches) * base.config.hidden_size * 4
    cache = policy.frozen_trunk(*train_batches, *held_batches) if width <= TRUNK_CACHE_BYTES else nullcontext()
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = linear_decay(optimizer, config.epochs * len(train_batches))
    columns = (TextColumn("SFT"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    step, before, last = 0, None, None
    with cache, GracefulStop(console) as stop, Progress(*columns, console=console, transient=False) as bar:
        # 3. the eval loss before training
        before = last = eval_loss(policy, held_batches)
        if before is not None:
            run.log({"step": 0, "epoch": 0, M.SFT_EVAL_LOSS: before})
        task = bar.add_task("", total=config.epochs * len(train_batches))
        for epoch in range(config.epochs):
            # 4. one optimizer step per batch, in a new order each epoch
            for j in np.random.default_rng([config.seed, epoch]).permutation(len(train_batches)).tolist():
                t_step, batch = time.time(), train_batches[j]
                optimizer.zero_grad(set_to_none=True)
                n_tokens, loss = float(batch.response_mask.sum()), 0.0
                for part in chunks(len(batch), config.micro_batch_size):
                    micro = nll(policy, batch[torch.arange(len(batch))[part]], n_tokens)
                    micro.backward()
                    loss += float(micro.detach())
                grad_norm = clip_and_step(policy.trainable_parameters(), optimizer, scheduler, config.max_grad_norm)
                step += 1
                run.log({"step": step, "epoch": epoch, M.LOSS_SFT: loss, M.GRAD_NORM: float(grad_norm),
                         M.LR: scheduler.get_last_lr()[0], "time/step_s": time.time() - t_step})
                bar.update(task, completed=step, description=f"loss {loss:.3f}")
                if stop.requested:
                    break
            last = eval_loss(policy, held_batches)
            if last is not None:
                run.log({"step": step, "epoch": epoch + 1, M.SFT_EVAL_LOSS: last})
                console.print(f"epoch {epoch + 1}: held-out loss {last:.3f} (before training {before:.3f})")
            if stop.requested:
                console.print("stopped early (Ctrl-C): saving the adapter as it is")
                break
    policy.save(run.path / "adapter")
    return Trained(policy.lm, {"examples": len(train_demos), "held_out": len(held_demos),
                               "eval_loss_before": before, "eval_loss": last, "steps": step})
