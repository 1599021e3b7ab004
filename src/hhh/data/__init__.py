"""Prompt sets: bundled sets, JSONL, CSV and HF datasets, one spec string each.

    redteam:train | redteam:eval | benign:train | benign:eval   bundled with hhh
    redteam:heldout                                             60 red-team prompts in other styles than the
                                                                templated train/eval splits (evaluation only)
    redteam (or redteam:all)                                    train + eval (heldout only by its name)
    path/to/file.jsonl                                          one JSON object per line with a "prompt" field
    path/to/file.csv                                            a header row with a "prompt" column
    hf:NAME[:SPLIT]                                             a Hugging Face dataset (network or local cache)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

BUNDLED_SETS = ("redteam", "benign")
SPLITS = ("train", "eval", "heldout", "all")


class DataError(ValueError):
    """A malformed input file; the message names the file and line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises DataError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a JSONL file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string")
    return value


def _bundled(name: str, split: str) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"prompt set {name}:{split}: unknown split (expected train, eval, heldout or all)")
    source = resources.files("hhh.data") / "files" / f"{name}.jsonl"
    with resources.as_file(source) as path:
        rows = [obj for _, obj in read_jsonl(path)]
    return [r["prompt"] for r in rows if r["split"] == split or (split == "all" and r["split"] != "heldout")]


def load_prompts(spec: str, *, field: str = "prompt", limit: int | None = None) -> list[str]:
    """Load a prompt set from its spec string (see module docstring).

    >>> len(load_prompts("redteam:eval"))
    60
    """
    name, _, split = spec.partition(":")
    if name in BUNDLED_SETS and not Path(spec).exists():
        prompts = _bundled(name, split or "all")
    elif name == "hf":
        prompts = _hf(split, field)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(
                f"prompt set {spec!r}: no such file, and not one of {', '.join(BUNDLED_SETS)}[:train|eval] or hf:NAME"
            )
        if path.suffix == ".jsonl":
            prompts = [_text(obj.get(field), f"{path}:{n}", field) for n, obj in read_jsonl(path)]
        elif path.suffix == ".csv":
            prompts = _csv(path, field)
        else:
            raise DataError(f"prompt set {spec!r}: expected a .jsonl or .csv file")
    if not prompts:
        raise DataError(f"prompt set {spec!r} is empty")
    return prompts[:limit] if limit else prompts


def _csv(path: Path, field: str) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise DataError(f"{path}:1: header has no column {field!r} (columns: {reader.fieldnames})")
        # line 1 is the header, so data row i sits on line i + 2 (for rows without embedded newlines)
        return [_text(row.get(field), f"{path}:{i + 2}", field) for i, row in enumerate(reader)]


def _hf(rest: str, field: str) -> list[str]:
    import datasets

    name, _, split = rest.partition(":")
    if not name:
        raise DataError("prompt set 'hf:' needs a dataset name, e.g. hf:org/name:train")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types; the user needs the one line
        raise DataError(f"prompt set hf:{rest}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if field not in ds.column_names:
        raise DataError(f"prompt set hf:{rest}: no column {field!r} (columns: {ds.column_names})")
    return [_text(v, f"hf:{rest} row {i}", field) for i, v in enumerate(ds[field])]


__all__ = ["DataError", "load_prompts", "read_jsonl"]
