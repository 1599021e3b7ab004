"""Did a refactor change what the jobs compute? Run five short jobs, keep what they logged, compare two snapshots.

    python scripts/equivalence.py record runs/equiv-before          # on the old commit (e.g. a git worktree)
    python scripts/equivalence.py record runs/equiv-after           # on the new one
    python scripts/equivalence.py compare runs/equiv-before runs/equiv-after

`record` runs `hhh detox`, `hhh grpo`, `hhh rloo` (and with REINFORCE++) and `hhh dpo` on the bundled model (2 steps each, 4 eval prompts
x 2 samples per set; DPO on pairs from 8 prompts, one epoch) and writes OUT/snapshot.json: every logged metric of
every step (timings left out) and the before/after eval tables. `compare` prints each difference beyond the
tolerance (relative 1e-4 + absolute 1e-6) and exits 1 if there is one, or if a key appears in only one snapshot;
`--renamed [JOB:]OLD=NEW` maps a step-log metric renamed on purpose (RENAMES holds the ones of the jobs
refactor; `--renamed-refactor` applies them). Takes about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

SMALL_EVAL = ["--eval-max-prompts", "4", "--eval-samples", "2"]
JOBS = {
    "detox": ["detox", "--steps", "2", *SMALL_EVAL],
    "grpo": ["grpo", "--steps", "2", *SMALL_EVAL],
    "rloo": ["rloo", "--steps", "2", *SMALL_EVAL],
    "reinforce_pp": ["rloo", "--advantage", "reinforce++", "--steps", "2", *SMALL_EVAL],
    "dpo": ["dpo", "--pair-prompts", "8", "--epochs", "1", *SMALL_EVAL],
}
# The metric vocabulary's renames (hhh.metrics), old name -> new, for comparing runs from before it.
RENAMES = ["reward/mean=reward/shaped_mean", "reward/score=reward/mean", "detox:reward/std=reward/shaped_std",
           "length/mean=length/tokens", "samples/distinct_2=distinct_2", "samples/repetition_3=repetition_3",
           "second/score=second/mean", "kl/kl_coef=kl/beta", "loss/dpo=loss/preference"]
SKIPPED = ("time/", "seconds")  # wall-clock measurements differ between any two runs


def _kept(key: str) -> bool:
    return not any(key.startswith(s) or key.endswith(s) for s in SKIPPED)


def snapshot(run: Path) -> dict:
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "steps": [{k: v for k, v in s.items() if _kept(k)} for s in steps],
        "eval_before": json.loads((run / "eval_before.json").read_text()),
        "eval_after": json.loads((run / "eval.json").read_text()),
    }


def record(out: Path, hhh: str, jobs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in jobs:
        run = out / name
        if not (run / "eval.json").is_file():
            cmd = [hhh, *JOBS[name], "--seed", "0", "--out", str(run)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        result[name] = snapshot(run)
    (out / "snapshot.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {out / 'snapshot.json'}")


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _close(a, b, rtol: float, atol: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return a == b


def _renamed(snap: dict, renamed: list[str]) -> dict:
    """The snapshot with step-log metrics renamed: OLD=NEW in every job, JOB:OLD=NEW in one (all at once, so two
    names may swap). Eval tables are left as they are."""
    maps: dict[str, dict[str, str]] = {job: {} for job in snap}
    for item in renamed:
        names, _, new = item.partition("=")
        job, _, old = names.rpartition(":") if ":" in names.split("/")[0] else ("", "", names)
        for name in ([job] if job else snap):
            if name in maps:
                maps[name][old] = new
    return {job: {**runs, "steps": [{maps[job].get(k, k): v for k, v in s.items()} for s in runs["steps"]]}
            for job, runs in snap.items()}


def compare(a: Path, b: Path, renamed: list[str], rtol: float, atol: float) -> int:
    old = _flatten(_renamed(json.loads((a / "snapshot.json").read_text()), renamed))
    new = _flatten(json.loads((b / "snapshot.json").read_text()))
    bad = 0
    for key in sorted(set(old) | set(new)):
        if key not in new or key not in old:
            print(f"only in {'the first' if key in old else 'the second'}: {key}")
            bad += 1
        elif not _close(old[key], new[key], rtol, atol):
            print(f"differs: {key}: {old[key]} -> {new[key]}")
            bad += 1
    print(f"{len(old)} values compared, {bad} differences (rtol {rtol:g}, atol {atol:g})")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--hhh", default=str(Path(sys.executable).with_name("hhh")), help="the hhh executable to run")
    r.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ",".join(JOBS))
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--renamed", action="append", default=[], metavar="[JOB:]OLD=NEW",
                   help="a step-log metric renamed on purpose (in every job, or in JOB only)")
    c.add_argument("--renamed-refactor", action="store_true", help="apply RENAMES (runs from before hhh.metrics)")
    c.add_argument("--rtol", type=float, default=1e-4)
    c.add_argument("--atol", type=float, default=1e-6)
    args = p.parse_args(argv)
    if args.what == "record":
        record(args.out, args.hhh, args.jobs.split(","))
        return 0
    return compare(args.a, args.b, args.renamed + (RENAMES if args.renamed_refactor else []), args.rtol, args.atol)


if __name__ == "__main__":
    sys.exit(main())
