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

from sqlalchemy import select

from hhh.data import DataError, read_jsonl
from hhh.feedback.rankings import RankingError, check_tiers, tiers_to_pairs
from hhh.feedback.store import Labeler, Ranking, Store, StoreError

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


def pair_record(row: dict, where: str) -> dict[str, Any]:
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
    probability = row.get("probability")
    if probability is not None and (not isinstance(probability, int | float) or isinstance(probability, bool)
                                    or not 0.5 <= probability <= 1):
        raise DataError(f"{where}: field 'probability' must be a number in [0.5, 1] (P(chosen is better))")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are the same text")
    return {"prompt": prompt, "completions": [chosen, rejected], "tiers": [[0, 1]] if tie else [[0], [1]],
            "unsafe": [], "margin": margin, "probability": probability, "labeler": row.get("labeler"),
            "source": row.get("source")}


def _ranking_record(row: dict, where: str) -> dict[str, Any]:
    prompt = _string(row, "prompt", where)
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2 or not all(isinstance(c, str) for c in completions):
        raise DataError(f"{where}: field 'completions' must be a list of at least 2 strings")
    if len(set(completions)) != len(completions):
        raise DataError(f"{where}: field 'completions' holds the same text twice")
    try:
        tiers = check_tiers(row.get("ranking") or [], range(len(completions)))
    except RankingError as e:
        raise DataError(f"{where}: field 'ranking': {e}") from None
    unsafe = row.get("unsafe", [])
    if not isinstance(unsafe, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                               and 0 <= i < len(completions) for i in unsafe):
        raise DataError(f"{where}: field 'unsafe' must list indices into 'completions'")
    return {"prompt": prompt, "completions": completions, "tiers": tiers, "unsafe": unsafe, "margin": None,
            "labeler": row.get("labeler"), "source": row.get("source")}


def read_records(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Parse every line first (so a bad line stops the import before anything is written)."""
    records = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        kind = fmt if fmt != "auto" else ("rankings" if "completions" in row else "pairs")
        rec = _ranking_record(row, where) if kind == "rankings" else pair_record(row, where)
        records.append({**rec, "where": where, "kind": kind})
    return records


def merge_pairs(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Several pair lines of one prompt by one labeler -> one ranking, when together they are the pairs of some
    ranking (as an export writes them, with or without its ties); anything else (a cycle, or a partial order such
    as a>b, c>d alone) is an error.

    A comparison no line states is read as a tie. Tiers then come from win counts (a tie counts 1/2 to each side):
    in any ranking every completion of a higher tier has more wins than every completion of a lower one. The
    ranking must imply exactly the stated ordered pairs, and ties for all the others.
    """
    texts = list(dict.fromkeys(c for rec in records for c in rec["completions"]))
    index = {t: i for i, t in enumerate(texts)}
    stated: dict[tuple[int, int], tuple[int, int, bool]] = {}  # (low, high) index -> (better, worse, tie)
    margins: dict[tuple[int, int], float] = {}
    probabilities: dict[tuple[int, int], float] = {}
    wins = [0.0] * len(texts)
    for rec in records:
        if rec["kind"] != "pairs":
            raise DataError(f"{rec['where']}: another line of this file ranks this prompt for labeler "
                            f"{rec['labeler']!r}; only pair lines can be merged")
        chosen, rejected = (index[c] for c in rec["completions"])
        key, tie = (min(chosen, rejected), max(chosen, rejected)), len(rec["tiers"]) == 1
        if key in stated:
            raise DataError(f"{rec['where']}: these two completions were already compared on an earlier line")
        stated[key] = (*key, True) if tie else (chosen, rejected, False)
        if rec["margin"] is not None:
            margins[stated[key][:2]] = rec["margin"]
        if rec.get("probability") is not None:
            probabilities[stated[key][:2]] = rec["probability"]
        wins[chosen] += 0.5 if tie else 1.0
        wins[rejected] += 0.5 if tie else 0.0
    n = len(texts)
    for key in ((a, b) for a in range(n) for b in range(a + 1, n)):
        if key not in stated:  # unstated: a tie
            wins[key[0]] += 0.5
            wins[key[1]] += 0.5
    levels = sorted(set(wins), reverse=True)
    tiers = [[i for i, w in enumerate(wins) if w == level] for level in levels]
    implied = {(min(p.better, p.worse), max(p.better, p.worse)): (p.better, p.worse, p.tie) for p in tiers_to_pairs(tiers)}
    if any(implied[k] != v for k, v in stated.items()) or any(not v[2] for k, v in implied.items() if k not in stated):
        raise DataError(f"{records[0]['where']}: the {len(records)} pairs of this prompt by labeler "
                        f"{records[0]['labeler']!r} do not form one ranking (comparisons missing or contradicting "
                        "each other); give each line its own 'labeler', or import rankings instead")
    return {**records[0], "completions": texts, "tiers": tiers, "unsafe": [], "margin": None, "margins": margins,
            "probability": None, "probabilities": probabilities}


def import_jsonl(store: Store, path: str | Path, *, fmt: str = "auto", labeler: str = "import",
                 role: str = "labeler", model: str = "import") -> dict[str, int]:
    """Add the prompts, completions and rankings of a pairs or rankings JSONL file; returns counts.

    Each line is one ranking by the line's "labeler" (default `labeler`), created as needed with `role`, or as an
    AI labeler when the line says "source": "ai" (no token: tokens come from `hhh label add-labeler`). Several
    pair lines of one prompt by one labeler are merged into the one ranking they describe. A prompt that labeler
    already ranked in the store is skipped.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in read_records(path, fmt):
        rec["labeler"] = rec["labeler"] or labeler
        groups.setdefault((rec["prompt"], rec["labeler"]), []).append(rec)
    records = [group[0] if len(group) == 1 else merge_pairs(group) for group in groups.values()]
    added = skipped = 0
    with store.write() as s:
        labelers: dict[str, int] = {}
        for rec in records:
            name = rec["labeler"]
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
            margins = {(cids[a], cids[b]): m for (a, b), m in rec.get("margins", {}).items()}
            probabilities = {(cids[a], cids[b]): m for (a, b), m in rec.get("probabilities", {}).items()}
            store.add_pairs(s, ranking, margin=rec["margin"], margins=margins, probability=rec.get("probability"),
                            probabilities=probabilities)
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
            if p.get("probability") is not None:
                row["probability"] = p["probability"]
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
    if path.is_dir():
        raise StoreError(f"{path}: is a directory; give a file name to write the JSONL to")
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in export_lines(store, fmt, **kwargs):
                f.write(line)
                n += 1
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing half-written is left behind
    return n
