"""One run on several processes: data parallelism under `accelerate launch` (or `torchrun`).

    accelerate launch --multi_gpu --num_processes 2 -m hhh.cli grpo ...    # 2 processes (CPU: gloo, GPU: nccl)

Every process (rank) holds the whole model (the trained part is a small LoRA adapter), takes its share of each
step's prompts or pairs, samples with its own seed, and averages its gradients with the others before every
optimizer step, so the weights stay equal on every rank. What depends on the whole batch is computed over it:
reward normalisation, advantage whitening, KL and the logged metrics. Rank 0 alone evaluates, logs, writes the
checkpoints, the adapter and the report; a checkpoint holds no per-rank state, so a run resumes on any number of
processes.

Without a launcher (WORLD_SIZE unset or 1) every function here is the identity or a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def world() -> World:
    """This process's rank and the number of processes; the first call under a launcher joins the process group
    (through accelerate: gloo on CPU, nccl on CUDA)."""
    global _WORLD
    if _WORLD is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            _WORLD = World(state.process_index, state.num_processes)
        else:
            _WORLD = World()
    return _WORLD


def launched_rank() -> int:
    """This process's rank as the launcher set it (RANK), without joining the process group."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether a launcher started several processes (without joining a process group)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device(name: str) -> str:
    """The device a rank runs on: under a launcher each rank its own GPU (LOCAL_RANK) for "cuda" and for "auto"
    when there is one; anything else unchanged."""
    if launched() and torch.cuda.is_available() and name in ("cuda", "auto"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def check_divisible(**counts: int) -> None:
    """Each rank must take an equal share (the same number of optimizer steps on every rank)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))  # checked before the process group is joined
    for name, value in counts.items():
        if value % size:
            raise ValueError(f"{name}={value} must be a multiple of the {size} processes (each takes an equal share)")


def shard(items: Sequence[T]) -> list[T]:
    """This rank's consecutive part of `items` (ranks take parts in order; sizes differ by at most one)."""
    w = world()
    n = len(items)
    return list(items[w.rank * n // w.size:(w.rank + 1) * n // w.size])


def shard_slice(n: int) -> slice:
    """The slice of range(n) that shard() takes."""
    w = world()
    return slice(w.rank * n // w.size, (w.rank + 1) * n // w.size)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (a missing gradient counts as zeros), in one all-reduce."""
    w = world()
    if w.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= w.size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def total(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (every rank passes the same keys)."""
    if world().size == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def mean_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics averaged over the ranks (numbers only, not the step's counters; every rank's metrics have
    the same keys)."""
    size = world().size
    if size == 1:
        return m
    numbers = {k: float(v) for k, v in m.items()
               if k not in ("step", "epoch") and isinstance(v, int | float) and not isinstance(v, bool)}
    return {**m, **{k: v / size for k, v in total(numbers).items()}}


def gather(x: Tensor) -> Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order (sizes may differ)."""
    if world().size == 1:
        return x
    parts: list[Any] = [None] * world().size
    torch.distributed.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts).to(x.device)


def gather_lists(items: list[T]) -> list[T]:
    """The ranks' lists concatenated in rank order."""
    if world().size == 1:
        return items
    parts: list[Any] = [None] * world().size
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a Ctrl-C seen by one process stops them all at the same step)."""
    if world().size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if world().size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world().size > 1:
        torch.distributed.barrier()


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """hhh.losses.masked_whiten over the masked entries of every rank's batch (mean 0, unbiased std 1)."""
    from hhh.losses import masked_whiten as local

    if world().size == 1:
        return local(x, mask, eps=eps)
    s = total({"n": float(mask.sum()), "sum": float((x * mask).sum())})
    mean = s["sum"] / s["n"]
    sq = total({"sq": float((((x - mean) ** 2) * mask).sum())})["sq"]
    var = sq / (s["n"] - 1) if s["n"] > 1 else sq / max(s["n"], 1.0)
    return (x - mean) * torch.rsqrt(torch.tensor(var + eps, dtype=x.dtype, device=x.device)) * mask


def whiten(x: Tensor, eps: float = 1e-8) -> Tensor:
    """hhh.losses.global_whiten over every rank's values (B,)."""
    from hhh.losses import global_whiten

    if world().size == 1:
        return global_whiten(x, eps=eps)
    every = gather(x)
    if every.numel() <= 1:
        return x - every.mean()
    return (x - every.mean()) / (every.std() + eps)
