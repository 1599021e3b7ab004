"""ReAct (Yao et al. 2022): the model alternates Thought / Action / Action Input with the tools' Observations
until it writes a Final Answer.

    user       instructions, the tools' signatures, one worked example, the question
    assistant  Thought: ... / Action: calculator / Action Input: 17 * 23
    user       Observation: 391                       <- the tool's result (or its error, as text)
    assistant  Thought: ... / Final Answer: 391

A reply that cannot be read (no Action, an unknown tool, an Action without input) goes back to the model with the
parse error, up to `parse_retries` times in a row; every model call counts towards `max_steps`. An "Observation:"
the model writes itself is its own invention: it and what follows are dropped (one written before the reply's
first field is skipped). Several questions run in lockstep, so a
local model answers them in one batch per step. The trace (every reply, action, observation and error) is returned
and can be saved as JSON.

>>> results = run_agent(build_critic("bundled:smollm2-135m-instruct"), ["What is 17 * 23?"],   # doctest: +SKIP
...                     default_tools())
>>> results[0].answer, len(results[0].trace)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hhh.apps.tools import Tool, ToolError

INSTRUCTIONS = """Answer the question. You can use these tools:
{tools}

Use this format, one step at a time:
Thought: what to do next
Action: the tool's name, one of [{names}]
Action Input: the tool's argument (a JSON object when it takes several)
Then stop and wait: the Observation (the tool's result) comes back to you. Repeat as needed. When you know the
answer, write:
Thought: I know the answer
Final Answer: the answer"""

# a worked example written for this project (the calculator is always there)
EXAMPLE = [
    {"role": "user", "content": "Question: A train has 12 cars with 64 seats each. 517 seats are taken. How many "
                                "are free?"},
    {"role": "assistant", "content": "Thought: I need 12 * 64 - 517.\nAction: calculator\n"
                                     "Action Input: 12 * 64 - 517"},
    {"role": "user", "content": "Observation: 251"},
    {"role": "assistant", "content": "Thought: I know the answer\nFinal Answer: 251"},
]

_FIELD = re.compile(r"^[ \t]*\**[ \t]*(Thought|Action Input|Action|Final Answer)[ \t]*(?::[ \t]*\**|\**[ \t]*:)[ \t]*",
                    re.IGNORECASE | re.MULTILINE)  # "Action:", "**Action:**", "**Action**:"
_INLINE = re.compile(r"^\s*([A-Za-z_]\w*)\s*[\[(](.*)[\])]\s*$", re.DOTALL)  # Action: calculator[2 + 2]


class ParseError(ValueError):
    """A reply the loop cannot act on; the message is what the model is told."""


@dataclass(frozen=True)
class Act:
    thought: str
    tool: str
    input: str


@dataclass(frozen=True)
class Finish:
    thought: str
    answer: str


_OBSERVATION = re.compile(r"^[ \t]*\**[ \t]*Observation[ \t]*\**[ \t]*:", re.IGNORECASE | re.MULTILINE)
_EXPRESSION = re.compile(r"^[\d\s.,+\-*/()%^]*\d[\d\s.,+\-*/()%^]*$")


def own_part(text: str) -> str:
    """The reply up to the first observation the model wrote itself after its first field: that observation and
    everything after it are invented (one written before any field is dropped, the rest kept)."""
    first = _FIELD.search(text)
    if first is None:
        return text.strip()
    invented = _OBSERVATION.search(text, first.end())
    return text[first.start():invented.start() if invented else len(text)].strip()


def parse(text: str, tools: Sequence[str]) -> Act | Finish:
    """One reply as an Act or a Finish; raises ParseError saying what is wrong. Lenient where the intent is
    plain: markdown around the field names, `Action: tool[input]`, and `Action: 12 * 7 = 84` (an arithmetic
    expression where the tool's name should be) read as the calculator on `12 * 7`, when there is a calculator."""
    text = own_part(text)
    fields: dict[str, str] = {}
    where: dict[str, int] = {}
    marks = list(_FIELD.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        key = m.group(1).lower()
        if key not in fields:  # the first of each field counts
            fields[key], where[key] = text[m.end():end].strip(), m.start()
    thought = fields.get("thought", "")
    action = fields.get("action")
    final = fields.get("final answer")
    if final is not None and (action is None or where["final answer"] < where["action"]):
        if not final:
            raise ParseError("the Final Answer is empty")
        return Finish(thought, final)
    if action is None:
        raise ParseError("no 'Action:' line and no 'Final Answer:' line")
    name = action.splitlines()[0].strip().strip("`*\"'") if action else ""
    given = fields.get("action input")
    inline = _INLINE.match(name)
    if inline and inline.group(1) in tools:
        name, given = inline.group(1), given if given is not None else inline.group(2)
    expression = name.split("=")[0].strip().rstrip(".")
    if name not in tools and "calculator" in tools and _EXPRESSION.match(expression):
        name, given = "calculator", expression
    if name not in tools:
        raise ParseError(f"unknown tool {name!r}; the tools are: {', '.join(tools)}")
    if given is None or not given.strip():
        raise ParseError(f"'Action: {name}' has no 'Action Input:' line")
    return Act(thought, name, given.strip().strip("`").strip())


@dataclass
class Event:
    step: int
    reply: str                      # what the model wrote
    kind: str                       # "act", "final", "parse_error"
    tool: str | None = None
    input: str | None = None
    observation: str | None = None  # the tool's result, or its error
    tool_error: bool = False


@dataclass
class Result:
    question: str
    answer: str | None
    stopped: str                    # "final", "step_limit", "parse_errors"
    trace: list[Event] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "stopped": self.stopped,
                "trace": [asdict(e) for e in self.trace]}


def conversation(question: str, tools: Sequence[Tool]) -> list[dict[str, str]]:
    listing = "\n".join(f"- {t.signature()}: {t.description}" for t in tools)
    head = INSTRUCTIONS.format(tools=listing, names=", ".join(t.name for t in tools))
    example = EXAMPLE if any(t.name == "calculator" for t in tools) else []
    turns = [dict(t) for t in example]
    if turns:
        turns[0]["content"] = f"{head}\n\n{turns[0]['content']}"
        return turns + [{"role": "user", "content": f"Question: {question}"}]
    return [{"role": "user", "content": f"{head}\n\nQuestion: {question}"}]


def run_agent(model, questions: Sequence[str], tools: Sequence[Tool], *, max_steps: int = 8,
              parse_retries: int = 2, max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int = 0) -> list[Result]:
    """Answer each question with the ReAct loop; `model`: anything with hhh.cai.critic's generate."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: two tools are named {next(n for n in names if names.count(n) > 1)!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    by_name = {t.name: t for t in tools}
    generator = torch.Generator().manual_seed(seed)
    dialogs = [conversation(q, tools) for q in questions]
    results = [Result(q, None, "step_limit") for q in questions]
    misses = [0] * len(questions)
    live = list(range(len(questions)))
    for step in range(1, max_steps + 1):
        if not live:
            break
        replies = model.generate([dialogs[i] for i in live], max_new_tokens=max_new_tokens,
                                 temperature=temperature, generator=generator)
        still = []
        for i, reply in zip(live, replies, strict=True):
            text = reply.text
            kept = own_part(text)
            try:
                move = parse(text, names)
            except ParseError as e:
                results[i].trace.append(Event(step, text, "parse_error", observation=str(e)))
                misses[i] += 1
                if misses[i] > parse_retries:
                    results[i].stopped = "parse_errors"
                    continue
                dialogs[i] = dialogs[i] + [
                    {"role": "assistant", "content": kept or text},
                    {"role": "user", "content": f"I could not read that: {e}. Reply with 'Thought:', then either "
                                                f"'Action:' and 'Action Input:' lines or a 'Final Answer:' line."}]
                still.append(i)
                continue
            misses[i] = 0
            if isinstance(move, Finish):
                results[i].trace.append(Event(step, text, "final"))
                results[i].answer, results[i].stopped = move.answer, "final"
                continue
            try:
                observation, failed = by_name[move.tool].call(move.input), False
            except ToolError as e:
                observation, failed = f"Error: {e}", True
            results[i].trace.append(Event(step, text, "act", move.tool, move.input, observation, failed))
            dialogs[i] = dialogs[i] + [{"role": "assistant", "content": kept},
                                       {"role": "user", "content": f"Observation: {observation}"}]
            still.append(i)
        live = still
    return results


def save_trace(results: Sequence[Result], path: str | Path, **meta) -> Path:
    """The results and their traces as one JSON file (with whatever `meta` says about the run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=1) + "\n")
    return path
