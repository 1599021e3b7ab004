"""Demonstrations (prompt -> response) for supervised fine-tuning (hhh.train.sft), from a JSONL file, an `hf:`
dataset or the preference store.

JSONL lines are {"prompt": str, "response": str}, or {"messages": [{"role", "content"}, ...]} whose last message is
the assistant's answer (the earlier turns are the prompt, chat-templated as a conversation); optional
"ended": false marks a response cut at a length limit (trained without EOS). From a store, each
prompt's top-ranked completions are the demonstrations: completions some labeler preferred to another and that no
labeler ranked below another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hhh.data import DataError, _text, read_jsonl
from hhh.rollout import Prompt


@dataclass(frozen=True)
class Demos:
    prompts: list[Prompt]
    responses: list[str]
    ended: list[bool] | None = None  # False: the response was cut at a length limit (trained without EOS); None: all ended

    def __len__(self) -> int:
        return len(self.prompts)

    def ends(self) -> list[bool]:
        return [True] * len(self) if self.ended is None else self.ended

    def take(self, index: Sequence[int]) -> Demos:
        return Demos([self.prompts[i] for i in index], [self.responses[i] for i in index],
                     None if self.ended is None else [self.ended[i] for i in index])

    def __add__(self, other: Demos) -> Demos:
        ended = None if self.ended is None and other.ended is None else self.ends() + other.ends()
        return Demos(self.prompts + other.prompts, self.responses + other.responses, ended)


def demo_record(row: dict, where: str) -> tuple[Prompt, str]:
    """(prompt, response) of one JSONL line or dataset row; DataError naming `where` and the field."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: field 'messages' must list at least a user and an assistant message")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{j}] needs a role of system, user or assistant")
            _text(m.get("content"), where, f"messages[{j}].content")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]
    missing = [k for k in ("prompt", "response") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (expected prompt and response, or messages)")
    return _text(row["prompt"], where, "prompt"), _text(row["response"], where, "response")


def load_demos(data: str, *, source: str = "all", labelers: Sequence[str] = (), limit: int | None = None) -> Demos:
    """Demonstrations from a JSONL file, `hf:NAME[:SPLIT]` or a store (`db:PATH`, or a path ending in .db)."""
    rows: list[tuple[Prompt, str]]
    ends: list[bool] = []
    if data.startswith("db:") or data.endswith(".db"):
        rows = _store_rows(data, source, labelers)
    elif data.startswith("hf:"):
        from datasets import load_dataset

        name, _, split = data[3:].partition(":")
        rows = [demo_record(dict(r), f"{data} row {i}") for i, r in enumerate(load_dataset(name, split=split or "train"))]
    else:
        if not Path(data).exists():
            raise FileNotFoundError(f"data {data!r}: no such file")
        rows, ends = [], []
        for lineno, row in read_jsonl(data):
            rows.append(demo_record(row, f"{data}:{lineno}"))
            ended = row.get("ended", True)
            if not isinstance(ended, bool):
                raise DataError(f"{data}:{lineno}: field 'ended' must be true or false")
            ends.append(ended)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise DataError(f"data {data!r}: no demonstrations")
    ended = ends[: len(rows)] if ends and not all(ends) else None
    return Demos([p for p, _ in rows], [r for _, r in rows], ended)


def _store_rows(data: str, source: str, labelers: Sequence[str]) -> list[tuple[Prompt, str]]:
    from hhh.feedback.store import Store

    db = data.removeprefix("db:")
    if "://" not in db and not Path(db).is_file():
        raise FileNotFoundError(f"data {data!r}: no preference store at {db}")
    pairs = Store(db).pairs(ties=False, source=source, labelers=labelers)
    beaten = {p["rejected_id"] for p in pairs}
    best: dict[int, tuple[str, str]] = {}
    for p in pairs:
        if p["chosen_id"] not in beaten:
            best.setdefault(p["chosen_id"], (p["prompt"], p["chosen"]))
    return list(best.values())
