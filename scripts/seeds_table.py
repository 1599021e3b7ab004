"""Mean and spread over several runs of one job (e.g. `hhh detox --seed 0|1|2`): the README's headline table.

    python scripts/seeds_table.py runs/detox-seed0 runs/detox-seed1 runs/detox-seed2

Prints, per eval set, each metric before and after training as mean ± sample std [min, max] over the runs,
plus the wall time and peak memory when a run's folder holds a `time.log` from `/usr/bin/time -v`.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

METRICS = [("toxicity/mean", "toxicity mean"), ("toxicity/frac_toxic", "fraction > 0.5"),
           ("vader/neg_mean", "VADER negativity (2nd judge)"), ("length/tokens", "length (tokens)"),
           ("eos_rate", "EOS rate"), ("distinct_2", "distinct-2"), ("refusal_rate", "refusal rate"),
           ("kl/per_completion", "KL to the reference (nats)")]


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def timing(run: Path) -> tuple[float, float] | None:
    log = run / "time.log"
    if not log.is_file():
        return None
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not (wall and rss):
        return None
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.group(1).split(":"))))
    return seconds, int(rss.group(1)) / 1e6


def with_refusals(run: Path, results: dict, tag: str) -> dict:
    """Runs evaluated before the refusal rate existed: count it from their saved samples (hhh's is_refusal)."""
    from hhh.evaluate import refusal_rate, samples_file

    for name, metrics in results.items():
        path = run / samples_file(name, tag)
        if "refusal_rate" not in metrics and path.is_file():
            texts = [json.loads(line)["completion"] for line in path.read_text().splitlines() if line.strip()]
            metrics["refusal_rate"] = refusal_rate(texts)[0]
    return results


def main(runs: list[Path]) -> None:
    before = [with_refusals(r, json.loads((r / "eval_before.json").read_text()), "before") for r in runs]
    after = [with_refusals(r, json.loads((r / "eval.json").read_text()), "") for r in runs]
    print(f"{len(runs)} runs: {', '.join(str(r) for r in runs)}\n")
    for name in after[0]:
        print(f"| {name} | before | after |\n|---|---|---|")
        for key, label in METRICS:
            b = [e[name][key] for e in before if key in e[name]]
            a = [e[name][key] for e in after if key in e[name]]
            if a:
                print(f"| {label} | {spread(b) if b else '-'} | {spread(a)} |")
        print()
    times = [t for t in map(timing, runs) if t]
    if times:
        walls, peaks = [t[0] / 60 for t in times], [t[1] for t in times]
        print(f"wall: {spread(walls)} min; peak memory: {spread(peaks)} GB")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:]])
