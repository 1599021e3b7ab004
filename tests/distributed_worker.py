"""Run by tests/test_distributed.py under `accelerate launch` with 2 processes: each collective of hhh.distributed on
the ranks' halves of a batch against the same computation on the whole batch in one process."""

import torch

from hhh import distributed as D
from hhh.losses import global_whiten, masked_whiten
from hhh.train.loop import clip_and_step, linear_decay

w = D.world()
assert w.size == 2, w
torch.manual_seed(0)  # the same data on both ranks; each takes its half
x, mask, v = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float(), torch.randn(7)
mine, mine_v = D.shard_slice(6), D.shard_slice(7)

torch.testing.assert_close(D.masked_whiten(x[mine], mask[mine]), masked_whiten(x, mask)[mine])
torch.testing.assert_close(D.whiten(v[mine_v]), global_whiten(v)[mine_v])
assert D.gather(v[mine_v]).tolist() == v.tolist()
assert D.gather_lists([w.rank] * (w.rank + 1)) == [0, 1, 1]
assert D.shard(list("abcde")) == (["a", "b"] if w.rank == 0 else ["c", "d", "e"])
assert D.total({"a": w.rank + 1.0, "b": 0.5}) == {"a": 3.0, "b": 1.0}
assert D.mean_metrics({"step": 4, "r": float(w.rank), "alarms": ["x"]}) == {"step": 4, "r": 0.5, "alarms": ["x"]}
assert D.any_rank(w.rank == 1) is True and D.any_rank(False) is False
assert D.broadcast(f"from rank {w.rank}") == "from rank 0"

# one optimizer step: each rank backpropagates its share of the batch's mean loss times the number of ranks (as the
# trainers do); averaged gradients give the weights one process gets from the whole batch. `q` gets no gradient on
# rank 1 (a rank with nothing to do in a minibatch) and still takes part in the all-reduce.
data = torch.randn(7, 5)


def step(rows: slice, scale: float) -> list[torch.Tensor]:
    torch.manual_seed(1)
    p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p, q], lr=0.1)
    part = data[rows]
    loss = ((part @ p) ** 2).sum() / len(data) * scale
    first = [i for i in range(rows.start, rows.stop) if i < 3]  # rank 0's rows
    if first:
        loss = loss + (data[first] @ q).sum() / len(data) * scale
    loss.backward()
    clip_and_step([p, q], opt, linear_decay(opt, 10), max_norm=1.0)
    return [p.detach().clone(), q.detach().clone()]


distributed = step(D.shard_slice(7), scale=2.0)
saved, D._WORLD = D._WORLD, D.World()  # the same step alone: the whole batch, no averaging
alone = step(slice(0, 7), scale=1.0)
D._WORLD = saved
for a, b in zip(distributed, alone, strict=True):
    torch.testing.assert_close(a, b)
print(f"rank {w.rank}: ok", flush=True)
