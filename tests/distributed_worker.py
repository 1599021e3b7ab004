"""Run by tests/test_distributed.py under `accelerate launch` with 2 processes: each collective of hhh.distributed on
the ranks' halves of a batch against the same computation on the whole batch in one process, and an evaluation
split between the ranks."""

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

# evaluation: each rank samples its consecutive share (rank 0 with a single process's seed), every rank gets the
# metrics and samples of the whole set, in order
from hhh.config import EvalConfig  # noqa: E402
from hhh.evaluate import evaluate_set, evaluation_seed  # noqa: E402
from hhh.models import DEFAULT_MODEL, load_tokenizer, tiny_causal_lm  # noqa: E402
from hhh.rewards.builtin import Sentiment, Toxicity  # noqa: E402

tokenizer = load_tokenizer(DEFAULT_MODEL)
model = tiny_causal_lm(tokenizer, seed=0)
prompts = ["Say hi", "Name a colour", "What is 2 + 2?", "Tell me a joke", "Describe the sea"]
config = EvalConfig(samples_per_prompt=1, batch_size=2, max_new_tokens=5, seed=3)
judges = {"reward": Toxicity(), "toxicity": Toxicity(), "sentiment": Sentiment()}
sampled: list[int] = []
split = evaluate_set(model, tokenizer, "set", prompts, config, **judges, has_adapter=False, progress=sampled.append)
assert sum(sampled) == (2 if w.rank == 0 else 3), sampled  # this rank's share only
assert [s["prompt"] for s in split.samples] == prompts and split.metrics["n"] == 5
assert D.broadcast(split.samples) == split.samples and D.broadcast(split.metrics) == split.metrics
whole = torch.tensor([s["offensive"] for s in split.samples])
assert abs(split.metrics["toxicity/mean"] - float(whole.mean())) < 1e-7  # over the whole set, not this rank's share
saved, D._WORLD = D._WORLD, D.World()  # each share again in one process, with that rank's seed
for rank, share in ((0, slice(0, 2)), (1, slice(2, 5))):
    alone = evaluate_set(model, tokenizer, "set", prompts[share], config.model_copy(update={
        "seed": evaluation_seed(config.seed, rank)}), **judges, has_adapter=False)
    assert alone.samples == split.samples[share], rank
D._WORLD = saved
assert evaluation_seed(config.seed, 0) == config.seed  # rank 0's share is what a single process samples first
print(f"rank {w.rank}: ok", flush=True)
