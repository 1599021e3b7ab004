"""Rollout tokens/s on a GPU: hhh's sampler (adapter merged) against vLLM with the adapter handed over each step
(hhh.engines.VLLMRollouts, the training model's log-prob pass included), same policy, prompts and settings.

Needs a CUDA GPU and `pip install vllm`; never part of the CPU install or of CI. Not yet run in this project (no
GPU has been lent to it): the first run on a GPU machine is also the check that the vLLM path works.

    python bench/vllm_rollout.py [--batch 64] [--new-tokens 48] [--repeats 3]
"""

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from hhh.config import GRPOConfig
    from hhh.data import load_prompts
    from hhh.engines import rollout_engine, vllm_unavailable
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.policy import build_policy

    why = vllm_unavailable()
    if why:
        raise SystemExit(f"vLLM cannot run here: {why}")
    config = GRPOConfig(max_new_tokens=args.new_tokens, micro_batch_size=16)
    tok = load_tokenizer(config.model)
    policy = build_policy(load_causal_lm(config.model, device="cuda"), config.lora(), seed=0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)  # a trained-looking adapter, so that both engines really apply it
    prompts = load_prompts("redteam:train")[: args.batch]
    for engine in ("hhh", "vllm"):
        rollouts = rollout_engine(config.model_copy(update={"rollout_engine": engine}), policy, tok)
        rollouts(prompts, 0, torch.Generator(device="cuda").manual_seed(0))  # warm-up
        times, tokens = [], 0
        for step in range(1, args.repeats + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = rollouts(prompts, step, torch.Generator(device="cuda").manual_seed(step))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            tokens = int(r.response_mask.sum())
        sec = statistics.median(times)
        print(f"{engine:5s} batch {args.batch}: {tokens / sec:8.1f} tokens/s ({sec:.2f} s per rollout, "
              f"{tokens} tokens, median of {args.repeats})", flush=True)


if __name__ == "__main__":
    main()
