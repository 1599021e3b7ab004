"""report.html for a training run: training curves, toxicity before/after, sample completions."""

from __future__ import annotations

import html
import json
from pathlib import Path

from hhh import metrics as M
from hhh.evaluate import ROWS, samples_file
from hhh.runs import RunDir


def _plot_curves(metrics: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(M.REWARD_MEAN, "reward (raw score)"), (M.KL, "KL to reference (nats/completion)"),
              (M.ENTROPY, "entropy (nats/token)"), (M.LENGTH, "completion length (tokens)"),
              (M.LOSS_PREFERENCE, "preference loss"), (M.IMPLICIT_MARGIN, "implicit reward margin"),
              (M.IMPLICIT_ACCURACY, "implicit reward accuracy"), (M.LOGPS_CHOSEN, "log-prob of chosen (sum)"),
              (M.LOGPS_REJECTED, "log-prob of rejected (sum)")]
    panels = [(key, title) for key, title in panels if any(key in m for m in metrics)]
    names = []
    steps = [m["step"] for m in metrics]
    for key, title in panels:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, [m.get(key, float("nan")) for m in metrics], marker="o", ms=3)
        if key == M.REWARD_MEAN:
            val = [(m["step"], m[M.VAL_REWARD]) for m in metrics if M.VAL_REWARD in m]
            if val:
                ax.plot(*zip(*val, strict=True), marker="s", ls="--", label="held-out")
                ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"plot_{key.replace('/', '_')}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _plot_histogram(before: list[dict], after: list[dict], spec: str, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = [i / 20 for i in range(21)]
    ax.hist([s["offensive"] for s in before], bins=bins, alpha=0.6, label="before")
    ax.hist([s["offensive"] for s in after], bins=bins, alpha=0.6, label="after")
    ax.set_title(f"toxicity (offensive-language classifier), {spec}")
    ax.set_xlabel("P(offensive)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    name = f"hist_{spec.replace(':', '_')}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _metrics_table(before: dict, after: dict) -> str:
    rows = ["<tr><th>prompt set</th><th>metric</th><th>before</th><th>after</th></tr>"]
    for spec in before:
        for key, label in ROWS:
            if key in before[spec] or key in after.get(spec, {}):
                b, a = before[spec].get(key), after.get(spec, {}).get(key)
                fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                rows.append(f"<tr><td>{html.escape(spec)}</td><td>{label}</td><td>{fmt(b)}</td><td>{fmt(a)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _samples_table(before: list[dict], after: list[dict], n: int = 12) -> str:
    """The first completion of each of the first n prompts, before and after (same prompts, same seed)."""
    first_b: dict[str, dict] = {}
    first_a: dict[str, dict] = {}
    for s in before:
        first_b.setdefault(s["prompt"], s)
    for s in after:
        first_a.setdefault(s["prompt"], s)
    rows = ["<tr><th>prompt</th><th>before</th><th>after</th></tr>"]
    for prompt in list(first_b)[:n]:
        b, a = first_b[prompt], first_a.get(prompt)
        cell = lambda s: "-" if s is None else f"{html.escape(s['completion'])}<br><small>P(offensive) {s['offensive']:.2f}</small>"  # noqa: E731
        rows.append(f"<tr><td>{html.escape(prompt)}</td><td>{cell(b)}</td><td>{cell(a)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _write_page(run: RunDir, title: str, parts: list[str]) -> Path:
    """RUN/report.html from its HTML parts."""
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{max-width:49%}.warn{color:#a40}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>" \
        "</head><body>" + "".join(parts) + "</body></html>"
    target = run.path / "report.html"
    target.write_text(page, encoding="utf-8")
    return target


def write_report(run: RunDir | str | Path) -> Path:
    """Write RUN/report.html (and its PNG plots) from what the run folder holds."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    metrics = run.metrics()
    before = run.read_json("eval_before.json") if (run.path / "eval_before.json").is_file() else {}
    after = run.read_json("eval.json") if (run.path / "eval.json").is_file() else {}
    summary = run.read_json("summary.json") if (run.path / "summary.json").is_file() else {}
    parts = [f"<h1>hhh run {html.escape(run.path.name)}</h1>"]
    if summary:
        parts.append(f"<p>steps: {summary.get('steps')}; best held-out step: {summary.get('best_step')}; "
                     f"stopped early: {summary.get('stopped') or 'no'}</p>")
    alarms = [(m["step"], a) for m in metrics for a in m.get("alarms", [])]
    if alarms:
        parts.append("<p class=warn>guard alarms: " + ", ".join(f"{a} (step {s})" for s, a in alarms) + "</p>")
    if before and after:
        parts.append("<h2>Before and after</h2>" + _metrics_table(before, after))
    if metrics:
        parts.append("<h2>Training</h2>" + "".join(f'<img src="{n}">' for n in _plot_curves(metrics, run.path)))
    for spec in before:
        sb, sa = _read_samples(run.path / samples_file(spec, "before")), _read_samples(run.path / samples_file(spec))
        if sb and sa:
            parts.append(f"<h2>{html.escape(spec)}</h2>" + f'<img src="{_plot_histogram(sb, sa, spec, run.path)}">'
                         + _samples_table(sb, sa))
    return _write_page(run, "hhh report", parts)


def _stage_table(results: dict[str, dict]) -> str:
    """One column per stage (base, SL-CAI, ...), with 95% intervals where the metric has one."""
    from hhh.evaluate import _fmt

    names = list(results)
    rows = ["<tr><th>prompt set</th><th>metric</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for spec in next(iter(results.values()), {}):
        for key, label in ROWS:
            if any(key in r.get(spec, {}) for r in results.values()):
                cells = "".join(f"<td>{_fmt(key, r.get(spec, {}))}</td>" for r in results.values())
                rows.append(f"<tr><td>{html.escape(spec)}</td><td>{label}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _revision_rows(records: list[dict], n_kept: int = 8, n_dropped: int = 4) -> str:
    """Prompt, first answer, each round's principle and critique, the revision, and the filter's verdict."""
    chosen = [r for r in records if r.get("kept")][:n_kept] + [r for r in records if not r.get("kept")][:n_dropped]
    rows = ["<tr><th>prompt</th><th>first answer</th><th>principle: critique</th><th>revision</th><th>kept</th></tr>"]
    for r in chosen:
        crit = "<br>".join(f"<b>{html.escape(x['principle'])}</b>: {html.escape(x['critique'])}" for x in r["rounds"])
        verdict = "yes" if r.get("kept") else f"no ({html.escape(str(r.get('reason')))})"
        rows.append(f"<tr><td>{html.escape(r['prompt'])}</td><td>{html.escape(r['answer'])}</td><td>{crit}</td>"
                    f"<td>{html.escape(r['revision'])}</td><td>{verdict}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def cai_report(run: RunDir, results: dict[str, dict]) -> Path:
    """RUN/report.html for `hhh cai`: every stage's evaluation side by side, the revision filters with their
    counts, the SFT curves, and revisions next to the answers they replaced."""
    parts = [f"<h1>hhh cai {html.escape(run.path.name)}</h1>"]
    if results:
        parts.append("<h2>Evaluation by stage</h2>" + _stage_table(results))
    sl = run.path / "sl"
    if (sl / "filters.json").is_file():
        f = json.loads((sl / "filters.json").read_text())
        parts.append(f"<h2>Supervised stage</h2><p>{f['kept']} of {f['revisions']} revisions kept "
                     f"({100 * f['filtered_share']:.0f}% filtered: "
                     + ", ".join(f"{html.escape(k)} {v}" for k, v in f["filtered"].items()) + ").</p>")
    sft = RunDir(sl).metrics() if (sl / "metrics.jsonl").is_file() else []
    if sft:
        parts.append("".join(f'<img src="sl/{n}">' for n in _plot_sft(sft, sl)))
    records = _read_samples(sl / "revisions.jsonl")
    if records:
        parts.append("<h3>Answers, critiques and revisions</h3>" + _revision_rows(records))
    rl = run.path / "rl"
    if (rl / "audit.json").is_file():
        a = json.loads((rl / "audit.json").read_text())
        agree = "not measurable" if a["agreement"] is None else \
            f"{a['agreement']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]"
        verdict = "passed" if a["passed"] else "failed (no training on these labels unless overridden)"
        parts.append(f"<h2>RL stage: AI feedback</h2><p>{a['pairs_labelled']} pairs labelled. Agreement with the "
                     f"offensive-language judge on the {a['pairs']} pairs it separates by more than 0.3: {agree}; "
                     f"threshold {a['threshold']['min_agreement']} on at least {a['threshold']['min_judged_pairs']} "
                     f"pairs: {verdict}. Position bias (mean P(\"(A)\"), 0.5 = none): {a['position_bias']:.2f}; "
                     f"mean confidence {a['mean_confidence']:.2f}.</p>")
    labels = _read_samples(rl / "labels.jsonl")
    if labels:
        rows = ["<tr><th>prompt</th><th>first</th><th>second</th><th>P(first better)</th><th>judge (first, second)"
                "</th></tr>"]
        for r in labels[:10]:
            rows.append(f"<tr><td>{html.escape(r['prompt'])}</td><td>{html.escape(r['first'])}</td>"
                        f"<td>{html.escape(r['second'])}</td><td>{r['p_first']:.2f} ({html.escape(r['comparison'])})"
                        f"</td><td>{r['offensive_first']:.2f}, {r['offensive_second']:.2f}</td></tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
    return _write_page(run, "hhh cai", parts)


def _plot_sft(metrics: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    train = [(m["step"], m[M.LOSS_SFT]) for m in metrics if M.LOSS_SFT in m]
    held = [(m["step"], m[M.SFT_EVAL_LOSS]) for m in metrics if M.SFT_EVAL_LOSS in m]
    for points, label in ((train, "train"), (held, "held out")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
    ax.set_title("SFT loss (NLL per response token)")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plot_sft_loss.png", dpi=110)
    plt.close(fig)
    return ["plot_sft_loss.png"]
