"""Where a rollout's time goes, and how fast it could be: torch's profiler over hhh's sampler and over
transformers' `generate`, by operator, on the same batch as bench/rollout.py (bundled model, fp32, red-team
prompts, 48 new tokens at temperature 0.7, EOS impossible for both).

The bound it prints: the matrix multiplies (`aten::mm`, `addmm`, `bmm`, `linear`'s kernels) do the FLOPs a
decode step cannot avoid; if everything else took no time at all, a sampler would still spend their time. So
(generate's time) / (generate's matmul time) is the most any sampler can gain on `generate` with the same
matmul kernels and precision. It also prints the FLOP/s those matmuls reach against the fp32 peak of a large
square matmul measured in the same run: thin decode shapes ((B x 576) @ (576 x N)) cannot reach it.

    .venv/bin/python bench/profile_rollout.py [--batch 64] [--out docs/profile-rollout.md]
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from rollout import NEW_TOKENS, flops_per_token, matmul_peak  # noqa: E402  (bench/rollout.py, beside this script)

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul_out", "aten::_mkldnn_linear"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args()

    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.spec import DEFAULT_MODEL
    from hhh.rollout import chat_prompt_ids, left_pad, sample

    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL, device="cpu").eval()
    batch = load_prompts("redteam:train")[: args.batch]
    eos = tok.eos_token_id
    peak = matmul_peak(torch.get_num_threads())
    context = max(len(s) for s in chat_prompt_ids(tok, batch)) + NEW_TOKENS // 2

    def no_eos(module, inputs, output):
        output.logits[..., eos] = float("-inf")
        return output

    def hhh_call() -> None:
        hook = model.register_forward_hook(no_eos)
        sample(model, tok, batch, max_new_tokens=NEW_TOKENS, temperature=0.7, generator=torch.Generator().manual_seed(1))
        hook.remove()

    def hf_call() -> None:
        ids, mask = left_pad(chat_prompt_ids(tok, batch), tok.pad_token_id)
        torch.manual_seed(1)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.7,
                       top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, suppress_tokens=[eos],
                       min_new_tokens=NEW_TOKENS)

    lines = [f"Batch {args.batch}, {NEW_TOKENS} new tokens, bundled model fp32, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
             "(2048^3, same run).", ""]
    summary = {}
    for name, call in (("HF generate", hf_call), ("hhh sample", hhh_call)):
        with torch.no_grad():
            call()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                call()
                wall = time.perf_counter() - t
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
        flops = args.batch * NEW_TOKENS * flops_per_token(model, context)
        summary[name] = (wall, mm)
        lines += [f"### {name}: {wall:.2f} s under the profiler; matmuls {mm:.2f} s ({mm / wall:.0%}), at "
                  f"{flops / mm / 1e9:.1f} GFLOP/s = {flops / mm / peak:.0%} of the peak while they run", "",
                  "| operator | self seconds | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / 1e6 / wall:.0%} | "
                  f"{e.count} |" for e in events[:12]]
        lines.append("")
    hf_wall, hf_mm = summary["HF generate"]
    hhh_wall, _ = summary["hhh sample"]
    lines.append(f"hhh/HF now: {hf_wall / hhh_wall:.2f}x. Bound with these matmul kernels (HF's time / HF's matmul "
                 f"time): {hf_wall / hf_mm:.2f}x.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
