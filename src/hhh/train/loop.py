"""Machinery every training loop shares: prompt batches, schedules, minibatch updates, checkpoints, Ctrl-C, and
`OnlineRun`, the tail of every online RL step (PPO, GRPO, RLOO): KL coefficient, guards, held-out check and best
checkpoint, log, checkpoint, progress."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hhh import distributed as D
from hhh import metrics as M


@dataclass(frozen=True)
class Trained:
    """What every trainer returns to its job (hhh.jobs)."""

    model: Any                  # the base model with the trained adapter on it (a peft.PeftModel)
    summary: dict[str, Any]     # written to summary.json
    stopped: str | None = None  # None, "kl_budget" or "interrupted" ("interrupted" skips evaluation and report)


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of range(n), `size` long (the last one shorter)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def clip_and_step(params, optimizer, scheduler, max_norm: float) -> float:
    """Average the gradients over the processes (a no-op on one), clip their global norm, step the optimizer and
    the learning-rate schedule; returns the norm before clipping (logged as grad_norm)."""
    D.average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()
    return float(norm)


def step_prompts(prompts: Sequence[str], batch_size: int, step: int, seed: int) -> list[str]:
    """The prompts of step `step`: consecutive slices of a per-epoch shuffle, a pure function of
    (step, seed), so a resumed run sees exactly the prompts an uninterrupted one would."""
    out: list[str] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), len(prompts))
        order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        take = min(batch_size - len(out), len(prompts) - offset)
        out += [prompts[i] for i in order[offset : offset + take]]
    return out


SAMPLING, MINIBATCHES, HELD_OUT = 0, 1, 2  # independent random streams


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", stream: int = SAMPLING,
                   rank: int = 0) -> torch.Generator:
    """A fresh generator per (step, stream): a resumed run needs no saved RNG state to draw the same numbers.
    `rank` > 0: another process's own stream (rank 0's is that of a single process)."""
    entropy = np.random.default_rng([seed, step, stream] + ([rank] if rank else [])).integers(2**62)
    return torch.Generator(device=device).manual_seed(int(entropy))


def linear_decay(optimizer: torch.optim.Optimizer, total_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / max(total_updates, 1)))


def _shuffle(n: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)


def first_minibatch(n: int, minibatch_size: int, generator: torch.Generator) -> Tensor:
    """The rows `minibatch_updates` will take for its first optimizer step with this generator (drawn from a copy of
    its state, so the generator itself does not move)."""
    peek = torch.Generator(device=generator.device)
    peek.set_state(generator.get_state())
    return _shuffle(n, peek)[chunks(n, minibatch_size)[0]]


def minibatch_updates(params: list, optimizer, scheduler, n: int, *, epochs: int, minibatch_size: int,
                      micro_batch_size: int, max_grad_norm: float, generator: torch.Generator,
                      micro_loss: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]) -> dict[str, float]:
    """`epochs` passes over the n rows of a batch in shuffled minibatches, one optimizer step each; a minibatch's
    gradient is accumulated over micro-batches (memory). micro_loss(rows, minibatch rows) -> (the micro-batch's
    share of the minibatch loss, statistics to add up). Returns each statistic's mean over optimizer steps."""
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(epochs):
        order = _shuffle(n, generator)
        for mb in chunks(n, minibatch_size):
            idx = order[mb]
            optimizer.zero_grad(set_to_none=True)
            stats: dict[str, float] = {}
            for micro in chunks(len(idx), micro_batch_size):
                loss, parts = micro_loss(idx[micro], idx)
                loss.backward()
                for k, v in parts.items():
                    stats[k] = stats.get(k, 0.0) + v
            stats[M.GRAD_NORM] = clip_and_step(params, optimizer, scheduler, max_grad_norm)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


