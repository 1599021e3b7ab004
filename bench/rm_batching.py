"""Reward-model training step time: batches of whole prompts (hhh) vs batches of independent pairs.

Both train the packaged MiniLM reward model for the same number of pairs, on rankings of K completions per
prompt (K(K-1)/2 pairs each). Pair batches encode chosen and rejected of every pair (2 forwards per pair);
prompt batches encode each distinct completion once (K forwards per prompt, as in InstructGPT sec. 3.5).
Prints seconds per 100 pairs for each and their ratio, measured in the same process.

    .venv/bin/python bench/rm_batching.py [--k 4] [--prompts 24]
"""

import argparse
import random
import time

import numpy as np
import torch

from hhh.data.pairs import Pairs
from hhh.losses import bradley_terry_loss
from hhh.models.reward_model import build_reward_model
from hhh.train.rm import pair_rewards, prompt_batches

WORDS = "the a cat dog tea bread rain music kind rude thanks idiot lovely awful help please no yes".split()


def toy(prompts: int, k: int) -> Pairs:
    """Random-word prompts (15 words) with K random-word answers (40 words); all K(K-1)/2 pairs of each."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = []
    for _ in range(prompts):
        prompt, answers = words(15), [words(40) for _ in range(k)]
        rows += [(prompt, answers[a], answers[b]) for a in range(k) for b in range(a + 1, k)]
    return Pairs([p for p, _, _ in rows], [c for _, c, _ in rows], [r for _, _, r in rows], [False] * len(rows),
                 [None] * len(rows))


def run(pairs: Pairs, batches: list[list[int]]) -> float:
    torch.manual_seed(0)
    model = build_reward_model("minilm", seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    start = time.perf_counter()
    for index in batches:
        r_c, r_r = pair_rewards(model, pairs.take(index))
        loss = bradley_terry_loss(r_c, r_r)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch-pairs", type=int, default=24)
    args = parser.parse_args()
    pairs = toy(args.prompts, args.k)
    n = len(pairs)
    by_prompt = prompt_batches(pairs, args.batch_pairs, np.random.default_rng(0))
    order = np.random.default_rng(0).permutation(n).tolist()
    by_pair = [order[i:i + args.batch_pairs] for i in range(0, n, args.batch_pairs)]
    t_pair = run(pairs, by_pair)
    t_prompt = run(pairs, by_prompt)
    print(f"{n} pairs from {args.prompts} prompts x K={args.k}, ~{args.batch_pairs} pairs per step")
    print(f"independent pair batches : {100 * t_pair / n:6.2f} s per 100 pairs")
    print(f"whole-prompt batches     : {100 * t_prompt / n:6.2f} s per 100 pairs")
    print(f"ratio (prompt / pair)    : {t_prompt / t_pair:.2f}x the time")


if __name__ == "__main__":
    main()
