"""Preference pairs (prompt, chosen, rejected), from a JSONL file, an `hf:` dataset or the preference store: what
reward models (hhh.train.rm) and the DPO family (hhh.train.dpo) train on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class PairSettings(Protocol):
    """Where pairs come from (RMConfig, DPOConfig...)."""

    @property
    def data(self) -> str | None: ...
    @property
    def data_source(self) -> str: ...
    @property
    def labelers(self) -> list[str]: ...
    @property
    def max_pairs(self) -> int | None: ...


@dataclass(frozen=True)
class Pairs:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    tie: list[bool]
    margin: list[float | None]
    probability: list[float | None] | None = None  # soft labels, P(chosen is better) (None: hard labels)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: Sequence[int]) -> Pairs:
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return Pairs(pick(self.prompts), pick(self.chosen), pick(self.rejected), pick(self.tie), pick(self.margin),
                     None if self.probability is None else pick(self.probability))


def load_pairs(settings: PairSettings, *, skip_ties: bool = False) -> Pairs:
    """Pairs from a JSONL file, an hf: dataset or a preference store; ties marked, or left out (before max_pairs)."""
    data = settings.data
    if not data:
        raise ValueError("no preference data given")
    if data.startswith("db:") or data.endswith(".db"):
        from hhh.feedback.store import Store

        db = data.removeprefix("db:")
        if "://" not in db and not Path(db).is_file():
            raise FileNotFoundError(f"data {data!r}: no preference store at {db}")
        rows = Store(db).pairs(source=settings.data_source, labelers=settings.labelers)
    elif data.startswith("hf:"):
        rows = _hf_rows(data)
    else:
        from hhh.feedback.io import read_records

        if not Path(data).is_file():
            raise FileNotFoundError(f"data {data!r}: no such file")
        rows = []
        for rec in read_records(data, "pairs"):
            rows.append({"prompt": rec["prompt"], "chosen": rec["completions"][0], "rejected": rec["completions"][1],
                         "tie": len(rec["tiers"]) == 1, "margin": rec["margin"], "probability": rec["probability"]})
    if skip_ties:
        rows = [r for r in rows if not r.get("tie")]
    rows = rows[: settings.max_pairs] if settings.max_pairs else rows
    if not rows:
        raise ValueError(f"data {data!r}: no preference pairs")
    probability = [r.get("probability") for r in rows]
    return Pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                 [bool(r.get("tie")) for r in rows], [r.get("margin") for r in rows],
                 probability if any(p is not None for p in probability) else None)


def _hf_rows(spec: str) -> list[dict]:
    from datasets import load_dataset

    from hhh.feedback.io import pair_record

    name, _, split = spec[3:].partition(":")
    rows = []
    for i, row in enumerate(load_dataset(name, split=split or "train")):
        rec = pair_record(dict(row), f"{spec} row {i}")
        rows.append({"prompt": rec["prompt"], "chosen": rec["completions"][0], "rejected": rec["completions"][1],
                     "tie": len(rec["tiers"]) == 1, "margin": rec["margin"]})
    return rows