class Checkpoints:
    """RUN/checkpoints/last: the saved parts (adapter, value head...), optimizer, scheduler, trainer state.

    Written to a temporary folder and renamed, so a kill during a save keeps the previous one.
    """

    def __init__(self, run_path: Path) -> None:
        self.root = Path(run_path) / "checkpoints"
        self.last = self.root / "last"

    def save(self, parts: Sequence, optimizer, scheduler, state: dict) -> Path:
        tmp = self.root / "last.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for part in parts:  # each writes its own files into the folder
            part.save(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        old = self.root / "last.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.last.exists():
            os.replace(self.last, old)
        os.replace(tmp, self.last)
        shutil.rmtree(old, ignore_errors=True)
        return self.last

    def exists(self) -> bool:
        return (self.last / "state.json").is_file()

    def load(self, parts: Sequence, optimizer, scheduler) -> dict:
        if not self.exists():
            raise FileNotFoundError(f"no checkpoint in {self.root} to resume from")
        for part in parts:
            part.load(self.last)
        blob = torch.load(self.last / "optim.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        return json.loads((self.last / "state.json").read_text())


class GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once.

    Nested (a training loop inside a job that runs several, like `hhh frontier`), a Ctrl-C is also seen by
    the enclosing GracefulStop."""

    def __init__(self, console=None) -> None:
        self.requested = False
        self.console = console
        self._previous: Any = None  # the SIGINT handler this one replaced

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        outer = getattr(self._previous, "__self__", None)
        if isinstance(outer, GracefulStop):
            outer.requested = True
        msg = "Ctrl-C: finishing this step, then saving a checkpoint (press again to abort now)"
        print(msg) if self.console is None else self.console.print(f"[yellow]{msg}")

    def __enter__(self) -> GracefulStop:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C raises as usual
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def split_prompts(prompts: Sequence[str], val_prompts: int) -> tuple[list[str], list[str]]:
    """(train, val): the last `val_prompts` of the training set are held out for the best-checkpoint metric."""
    if val_prompts >= len(prompts):
        raise ValueError(f"val_prompts={val_prompts} leaves no training prompts (set has {len(prompts)})")
    cut = len(prompts) - val_prompts
    return list(prompts[:cut]), list(prompts[cut:])


@torch.no_grad()
def held_out(policy, tokenizer, prompts: Sequence[str], reward, second, config) -> dict[str, float]:
    """Reward and second judge on the held-out prompts, sampled with the same noise at every check."""
    from hhh.engines import sampler_dtype
    from hhh.rollout import sample

    gen = step_generator(config.seed, 0, next(policy.parameters()).device, HELD_OUT)
    with policy.sampler(sampler_dtype(config, policy)) as model:  # as the steps' rollouts are sampled
        r = sample(model, tokenizer, list(prompts), max_new_tokens=config.max_new_tokens,
                   temperature=config.temperature, generator=gen)
    return {M.VAL_REWARD: float(reward.score(prompts, r.texts).mean()),
            M.VAL_SECOND: float(second.score(prompts, r.texts).mean())}


def sample_stats(prompts: Sequence[str], rollout, second) -> dict[str, float]:
    """What a step's samples look like: length, EOS rate, diversity, repetition, and the second judge's score."""
    from hhh.evaluate import distinct_n, repetition_rate

    return {M.LENGTH: float(rollout.lengths.float().mean()), M.EOS_RATE: float(rollout.ended.float().mean()),
            M.DISTINCT_2: distinct_n(rollout.texts, 2), M.REPETITION_3: repetition_rate(rollout.texts, 3),
            M.SECOND_MEAN: float(second.score(prompts, rollout.texts).mean())}


class OnlineRun:
    """The part of an online RL run (PPO, GRPO, RLOO) that is not the method: the KL coefficient, guards,
    held-out checks and the best checkpoint, the log, checkpoints and resume, the progress bar and Ctrl-C.

        with OnlineRun("GRPO", config, run, ...) as loop:
            for step in loop.steps():
                ...                                   # the method's own step, into a dict of metrics
                loop.finish(metrics, samples=n, t0=t0)
        loop.save(run.path / "adapter")
    """

    def __init__(self, name: str, config, run, *, policy, parts: Sequence, optimizer, scheduler, kl, reward,
                 second, tokenizer, val: Sequence[str], console=None, resume: bool = False,
                 stateful: dict[str, Any] | None = None) -> None:
        from hhh.train.guards import Guards

        self.name, self.config, self.run, self.policy, self.parts = name, config, run, policy, list(parts)
        self.optimizer, self.scheduler, self.kl = optimizer, scheduler, kl
        self.reward, self.second, self.tokenizer, self.val, self.console = reward, second, tokenizer, val, console
        self.stateful = stateful or {}
        self.guards = Guards.from_settings(config)
        self.checkpoints = Checkpoints(run.path)
        self.state: dict[str, Any] = {"step": 0, "best_step": None, "best_val": None}
        if resume:
            self.state = self.checkpoints.load(self.parts, optimizer, scheduler)
            self._load_kl(self.state)
            self.guards.load_state_dict(self.state.pop("guards"))
            for key, obj in self.stateful.items():
                obj.load_state_dict(self.state.pop(key))
        self.step: int = self.state["step"]
        self.stopped: str | None = None

    def _load_kl(self, state: dict) -> None:
        if "kl" in state:
            self.kl.load_state_dict(state.pop("kl"))
        elif "kl_ctl" in state:  # PPO checkpoints written before the loops shared this class
            self.kl.load_state_dict(state.pop("kl_ctl"))
        elif "kl_coef" in state:  # GRPO/RLOO checkpoints written before the loops shared this class
            self.kl.beta = state.pop("kl_coef")

    def __enter__(self) -> OnlineRun:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._stop = GracefulStop(self.console).__enter__()
        columns = (TextColumn(self.name), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        self._bar = Progress(*columns, console=self.console, transient=False).__enter__()
        self._task = self._bar.add_task("", total=self.config.steps, completed=self.step)
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)
        self._stop.__exit__(*exc)

    def steps(self) -> Iterator[int]:
        """The steps still to run (from the checkpoint when resumed), until the last or a stop."""
        while self.step < self.config.steps and not self.stopped:
            yield self.step

    def finish(self, m: dict[str, Any], *, samples: int, t0: float) -> None:
        """The tail of a step: adapt beta, check the guards (raise beta when over the KL budget), the held-out
        check and best checkpoint, log, progress, checkpoint.

        On several processes `m` is each rank's own; from here on every rank holds their mean (so beta, the guards
        and the stops agree), and rank 0 alone runs the held-out check, logs and writes."""
        step, config, main = self.step + 1, self.config, D.world().main
        m = D.mean_metrics(m)
        samples *= D.world().size
        m[M.KL_BETA] = self.kl.beta  # the coefficient this step used
        self.kl.update(m[M.KL], samples)
        alarms, action = self.guards.check(step, m)
        if action == "raise_beta":
            self.kl.beta *= 1.5
        if main and self.val and (step % config.val_every == 0 or step == config.steps):
            m.update(held_out(self.policy, self.tokenizer, self.val, self.reward, self.second, config))
            if self.state["best_val"] is None or m[M.VAL_REWARD] > self.state["best_val"]:
                self.state["best_val"], self.state["best_step"] = m[M.VAL_REWARD], step
                self.save(self.run.path / "best")
        m["alarms"] = alarms
        m["time/step_s"] = time.time() - t0
        if main:
            self.run.log(m)
        self.step = step
        self._bar.update(self._task, completed=step, description=(
            f"reward {m[M.REWARD_MEAN]:.3f}  KL {m[M.KL]:.2f}  beta {m[M.KL_BETA]:.3f}  {m['time/step_s']:.0f}s/step"
            + (f"  [red]{','.join(alarms)}" if alarms else "")))
        if action == "stop":
            self.stopped = "kl_budget"
        if D.any_rank(self._stop.requested):
            self.stopped = "interrupted"
        if main and (self.stopped or step % config.checkpoint_every == 0 or step == config.steps):
            self.checkpoints.save(self.parts, self.optimizer, self.scheduler, {
                **self.state, "step": step, "kl": self.kl.state_dict(), "guards": self.guards.state_dict(),
                **{key: obj.state_dict() for key, obj in self.stateful.items()}})

    def save(self, folder: Path) -> None:
        """Rank 0 writes; the weights are the same on every rank."""
        if D.world().main:
            for part in self.parts:
                part.save(folder)

    def result(self) -> Trained:
        """Save RUN/adapter; what the job evaluates."""
        self.save(self.run.path / "adapter")
        D.barrier()
        return Trained(self.policy.lm, {"steps": self.step, "best_step": self.state["best_step"]}, self.stopped)
