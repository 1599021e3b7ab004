"""hhh's sampler in the weights' dtype (fp32) against its bf16 copy (Policy.sampler, `--sampler-dtype bfloat16`),
with what the bf16 path costs back: the fp32 old log-probs recomputed over the adapted top layers on the cached
frozen trunk (what a GRPO/RLOO step then runs; PPO recomputes them in every case).

Bundled model (fp32 weights), the default LoRA (r 16, top 10 of 30 layers), the first red-team train prompts,
48 new tokens at temperature 0.7 (EOS allowed: a training rollout), seed 0. Per batch size the three timings
alternate --repeats times after a warm-up of each; medians.

    .venv/bin/python bench/sampler_dtype.py [--batches 16,64] [--repeats 3]
"""

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from vs_trl import cpu_name  # bench/vs_trl.py, beside this script

    from hhh.config import PolicyJobSettings
    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.load import cpu_has_native
    from hhh.models.policy import build_policy
    from hhh.models.spec import DEFAULT_MODEL
    from hhh.rollout import sample
    from hhh.train.groups import old_and_reference_logprobs

    tok = load_tokenizer(DEFAULT_MODEL)
    policy = build_policy(load_causal_lm(DEFAULT_MODEL, device="cpu"), PolicyJobSettings().lora(), seed=0)
    with torch.no_grad():  # an adapter that is not zero, as after a few updates
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, native bf16 matmuls: "
          f"{'yes' if cpu_has_native('bfloat16') else 'no'}; torch {torch.__version__}", flush=True)

    def roll(ctx, prompts):
        with ctx as model:
            return sample(model, tok, prompts, max_new_tokens=48, temperature=0.7,
                          generator=torch.Generator().manual_seed(0))

    def recompute(r):
        with policy.frozen_trunk(r.tokens, micro_batch_size=8):
            old_and_reference_logprobs(policy, r, 8, 0.7)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    print("| batch | fp32 sample s | bf16 sample s | fp32 old log-probs on the trunk s | net speed-up of the rollout "
          "| bf16 tokens | fp32 tokens |")
    print("|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = load_prompts("redteam:train")[:batch]
        fp32, bf16 = roll(policy.sampler(None), prompts), roll(policy.sampler(torch.bfloat16), prompts)  # warm-up
        recompute(bf16)
        times: dict[str, list[float]] = {"fp32": [], "bf16": [], "recompute": [], "refs only": []}
        runs = {"fp32": lambda p=prompts: roll(policy.sampler(None), p),
                "bf16": lambda p=prompts: roll(policy.sampler(torch.bfloat16), p),
                "recompute": lambda r=bf16: recompute(r),
                "refs only": lambda r=fp32: recompute(r)}  # the fp32 rollout: the reference pass alone
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))
        m = {k: statistics.median(v) for k, v in times.items()}
        extra = m["recompute"] - m["refs only"]  # what the old log-probs' pass adds to the reference pass
        print(f"| {batch} | {m['fp32']:.2f} | {m['bf16']:.2f} | {extra:.2f} | "
              f"**{m['fp32'] / (m['bf16'] + extra):.2f}x** | {int(bf16.response_mask.sum())} | "
              f"{int(fp32.response_mask.sum())} |", flush=True)


if __name__ == "__main__":
    main()
