"""Reward spec strings, parsed and checked without loading any model (no torch): a config with a bad spec is a
one-line error before a model loads or a run folder is made.

    spec  := term ("+" term)*
    term  := [NUMBER "*"] source
    source:= toxicity | sentiment | refusal | length[:N] | classifier:SPEC[:LABEL] | rm:RUN_DIR | module:function
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SIMPLE = ("toxicity", "sentiment", "refusal")


@dataclass(frozen=True)
class Term:
    weight: float | None  # None: written without a weight (a lone source is not wrapped in a sum)
    kind: str  # toxicity | sentiment | refusal | length | classifier | rm | function
    arg: str | None = None


def parse_reward(spec: str) -> list[Term]:
    """The terms of a reward spec; ValueError naming the spec and the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("reward spec is empty")
    terms = []
    for part in (p.strip() for p in spec.split("+")):
        if not part:
            raise ValueError(f"reward spec {spec!r}: an empty term (a '+' with nothing beside it)")
        weight: float | None = None
        head, star, rest = part.partition("*")
        if star:
            try:
                weight = float(head)
            except ValueError:
                raise ValueError(f"reward spec {spec!r}: weight {head.strip()!r} is not a number") from None
            part = rest.strip()
            if not part:
                raise ValueError(f"reward spec {spec!r}: weight {head.strip()} has no reward after '*'")
        terms.append(_term(part, weight, spec))
    return terms


def _term(source: str, weight: float | None, spec: str) -> Term:
    head, colon, rest = source.partition(":")
    if source in SIMPLE:
        return Term(weight, source)
    if head == "length":
        if colon and not (rest.isascii() and rest.isdigit() and int(rest) > 0):
            raise ValueError(f"reward {source!r}: length target must be a positive integer")
        return Term(weight, "length", rest or "50")
    if head == "classifier":
        if not rest:
            raise ValueError("reward 'classifier:' needs a model spec, e.g. classifier:org/model[:label]")
        model = rest if Path(rest).exists() or ":" not in rest else rest.rpartition(":")[0]
        from hhh.models.spec import resolve

        resolve(model)  # a missing local folder or file is named now; a hub id is looked up when it loads
        return Term(weight, "classifier", rest)
    if head == "rm":
        if not rest:
            raise ValueError("reward 'rm:' needs a run folder of `hhh rm train`, e.g. rm:runs/rm-20261123-120000")
        folder = Path(rest)
        if not ((folder / "rm.json").is_file() or (folder / "model" / "rm.json").is_file()):
            raise ValueError(f"reward {source!r}: {rest} is not a reward model run folder (no model/rm.json)")
        return Term(weight, "rm", rest)
    if colon and re.fullmatch(r"[A-Za-z_][\w.]*", head) and re.fullmatch(r"[A-Za-z_]\w*", rest):
        python_function(source)
        return Term(weight, "function", source)
    raise ValueError(f"unknown reward {source!r} in {spec!r}: expected toxicity, sentiment, refusal, length[:N], "
                     "classifier:SPEC[:LABEL], rm:RUN_DIR or module:function")


def python_function(target: str) -> Callable:
    """The callable named by `module:function`; ValueError when the module does not import or lacks it."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {target!r}: cannot import module {module_name!r} ({e})") from None
    if not callable(getattr(module, attr, None)):
        raise ValueError(f"reward {target!r}: module {module_name!r} has no function {attr!r}")
    return getattr(module, attr)
