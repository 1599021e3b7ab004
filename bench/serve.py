"""hhh serve under concurrent clients: continuous batching against one request at a time, in one run.

Two `hhh serve` processes in turn on the same model (and adapter, if given) and threads: `--max-batch 32` (requests
join the running batch) and `--max-batch 1` (the baseline: each request waits for the one before it). For 1, 8 and
32 concurrent streaming clients, each sending requests back to back: requests/s, generated tokens/s, and time to
first token (median, p90). Prints a table with the ratios; writes bench/results/serve.md and serve.json.

    .venv/bin/python bench/serve.py [--adapter runs/detox/run] [--max-tokens 32]
"""

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.feedback_server import ServeProcess  # noqa: E402

CLIENTS = (1, 8, 32)


def one_request(url: str, model: str, prompt: str, max_tokens: int, seed: int) -> tuple[float, float, int]:
    """(time to first token, total time, generated tokens) of one streamed chat request."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def load(url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            out = one_request(url, model, prompts[(c * per_client + k) % len(prompts)], max_tokens, c * 100 + k)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r[2] for r in results) / wall, "ttft_median_s": statistics.median(ttft),
            "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--adapter", help="run or adapter folder served as 'aligned' (the requests use it)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve"))
    args = parser.parse_args()
    from hhh.data import load_prompts

    prompts = load_prompts("benign:eval")
    model = "aligned" if args.adapter else args.model
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for batch in (32, 1):
        extra = ["--model", args.model, "--max-batch", str(batch), "--threads", "2"]
        if args.adapter:
            extra += ["--adapter", f"aligned={args.adapter}"]
        server = ServeProcess(Path(args.out).parent / f"bench-serve-{batch}.db", None, *extra)
        server.start()
        try:
            one_request(server.url, model, prompts[0], 4, 0)  # warm-up
            for clients in CLIENTS:
                per_client = 4 if clients == 1 else 2
                row = {"max_batch": batch, **load(server.url, model, prompts, clients, per_client, args.max_tokens)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{server.db}{suffix}").unlink(missing_ok=True)
    base = {r["clients"]: r for r in rows if r["max_batch"] == 1}
    lines = [f"# hhh serve: continuous batching vs one request at a time ({time.strftime('%Y-%m-%d')})", "",
             f"{args.model}" + (f" + {args.adapter}" if args.adapter else "") + f", {args.max_tokens} tokens per "
             f"request at most, streamed; {platform.processor() or platform.machine()}, 2 torch threads.", "",
             "| clients | max batch | requests | req/s | tokens/s | TTFT median s | TTFT p90 s | req/s vs one at a time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["requests_per_s"] / base[r["clients"]]["requests_per_s"]
        lines.append(f"| {r['clients']} | {r['max_batch']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['ttft_median_s']:.2f} | {r['ttft_p90_s']:.2f} | {ratio:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"rows": rows, "model": args.model, "adapter": args.adapter,
                                                    "max_tokens": args.max_tokens}, indent=2))


if __name__ == "__main__":
    main()
