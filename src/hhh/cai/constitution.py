"""The constitution: principles for critique and revision, comparison questions for AI feedback, worked examples.

A TOML file with three arrays of tables (the default, `constitution.toml` beside this module, documents them):

    [[principle]]   name, critique, revision      the supervised stage samples one per prompt
    [[comparison]]  name, question                the feedback stage samples one per pair
    [[example]]     principle, prompt, answer, critique, revision   few-shot examples before each request

A bad file is a one-line ConfigError naming the entry and the field:
`constitution my.toml: principle 3 ("honesty"): field 'revision' is missing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hhh.config import ConfigError, read_toml

DEFAULT = Path(__file__).with_name("constitution.toml")


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class Principle(_Entry):
    name: str = Field(min_length=1)
    critique: str = Field(min_length=1, description="asks the model to critique its last answer")
    revision: str = Field(min_length=1, description="asks the model to rewrite its answer")


class Comparison(_Entry):
    name: str = Field(min_length=1)
    question: str = Field(min_length=1, description="asks which of two answers is better")


class Example(_Entry):
    principle: str = Field(min_length=1, description="the principle whose critique and revision requests it answers")
    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class Constitution(_Entry):
    principle: list[Principle] = Field(min_length=1)
    comparison: list[Comparison] = Field(min_length=1)
    example: list[Example] = []
    source: str = "constitution"

    @model_validator(mode="after")
    def _unique_names(self) -> Constitution:
        for kind in ("principle", "comparison"):
            seen: set[str] = set()
            for i, entry in enumerate(getattr(self, kind), 1):
                if entry.name in seen:
                    raise ValueError(f"{kind} {i} ({entry.name!r}): name repeats an earlier {kind}")
                seen.add(entry.name)
        names = {p.name for p in self.principle}
        for i, ex in enumerate(self.example, 1):
            if ex.principle not in names:
                raise ValueError(f"example {i}: field 'principle' names no principle ({ex.principle!r})")
        return self

    def named(self, name: str) -> Principle:
        return next(p for p in self.principle if p.name == name)

    def principle_for(self, seed: int, index: int) -> Principle:
        """The principle for prompt number `index`: drawn from its own stream (seed, index), so it does not
        depend on batching, on which prompts were filtered or on where a resumed run starts."""
        return self.principle[int(np.random.default_rng([seed, index]).integers(len(self.principle)))]

    def comparison_for(self, seed: int, index: int) -> Comparison:
        return self.comparison[int(np.random.default_rng([seed, index, 1]).integers(len(self.comparison)))]


def _where(loc: tuple, data: dict[str, Any]) -> str:
    """'principle 3 ("honesty"): field 'revision'' from a pydantic error location."""
    if not loc:
        return "(file)"
    kind = str(loc[0])
    if len(loc) == 1:
        return f"[[{kind}]]"
    index = int(loc[1])
    entry = data.get(kind, [])[index] if isinstance(data.get(kind), list) else {}
    name = f" ({entry['name']!r})" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else ""
    field = f": field {str(loc[2])!r}" if len(loc) > 2 else ""
    return f"{kind} {index + 1}{name}{field}"


def load_constitution(path: str | Path | None = None) -> Constitution:
    """The constitution in `path` (default: hhh's own), validated.

    >>> c = load_constitution()
    >>> len(c.principle) >= 16, c.comparison[0].question.endswith("?")
    (True, True)
    """
    path = Path(path) if path is not None else DEFAULT
    label = f"constitution {path}"
    data = read_toml(path, "constitution")
    for kind, value in data.items():
        if kind not in ("principle", "comparison", "example"):
            raise ConfigError(f"{label}: unknown table {kind!r} (expected [[principle]], [[comparison]], [[example]])")
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{label}: {kind!r} must be an array of tables ([[{kind}]])")
    try:
        return Constitution.model_validate({**data, "source": str(path)})
    except ValidationError as err:
        e = err.errors()[0]
        if e["type"] == "value_error":  # from _unique_names: already names the entry
            raise ConfigError(f"{label}: {str(e['msg']).removeprefix('Value error, ')}") from None
        what = _where(tuple(e["loc"]), data)
        if e["type"] == "missing":
            msg = "is missing" if len(e["loc"]) > 2 else "needs at least one entry"
        elif e["type"] == "extra_forbidden":
            msg = "is not a known field"
        elif e["type"] == "too_short" and len(e["loc"]) == 1:
            msg = "needs at least one entry"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        raise ConfigError(f"{label}: {what} {msg}") from None
