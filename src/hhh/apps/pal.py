"""Program-aided answers (PAL, Gao et al. 2022): the model writes a Python program whose variable `answer` holds
the result; the sandbox (hhh.apps.sandbox) runs it. A program that fails comes back to the model with the error,
as text it can read, for another try.

    question -> [few-shot turns written for this project] -> model -> code block -> sandbox -> answer
                                         ^------ "Your program failed: NameError ... (line 3)" <------'

The model is anything hhh.cai.critic resolves: the policy, another local model, or an OpenAI-compatible endpoint.

>>> results = solve(build_critic("bundled:smollm2-135m-instruct"), ["What is 17 * 23?"])   # doctest: +SKIP
>>> results[0].answer                                                                    # doctest: +SKIP
'391'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hhh.apps.sandbox import Limits, Result, run

INSTRUCTION = ("Solve the problem by writing a short Python program. Store the final result in a variable named "
               "answer. Reply with the program only, in one ```python block.")

# worked examples written for this project: plain arithmetic, a rate, a remainder
EXAMPLES = [
    ("A baker makes 4 trays of 18 rolls and sells 55 of them. How many rolls are left?",
     "trays = 4\nrolls_per_tray = 18\nsold = 55\nanswer = trays * rolls_per_tray - sold"),
    ("A cyclist rides 42 km in 1.5 hours. At the same speed, how far does she ride in 4 hours?",
     "speed = 42 / 1.5\nanswer = speed * 4"),
    ("97 books are packed into boxes of 12. How many books do not fill a whole box?",
     "books = 97\nper_box = 12\nanswer = books % per_box"),
]

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def conversation(question: str) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for q, code in EXAMPLES:
        turns += [{"role": "user", "content": f"{INSTRUCTION}\n\n{q}"},
                  {"role": "assistant", "content": f"```python\n{code}\n```"}]
    return turns + [{"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}]


def extract_code(text: str) -> str:
    """The first fenced block (a fence cut off at the length limit still counts); else the text itself when it
    reads as code; else nothing."""
    found = FENCE.search(text)
    if found:
        return found.group(1).strip("\n")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    looks_like_code = lines and all(re.match(r"^\s*([A-Za-z_][\w.]*\s*=|print\(|import |from |def |for |if |"
                                             r"return |#|\s)", line) for line in lines)
    return "\n".join(lines) if looks_like_code else ""


@dataclass(frozen=True)
class Attempt:
    text: str               # what the model wrote
    code: str               # the program taken from it
    result: Result | None   # the sandbox's report (None: no program found)


@dataclass(frozen=True)
class Solved:
    question: str
    answer: str | None      # repr of `answer` from the last attempt that ran without error (or what it printed)
    attempts: list[Attempt] = field(default_factory=list)
    from_stdout: bool = False  # the program set no `answer`; the last number it printed is taken instead

    @property
    def error(self) -> str | None:
        last = self.attempts[-1] if self.attempts else None
        if self.answer is not None or last is None:
            return None
        return "no program in the answer" if last.result is None else (last.result.error or "no answer variable")


def feedback(attempt: Attempt) -> str:
    """What the model reads after a failed attempt."""
    if attempt.result is None:
        return "I could not find a program in your reply. " + INSTRUCTION
    if attempt.result.ok:
        return "Your program ran but did not set the variable answer. Set it and reply with the whole program."
    return f"Your program failed: {attempt.result.error}. Fix it and reply with the whole program."


def solve(model, questions: Sequence[str], *, retries: int = 1, max_new_tokens: int = 256,
          temperature: float = 0.2, seed: int = 0, limits: Limits | None = None) -> list[Solved]:
    """Answer each question with a program; a failed program goes back to the model with its error, up to
    `retries` times. A program that runs but sets no `answer` gives the last number it printed, if any. `model`: anything with hhh.cai.critic's `generate(conversations, ...)`."""
    generator = torch.Generator().manual_seed(seed)
    dialogs = [conversation(q) for q in questions]
    attempts: list[list[Attempt]] = [[] for _ in questions]
    answers: list[str | None] = [None] * len(questions)
    printed_answer = [False] * len(questions)
    todo = list(range(len(questions)))
    for _ in range(retries + 1):
        if not todo:
            break
        outs = model.generate([dialogs[i] for i in todo], max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=generator)
        still = []
        for i, out in zip(todo, outs, strict=True):
            code = extract_code(out.text)
            attempt = Attempt(out.text, code, run(code, limits) if code else None)
            attempts[i].append(attempt)
            if attempt.result is not None and attempt.result.ok and attempt.result.answer is not None:
                answers[i] = attempt.result.answer
                continue
            printed = last_number(attempt.result.stdout) if attempt.result is not None and attempt.result.ok else None
            if printed is not None:  # small models print the result instead of assigning it: take what it printed
                answers[i], printed_answer[i] = printed, True
                continue
            dialogs[i] = dialogs[i] + [{"role": "assistant", "content": out.text},
                                       {"role": "user", "content": feedback(attempt)}]
            still.append(i)
        todo = still
    return [Solved(q, a, t, p) for q, a, t, p in zip(questions, answers, attempts, printed_answer, strict=True)]


def last_number(text: str) -> str | None:
    """The last number a program printed ('Total: 1,200 eggs' -> '1200'), or None."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text or "")
    return found[-1].replace(",", "") if found else None


def as_number(answer: str | None) -> float | None:
    """A repr'd answer as a number, if it is one ('391', '12.0', "'7'", 'Fraction(3, 4)' -> 0.75)."""
    if answer is None:
        return None
    text = answer.strip().strip("'\"")
    fraction = re.fullmatch(r"Fraction\((-?\d+), (\d+)\)", text)
    if fraction:
        return int(fraction.group(1)) / int(fraction.group(2))
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None
