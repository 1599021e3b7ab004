"""JSONL in and out of the preference store.

Pairs, the format of TRL and of most preference sets (one object per line):

    {"prompt": "...", "chosen": "...", "rejected": "..."}          optional: "margin", "tie", "labeler"

Anthropic HH-RLHF lines carry whole transcripts in chosen/rejected and no prompt; the prompt is then the
shared text up to the last "\\n\\nAssistant:", and the completions what follows it.

Rankings, which keep ties and K > 2 completions:

    {"prompt": "...", "completions": ["...", "...", "..."], "ranking": [[0], [1, 2]], "unsafe": [2], "labeler": "ann"}

`ranking` holds indices into `completions`, best tier first. Import stops at the first bad line, naming it,
and writes nothing from that file (one transaction).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hhh.data import DataError, read_jsonl
from hhh.feedback.rankings import RankingError, check_tiers
from hhh.feedback.store import Labeler, Ranking, Store, StoreError, select

ASSISTANT = "\n\nAssistant:"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF transcripts -> (prompt, chosen completion, rejected completion)."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(ASSISTANT)]):
        raise ValueError("chosen and rejected do not share a transcript ending in '\\n\\nAssistant:'")
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string")
    return value


def _pair_record(row: dict, where: str) -> dict[str, Any]:
    if "prompt" in row:
        prompt, chosen, rejected = (_string(row, k, where) for k in ("prompt", "chosen", "rejected"))
    else:
        try:
            prompt, chosen, rejected = split_hh(_string(row, "chosen", where), _string(row, "rejected", where))
        except ValueError as e:
            raise DataError(f"{where}: no 'prompt' field, and {e}") from None
    margin = row.get("margin")
    if margin is not None and (not isinstance(margin, int | float) or isinstance(margin, bool)):
        raise DataError(f"{where}: field 'margin' must be a number")
    tie = row.get("tie", False)
    if not isinstance(tie, bool):
        raise DataError(f"{where}: field 'tie' must be true or false")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are the same text")
    return {"prompt": prompt, "completions": [chosen, rejected], "tiers": [[0, 1]] if tie else [[0], [1]],
            "unsafe": [], "margin": margin, "labeler": row.get("labeler"), "source": row.get("source")}


def _ranking_record(row: dict, where: str) -> dict[str, Any]:
    prompt = _string(row, "prompt", where)
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2 or not all(isinstance(c, str) for c in completions):
        raise DataError(f"{where}: field 'completions' must be a list of at least 2 strings")
    if len(set(completions)) != len(completions):
        raise DataError(f"{where}: field 'completions' holds the same text twice")
    try:
        tiers = check_tiers(row.get("ranking"), range(len(completions)))
    except RankingError as e:
        raise DataError(f"{where}: field 'ranking': {e}") from None
    unsafe = row.get("unsafe", [])
    if not isinstance(unsafe, list) or not all(isinstance(i, int) and 0 <= i < len(completions) for i in unsafe):
        raise DataError(f"{where}: field 'unsafe' must list indices into 'completions'")
    return {"prompt": prompt, "completions": completions, "tiers": tiers, "unsafe": unsafe, "margin": None,
            "labeler": row.get("labeler"), "source": row.get("source")}


def read_records(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Parse every line first (so a bad line stops the import before anything is written)."""
    records = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        kind = fmt if fmt != "auto" else ("rankings" if "completions" in row else "pairs")
        records.append(_ranking_record(row, where) if kind == "rankings" else _pair_record(row, where))
    return records


def import_jsonl(store: Store, path: str | Path, *, fmt: str = "auto", labeler: str = "import",
                 role: str = "labeler", model: str = "import") -> dict[str, int]:
    """Add the prompts, completions and rankings of a pairs or rankings JSONL file; returns counts.

    Each line is one ranking by the line's "labeler" (default `labeler`), created as needed with `role`, or as an
    AI labeler when the line says "source": "ai" (no token: tokens come from `hhh label add-labeler`). A prompt that labeler already ranked is skipped.
    """
    records = read_records(path, fmt)
    added = skipped = 0
    with store.write() as s:
        labelers: dict[str, int] = {}
        for rec in records:
            name = rec["labeler"] or labeler
            if name not in labelers:
                found = s.scalar(select(Labeler).where(Labeler.name == name))
                if found is None:
                    found = Labeler(name=name, role="ai" if rec["source"] == "ai" else role)
                    s.add(found)
                    s.flush()
                labelers[name] = found.id
            pid = store.add_prompt(rec["prompt"], "import", session=s)
            cids = [store.add_completion(pid, c, model=model, session=s) for c in rec["completions"]]
            exists = s.scalar(select(Ranking.id).where(Ranking.prompt_id == pid, Ranking.labeler_id == labelers[name]))
            if exists is not None:
                skipped += 1
                continue
            tiers = [[cids[i] for i in tier] for tier in rec["tiers"]]
            ranking = Ranking(prompt_id=pid, labeler_id=labelers[name], submission_id=f"import-{uuid.uuid4().hex}",
                              tiers=tiers, unsafe=[cids[i] for i in rec["unsafe"]])
            s.add(ranking)
            s.flush()
            store.add_pairs(s, ranking, margin=rec["margin"])
            added += 1
    return {"rankings": added, "skipped": skipped}


def export_lines(store: Store, fmt: str = "pairs", *, ties: bool = False, source: str = "all") -> Iterator[str]:
    """JSONL lines (with newline) of pairs (ties only with ties=True, marked "tie": true) or rankings."""
    if fmt == "pairs":
        for p in store.pairs(ties=ties, source=source):
            row = {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
            if p["tie"]:
                row["tie"] = True
            if p["margin"] is not None:
                row["margin"] = p["margin"]
            row.update(labeler=p["labeler"], source=p["source"])
            yield json.dumps(row) + "\n"
    elif fmt == "rankings":
        items = {it["prompt_id"]: it for it in store.items(min_completions=1)}
        for r in store.rankings():
            if source != "all" and (r["role"] == "ai") != (source == "ai"):
                continue
            item = items[r["prompt_id"]]
            ranked = sorted(c for tier in r["tiers"] for c in tier)  # completions added later are not in it
            index = {c: i for i, c in enumerate(ranked)}
            texts = {c["id"]: c["text"] for c in item["completions"]}
            yield json.dumps({"prompt": item["prompt"], "completions": [texts[c] for c in ranked],
                              "ranking": [[index[c] for c in tier] for tier in r["tiers"]],
                              "unsafe": [index[c] for c in r["unsafe"]], "labeler": r["labeler"],
                              "source": "ai" if r["role"] == "ai" else "human"}) + "\n"
    else:
        raise StoreError(f"export format must be pairs or rankings, got {fmt!r}")


def export_jsonl(store: Store, path: str | Path, fmt: str = "pairs", **kwargs) -> int:
    """Write export_lines to a file (via a temporary file, renamed); returns the number of lines."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for line in export_lines(store, fmt, **kwargs):
            f.write(line)
            n += 1
    tmp.replace(path)
    return n
