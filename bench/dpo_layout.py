"""DPO with a pair's prompt once (PairTokens, `share_prompt` true: the default) against two rows per pair (false),
in one run: the frozen trunk, the reference pass and the training steps of `train_dpo`'s own code, timed apart.

The benchmark's DPO setting (bench/vs_trl.py): the bundled model in fp32, the default LoRA (r 16, top 10 of 30
layers), red-team train prompts with ~40-word random answers, minibatches of 8 pairs in micro-batches of 4,
beta 0.1. Each repeat runs both layouts on the same minibatches, in alternating order, after a warm-up of each;
medians. Also prints each layout's token positions per minibatch and checks that both give the same losses.
With --profile, torch's profiler over one minibatch of the shared layout (trunk, reference pass, training step)
and its busiest operators.

    .venv/bin/python bench/dpo_layout.py [--minibatches 4] [--repeats 3] [--profile]
"""

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minibatches", type=int, default=4, help="minibatches of 8 pairs per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also profile one minibatch of the shared layout")
    args = ap.parse_args()

    from vs_trl import MODEL, cpu_name, pairs  # bench/vs_trl.py, beside this script

    from hhh.config import DPOConfig
    from hhh.data.pairs import Pairs
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.policy import build_policy
    from hhh.train.dpo import minibatches, preference_loss, sequence_logps

    tok = load_tokenizer(MODEL)
    policy = build_policy(load_causal_lm(MODEL), DPOConfig().lora(), seed=0)
    rows = pairs(8 * args.minibatches)
    data = Pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                 [False] * len(rows), [None] * len(rows))
    configs = {share: DPOConfig(batch_size=8, micro_batch_size=4, beta=0.1, share_prompt=share)
               for share in (True, False)}
    batches = {share: minibatches(data, tok, config, "cpu") for share, config in configs.items()}
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{args.minibatches} minibatches of 8 pairs", flush=True)

    def run(share: bool) -> tuple[float, float, float, list[float]]:
        """Seconds for the trunk, the reference pass and the training steps (fwd + bwd; no optimizer step, so
        every repeat sees the same weights), and each minibatch's loss."""
        config, mbs = configs[share], batches[share]
        t0 = time.perf_counter()
        with policy.frozen_trunk(*(mb.tokens for mb in mbs)):
            t1 = time.perf_counter()
            with torch.no_grad():
                refs = [sequence_logps(policy, mb.tokens, reference=True) for mb in mbs]
            t2 = time.perf_counter()
            losses = []
            for mb, ref in zip(mbs, refs, strict=True):
                policy.zero_grad(set_to_none=True)
                total = 0.0
                for i in range(0, mb.pairs, config.micro_batch_size):
                    idx, part = mb.rows(slice(i, i + config.micro_batch_size))
                    loss = preference_loss(config, sequence_logps(policy, part), (ref[0][idx], ref[1][idx]))
                    (loss * len(idx) / (2 * mb.pairs)).backward()
                    total += float(loss.detach()) * len(idx) / (2 * mb.pairs)
                losses.append(total)
            t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, losses

    with torch.no_grad():  # an adapter that is not zero, as after a few updates
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    for share in (True, False):
        run(share)  # warm-up
    times: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    losses = {}
    for k in range(args.repeats):
        for share in ((True, False) if k % 2 == 0 else (False, True)):
            *t, losses[share] = run(share)
            times[share].append(tuple(t))
    worst = max(abs(a - b) for a, b in zip(losses[True], losses[False], strict=True))
    positions = {share: sum(mb.tokens.ids().numel() for mb in batches[share]) // args.minibatches
                 for share in (True, False)}

    def med(share: bool, i: int | None) -> float:
        return statistics.median(sum(t) if i is None else t[i] for t in times[share])

    print(f"\nmedians of {args.repeats}; losses equal within {worst:.1e}\n")
    print("| | token positions per minibatch | trunk s | reference s | training s | total s |")
    print("|---|---|---|---|---|---|")
    for share, name in ((False, "two rows per pair"), (True, "the prompt once (share_prompt)")):
        print(f"| {name} | {positions[share]} | {med(share, 0):.2f} | {med(share, 1):.2f} | {med(share, 2):.2f} "
              f"| {med(share, None):.2f} |")
    print(f"| two rows / prompt once | {positions[False] / positions[True]:.2f}x | "
          + " | ".join(f"{med(False, i) / med(True, i):.2f}x" for i in (0, 1, 2, None)) + " |")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            batches[True] = batches[True][:1]
            trunk, reference, training, _ = run(True)
            wall = time.perf_counter() - start
        print(f"\none minibatch of 8 pairs, shared layout, under the profiler: trunk {trunk:.2f} s, reference "
              f"{reference:.2f} s, training {training:.2f} s\n")
        print("| operator | self seconds | share | calls |\n|---|---|---|---|")
        for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]:
            seconds = e.self_cpu_time_total / 1e6
            print(f"| `{e.key}` | {seconds:.2f} | {seconds / wall:.0%} | {e.count} |")


if __name__ == "__main__":
    main()
