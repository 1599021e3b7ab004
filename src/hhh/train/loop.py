"""Machinery every training loop shares: prompt batches, schedules, checkpoints, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def clip_and_step(params, optimizer, scheduler, max_norm: float) -> float:
    """Clip the gradients' global norm, step the optimizer and the learning-rate schedule; returns the norm
    before clipping (logged as grad_norm)."""
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


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", stream: int = SAMPLING) -> torch.Generator:
    """A fresh generator per (step, stream): a resumed run needs no saved RNG state to draw the same numbers."""
    entropy = np.random.default_rng([seed, step, stream]).integers(2**62)
    return torch.Generator(device=device).manual_seed(int(entropy))


def linear_decay(optimizer: torch.optim.Optimizer, total_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / max(total_updates, 1)))


class Checkpoints:
    """RUN/checkpoints/last: adapter + value head (PEFT format), optimizer, scheduler, trainer state.

    Written to a temporary folder and renamed, so a kill during a save keeps the previous one.
    """

    def __init__(self, run_path: Path) -> None:
        self.root = Path(run_path) / "checkpoints"
        self.last = self.root / "last"

    def save(self, policy, optimizer, scheduler, state: dict) -> Path:
        tmp = self.root / "last.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        policy.save(tmp)
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

    def load(self, policy, optimizer, scheduler) -> dict:
        if not self.exists():
            raise FileNotFoundError(f"no checkpoint in {self.root} to resume from")
        policy.load(self.last)
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
        self._previous = None

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
