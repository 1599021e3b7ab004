"""The compression table (markdown + JSON) and its plot; `hhh optimize report RUN` rebuilds them from the rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hhh import metrics as M
from hhh.runs import RunDir

REDTEAM, BENIGN = "redteam:eval", "benign:eval"


def _get(row: dict[str, Any], prompt_set: str, key: str) -> float | None:
    value = row.get("eval", {}).get(prompt_set, {}).get(key)
    return None if value is None else float(value)


def _ci(row: dict[str, Any], key: str) -> str:
    mean, ci = _get(row, REDTEAM, key), row.get("eval", {}).get(REDTEAM, {}).get(key + "_ci95")
    if mean is None:
        return "-"
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{mean:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "params", "non-zero", "MiB on disk", "peak RSS MiB (model)", "tok/s b1", "tok/s b16",
            "perplexity", "KL to original", "top-1 agree", "red-team toxicity [95% CI]", "> 0.5", "VADER neg",
            "refusal (benign)", "seconds (make + measure)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    original = rows[0]
    for r in rows:
        speed = r["tokens_per_s_batch1"] / original["tokens_per_s_batch1"]
        cells = [r["name"], f"{r['parameters'] / 1e6:.1f}M", f"{r['nonzero_parameters'] / 1e6:.1f}M",
                 f"{r['bytes_on_disk'] / 2**20:.0f}", f"{r['peak_rss_mib']:.0f} ({r['model_mib']:.0f})",
                 f"{r['tokens_per_s_batch1']:.1f} ({speed:.2f}x)", f"{r['tokens_per_s_batch16']:.1f}",
                 f"{r['perplexity']:.3f}", f"{r['kl_to_original']:.4f}", f"{r['top1_agreement']:.3f}",
                 _ci(r, M.TOXICITY), _fmt(_get(r, REDTEAM, M.TOXIC_FRACTION)),
                 _fmt(_get(r, REDTEAM, M.VADER_NEG)), _fmt(_get(r, BENIGN, M.REFUSAL_RATE)), _seconds(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seconds(row: dict[str, Any]) -> str:
    if "seconds_measuring" not in row:
        return "-"
    return f"{row.get('seconds_making', 0.0):.0f} + {row['seconds_measuring']:.0f}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        left.scatter(r["bytes_on_disk"] / 2**20, r["perplexity"], s=40)
        left.annotate(r["name"], (r["bytes_on_disk"] / 2**20, r["perplexity"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    left.set_xlabel("MiB on disk")
    left.set_ylabel("perplexity of the original's benign answers")
    left.set_title("quality vs size")
    names = [r["name"] for r in rows]
    means = [_get(r, REDTEAM, M.TOXICITY) or 0.0 for r in rows]
    cis = [r.get("eval", {}).get(REDTEAM, {}).get(M.TOXICITY + "_ci95") or [m, m] for r, m in zip(rows, means, strict=True)]
    err = [[m - c[0] for m, c in zip(means, cis, strict=True)], [c[1] - m for m, c in zip(means, cis, strict=True)]]
    right.bar(range(len(rows)), means, yerr=err, capsize=4,
              color=["tab:gray" if n.startswith("base") else "tab:green" for n in names])
    right.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("red-team toxicity (offensive-language judge)")
    right.set_title("does the alignment survive? (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(run: RunDir, rows: list[dict[str, Any]]) -> None:
    run.write_json("table.json", {"rows": rows})
    (run.path / "table.md").write_text(markdown(rows))
    plot(rows, run.path / "plot_compress.png")


def rebuild(path: str | Path) -> Path:
    """Rebuild table.md and the plot from table.json (or from the rows of an unfinished run)."""
    run = RunDir(path)
    if (run.path / "table.json").is_file():
        rows = run.read_json("table.json")["rows"]
    else:
        files = sorted((run.path / "rows").glob("*.json")) if (run.path / "rows").is_dir() else []
        if not files:
            raise ValueError(f"{path}: no table.json and no measured rows (is it an hhh compress run folder?)")
        rows = [json.loads(f.read_text()) for f in files]
        rows.sort(key=lambda r: r["name"] != "original")
    (run.path / "table.md").write_text(markdown(rows))
    plot(rows, run.path / "plot_compress.png")
    return run.path / "table.md"
