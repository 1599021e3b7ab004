"""hhh's sampler (hhh.rollout.sample) against transformers' `generate`: tokens per second at batch 1, 16 and 64,
and the share of the machine's fp32 matmul peak each reaches, measured in the same run.

Same bundled model (fp32), same red-team prompts (chat template, left padding), 48 new tokens at temperature 0.7,
every row forced to run the full 48 (EOS suppressed for both, so both do the same work), same thread count. The
first call of each is a warm-up; the time is the median of --repeats calls after it. With --dtypes float32,bfloat16
both also run on a bfloat16 copy of the model (what `--sampler-dtype bfloat16` samples with; a gain only on CPUs
that multiply bf16 natively), and each bf16 row also gives hhh's bf16 tokens/s over fp32 `generate`'s.

FLOPs per generated token are counted as 2 x (parameters in matmuls, the output layer included) + the attention
over the cache (4 x layers x hidden x context); the peak is the best of a few (2048 x 2048) @ (2048 x 2048) fp32
matmuls on the same threads. Prints a table; writes bench/results/rollout.{md,json} with --write.

    .venv/bin/python bench/rollout.py [--batches 1,16,64] [--dtypes float32,bfloat16] [--repeats 3] [--write]
"""

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

NEW_TOKENS = 48


def matmul_peak(threads: int) -> float:
    """Best fp32 FLOP/s of a 2048^3 matmul here (a few tries)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t))
    return best


def flops_per_token(model, context: int) -> float:
    cfg = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    matmul_params += cfg.vocab_size * cfg.hidden_size  # the output layer (tied to the embedding here)
    return 2 * matmul_params + 4 * cfg.num_hidden_layers * cfg.hidden_size * context


def cast_parameters(model, dtype: torch.dtype):
    """The parameters in `dtype`, buffers (rotary frequencies) as they were: what Policy.sampler(dtype) samples with."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--dtypes", default="float32", help="comma-separated of float32, bfloat16: the models' dtypes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--write", action="store_true", help="write bench/results/rollout.md and .json")
    ap.add_argument("--json", action="store_true", help="last line: RESULT {json} (for bench/vs_trl.py)")
    args = ap.parse_args()

    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.spec import DEFAULT_MODEL
    from hhh.rollout import chat_prompt_ids, left_pad, sample

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL, device="cpu").eval()
    prompts = load_prompts("redteam:train")
    peak = matmul_peak(args.threads)
    eos = tok.eos_token_id

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    models = {d: model if d == torch.float32 else cast_parameters(copy.deepcopy(model), d) for d in dtypes}

    def hhh_call(model, batch: list[str], seed: int) -> int:
        with torch.no_grad():  # EOS is made impossible by the hook below: every row runs 48 tokens, as for HF
            roll = sample(model, tok, batch, max_new_tokens=NEW_TOKENS, temperature=0.7,
                          generator=torch.Generator().manual_seed(seed))
        return int(roll.response_mask.sum())

    def hf_call(model, batch: list[str], seed: int) -> int:
        ids, mask = left_pad(chat_prompt_ids(tok, batch), tok.pad_token_id)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True,
                                 temperature=0.7, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                                 suppress_tokens=[eos], min_new_tokens=NEW_TOKENS)
        return int((out[:, ids.shape[1]:] != tok.pad_token_id).sum())

    # hhh's sampler has no token suppression; a logits hook makes EOS impossible for it the same way
    def no_eos(module, inputs, output):
        output.logits[..., eos] = float("-inf")
        return output

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        batch = prompts[:b]
        context = max(len(s) for s in chat_prompt_ids(tok, batch)) + NEW_TOKENS // 2
        for dtype, m in models.items():
            result = {"batch": b, "dtype": str(dtype).removeprefix("torch.")}
            for name, call in (("hf", hf_call), ("hhh", hhh_call)):
                hook = m.register_forward_hook(no_eos) if name == "hhh" else None
                call(m, batch, 0)  # warm-up
                times, tokens = [], 0
                for r in range(args.repeats):
                    t = time.perf_counter()
                    tokens = call(m, batch, r + 1)
                    times.append(time.perf_counter() - t)
                if hook is not None:
                    hook.remove()
                sec = statistics.median(times)
                result[f"{name}_s"] = sec
                result[f"{name}_tokens"] = tokens
                result[f"{name}_tok_s"] = tokens / sec
                result[f"{name}_peak_fraction"] = tokens * flops_per_token(model, context) / sec / peak
            result["ratio"] = result["hhh_tok_s"] / result["hf_tok_s"]
            fp32 = [r for r in rows if r["batch"] == b and r["dtype"] == "float32"]
            if dtype != torch.float32 and fp32:  # hhh at this dtype against fp32 `generate`
                result["ratio_to_fp32_hf"] = result["hhh_tok_s"] / fp32[0]["hf_tok_s"]
            rows.append(result)
            print(f"batch {b:3d} {result['dtype']:8s}: HF generate {result['hf_tok_s']:7.1f} tok/s "
                  f"({result['hf_peak_fraction']:.1%} of the fp32 peak)  hhh {result['hhh_tok_s']:7.1f} tok/s "
                  f"({result['hhh_peak_fraction']:.1%})  hhh/HF {result['ratio']:.2f}x", flush=True)

    import transformers

    meta = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "matmul_peak_gflops": peak / 1e9, "new_tokens": NEW_TOKENS, "repeats": args.repeats}
    print(f"fp32 matmul peak here: {peak / 1e9:.1f} GFLOP/s")
    if args.json:
        print("RESULT " + json.dumps({**meta, "rows": rows}))
    if args.write:
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        (out / "rollout.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        lines = ["| batch | dtype | HF generate tok/s | share of fp32 peak | hhh tok/s | share of fp32 peak | hhh / HF "
                 "| hhh / fp32 HF |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['dtype']} | {r['hf_tok_s']:.1f} | {r['hf_peak_fraction']:.1%} | "
                  f"{r['hhh_tok_s']:.1f} | {r['hhh_peak_fraction']:.1%} | {r['ratio']:.2f}x | "
                  f"{r.get('ratio_to_fp32_hf', r['ratio']):.2f}x |" for r in rows]
        lines.append(f"\nfp32 matmul peak {peak / 1e9:.1f} GFLOP/s; {meta['machine']}; torch {meta['torch']}, "
                     f"transformers {meta['transformers']}; {NEW_TOKENS} new tokens, median of {args.repeats}.")
        (out / "rollout.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
