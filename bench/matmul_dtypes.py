"""How much faster this CPU multiplies in bfloat16 than in float32, at the shapes a decode step of the bundled
model runs (64 rows: a batch of 64 sequences, one new token each) and at 2048^3: each bf16 time as a ratio of the
fp32 time measured in the same run.

The question it answers (docs/profile-rollout.md): whether the rollout bound "no sampler beats generate by more
than generate's time / its matmul time" is a bound of the model or only of the fp32 kernels. The answer depends on
the CPU: with avx512_bf16 or AMX (e.g. an EPYC Zen 4) bf16 ran 3-4.7x faster here, on an AVX2-only EPYC (Zen 3)
2.3-6.8x slower; the first line says which kind this CPU is.

    .venv/bin/python bench/matmul_dtypes.py [--rows 64] [--threads N]
"""

import argparse
import statistics
import time

import torch

# SmolLM2-135M: hidden 576, 3 key/value heads of 64, MLP 1536, vocabulary 49,152
SHAPES = [("q_proj / o_proj", 576, 576), ("k_proj / v_proj", 576, 192), ("gate_proj / up_proj", 576, 1536),
          ("down_proj", 1536, 576), ("lm_head", 576, 49152)]


def seconds(fn, repeats: int) -> float:
    """Median over 5 timings of `repeats` calls each, after two warm-up calls."""
    fn()
    fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        runs.append((time.perf_counter() - start) / repeats)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows of the activation (decode batch)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from hhh.models.load import cpu_has_native

    native = cpu_has_native("bfloat16")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 matmuls (oneDNN): {'yes' if native else 'no: bf16 is emulated and slower than fp32'}")
    print("| matmul | fp32 ms | bf16 ms | bf16 / fp32 time | fp32 GFLOP/s | bf16 GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m, k, n in [(f"{s} ({args.rows} x {k} @ {k} x {n})", args.rows, k, n) for s, k, n in SHAPES] + [
            ("2048^3", 2048, 2048, 2048)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        xb, wb = x.bfloat16(), w.bfloat16()
        repeats = max(3, int(2e9 / (2 * m * k * n)))  # about 2 GFLOP a timing
        fp32 = seconds(lambda x=x, w=w: x @ w.T, repeats)
        bf16 = seconds(lambda x=xb, w=wb: x @ w.T, repeats)
        flops = 2 * m * k * n
        print(f"| {name} | {fp32 * 1e3:.3f} | {bf16 * 1e3:.3f} | {bf16 / fp32:.2f} | {flops / fp32 / 1e9:.0f} | "
              f"{flops / bf16 / 1e9:.0f} |")


if __name__ == "__main__":
    main()
