"""Arithmetic word problems answered four ways, and measured on one problem set:

    direct     the question, then "answer with the number only" (greedy)
    cot        few-shot chain-of-thought (Wei et al. 2022): worked steps, then "The answer is N." (greedy)
    sc         self-consistency (Wang et al. 2022): k chain-of-thought samples, the most common answer wins
    pal        the model writes a program, the sandbox runs it (hhh.apps.pal)
    react      the ReAct loop with the calculator and the sandboxed python tool (hhh.apps.react); opt-in

Problems come from reasoning-gym (offline generators with known answers and scorers): `gsm_symbolic` (GSM8K-style
templates with fresh numbers) and `basic_arithmetic` (expressions), drawn with a fixed seed.

>>> probs = problems(200, seed=0)                                     # doctest: +SKIP
>>> report = evaluate(build_critic("bundled:smollm2-135m-instruct"), probs)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from hhh.rollout import Prompt

DIRECT = "Reply with the final number only, nothing else."
COT = "Think it through step by step, then finish with a line of the form: The answer is N."

# worked examples written for this project (none is in reasoning-gym's templates)
EXAMPLES = [
    ("A school orders 14 boxes of pencils with 25 pencils in each box. 48 pencils are handed out on the first day. "
     "How many pencils are left?",
     "14 boxes of 25 pencils are 14 * 25 = 350 pencils. After 48 are handed out, 350 - 48 = 302 remain.", "302"),
    ("Calculate 7 - 3 * -4.",
     "Multiplication comes first: 3 * -4 = -12. Then 7 - (-12) = 7 + 12 = 19.", "19"),
    ("A pool holds 1200 litres. A pump fills it at 40 litres a minute, and it is already a quarter full. How many "
     "minutes until it is full?",
     "A quarter of 1200 is 300 litres, so 1200 - 300 = 900 litres are missing. At 40 litres a minute that takes "
     "900 / 40 = 22.5 minutes.", "22.5"),
]

TASKS = {  # reasoning-gym dataset -> its settings (small numbers: a 135M model has a chance)
    "gsm_symbolic": {},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
}

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
FINAL = [re.compile(p, re.IGNORECASE) for p in (
    rf"answer is:?\s*\**\s*({NUMBER})",     # the format the prompt asks for (and "final answer is ...")
    rf"\\boxed\{{\s*({NUMBER})\s*\}}",      # LaTeX habit of math-tuned models
    rf"####\s*({NUMBER})",                  # GSM8K's own marker
    rf"answer\s*[:=]\s*\**\s*({NUMBER})",   # "Answer: 12", "answer = 12"
)]


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str
    entry: dict  # reasoning-gym's record (its scorer needs it)


def problems(n: int, *, seed: int = 0, tasks: Sequence[str] = tuple(TASKS)) -> list[Problem]:
    """`n` problems split evenly over `tasks` (the first tasks take the remainder), the same for the same seed."""
    import reasoning_gym

    if n < len(tasks):
        raise ValueError(f"problems: n={n} is fewer than the {len(tasks)} tasks")
    out: list[Problem] = []
    for i, task in enumerate(tasks):
        if task not in TASKS:
            raise ValueError(f"problems: unknown task {task!r} (known: {', '.join(TASKS)})")
        size = n // len(tasks) + (1 if i < n % len(tasks) else 0)
        data = reasoning_gym.create_dataset(task, size=size, seed=seed, **TASKS[task])
        out += [Problem(task, e["question"], str(e["answer"]), e) for e in data]
    return out


def direct_conversation(question: str) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for q, _, a in EXAMPLES:
        turns += [{"role": "user", "content": f"{q}\n{DIRECT}"}, {"role": "assistant", "content": a}]
    return turns + [{"role": "user", "content": f"{question}\n{DIRECT}"}]


def cot_conversation(question: str) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for q, steps, a in EXAMPLES:
        turns += [{"role": "user", "content": f"{q}\n{COT}"},
                  {"role": "assistant", "content": f"{steps}\nThe answer is {a}."}]
    return turns + [{"role": "user", "content": f"{question}\n{COT}"}]


def canonical(number: str) -> str | None:
    """'1,200' -> '1200', '$3.50' -> '3.5', '12.0' -> '12', '3/4' -> '0.75'; None if it is not a number."""
    text = number.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/")
            value = int(num) / int(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _number(value: float | None) -> str | None:
    return None if value is None else canonical(repr(value))


def extract_answer(text: str) -> str | None:
    """The model's final number from messy output: the last "The answer is N" (or \\boxed{N}, #### N, Answer: N),
    else the last number in the text; None when there is no number at all."""
    for pattern in FINAL:
        found = pattern.findall(text)
        if found:
            return canonical(found[-1])
    numbers = re.findall(NUMBER, text)
    return canonical(numbers[-1]) if numbers else None


def majority(answers: Sequence[str | None]) -> str | None:
    """The most common extracted answer (None: no sample had one); a tie goes to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def is_correct(predicted: str | None, problem: Problem) -> bool:
    """reasoning-gym's own scorer, on the canonical form of the prediction."""
    if predicted is None:
        return False
    import reasoning_gym

    score = reasoning_gym.get_score_answer_fn(problem.entry["metadata"]["source_dataset"])
    return float(score(predicted, problem.entry)) >= 1.0 or canonical(problem.answer) == predicted


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Score:
    method: str
    n: int
    correct: int
    failed_extraction: int  # answers with no number in them (PAL: no program ran to an answer)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    def row(self) -> dict:
        lo, hi = self.interval
        return {**asdict(self), "accuracy": self.accuracy, "ci95": [lo, hi],
                "extraction_failure_rate": self.failed_extraction / self.n if self.n else 0.0}


def _generate(model, conversations: Sequence[Prompt], *, max_new_tokens: int, temperature: float,
              generator: torch.Generator) -> list[str]:
    return [g.text for g in model.generate(conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                                           generator=generator)]


def check(methods: Sequence[str], k: int) -> None:
    """One-line errors for settings evaluate() cannot use (before a model is loaded)."""
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"methods: unknown {', '.join(sorted(unknown)) or '(none given)'} "
                         f"(known: {', '.join(METHODS)})")
    if "sc" in methods and k < 2:
        raise ValueError(f"k: self-consistency needs at least 2 samples, got {k}")


METHODS = ("direct", "cot", "sc", "pal", "react")


def run_method(model, method: str, questions: Sequence[str], *, k: int = 5, temperature: float = 0.7,
               max_new_tokens: int = 192, seed: int = 0) -> dict:
    """One method on every question: {"predictions": [answer or None, ...], "fields": [{what to keep}, ...]}.
    Each method draws from its own generator seeded by `seed`, so a method's answers do not depend on which
    methods ran before it (a resumed evaluation gives what an uninterrupted one would)."""
    from hhh.apps import pal

    generator = torch.Generator().manual_seed(seed)
    if method in ("direct", "cot"):
        conversations = [(direct_conversation if method == "direct" else cot_conversation)(q) for q in questions]
        texts = _generate(model, conversations, max_new_tokens=24 if method == "direct" else max_new_tokens,
                          temperature=0.0, generator=generator)
        return {"predictions": [extract_answer(t) for t in texts], "fields": [{method: t} for t in texts]}
    if method == "sc":
        convs = [cot_conversation(q) for q in questions for _ in range(k)]
        texts = _generate(model, convs, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
        samples = [[extract_answer(t) for t in texts[i * k:(i + 1) * k]] for i in range(len(questions))]
        return {"predictions": [majority(v) for v in samples], "fields": [{"sc_samples": v} for v in samples]}
    if method == "pal":
        solved = pal.solve(model, list(questions), seed=seed)
        return {"predictions": [_number(pal.as_number(done.answer)) for done in solved],
                "fields": [{"pal_code": done.attempts[-1].code if done.attempts else "", "pal_error": done.error,
                            "pal_from_stdout": done.from_stdout} for done in solved]}
    if method == "react":
        from hhh.apps.react import run_agent
        from hhh.apps.tools import default_tools

        results = run_agent(model, list(questions), default_tools(), seed=seed)
        return {"predictions": [None if r.answer is None else extract_answer(r.answer) for r in results],
                "fields": [{"react": r.to_dict()} for r in results]}
    raise ValueError(f"methods: unknown {method}")


def evaluate(model, probs: Sequence[Problem], *, methods: Sequence[str] = ("direct", "cot", "sc", "pal"),
             k: int = 5, temperature: float = 0.7, max_new_tokens: int = 192, seed: int = 0,
             progress=None, done: dict[str, dict] | None = None, on_method=None) -> dict:
    """Accuracy of each method on `probs` with 95% intervals and the extraction failure rate, and every answer.
    `model`: anything with hhh.cai.critic's generate (a local model or an endpoint). `done`: results of
    run_method already at hand (a resumed evaluation), not run again; `on_method(method, result)` is called as
    each of the others finishes (to save it)."""
    check(methods, k)
    questions = [p.question for p in probs]
    records: list[dict] = [{"task": p.task, "question": p.question, "answer": p.answer} for p in probs]
    predictions: dict[str, list[str | None]] = {}
    for method in methods:
        if done and method in done:
            result = done[method]
        else:
            result = run_method(model, method, questions, k=k, temperature=temperature,
                                max_new_tokens=max_new_tokens, seed=seed)
            if on_method is not None:
                on_method(method, result)
        predictions[method] = result["predictions"]
        for r, fields in zip(records, result["fields"], strict=True):
            r.update(fields)
        if progress is not None:
            progress(method)
    scores = []
    for method in methods:
        preds = predictions[method]
        right = [is_correct(p, prob) for p, prob in zip(preds, probs, strict=True)]
        for r, p, ok in zip(records, preds, right, strict=True):
            r[f"{method}_pred"], r[f"{method}_correct"] = p, ok
        scores.append(Score(method, len(probs), sum(right), sum(p is None for p in preds)))
    by_task = {task: [Score(s.method, sum(p.task == task for p in probs),
                            sum(r[f"{s.method}_correct"] for r in records if r["task"] == task),
                            sum(r[f"{s.method}_pred"] is None for r in records if r["task"] == task)).row()
                      for s in scores]
               for task in dict.fromkeys(p.task for p in probs)}
    return {"model": getattr(model, "name", "?"), "seed": seed, "k": k, "temperature": temperature,
            "n": len(probs), "scores": [s.row() for s in scores], "by_task": by_task, "records": records}


def table(report: dict) -> str:
    """Markdown: one row per method, accuracy with its 95% interval and the extraction failure rate."""
    lines = ["| method | accuracy (95% CI) | no answer extracted |", "|---|---|---|"]
    names = {"direct": "direct", "cot": "chain-of-thought", "sc": f"CoT + self-consistency (k={report['k']})",
             "pal": "PAL (sandbox)", "react": "ReAct (calculator, python)"}
    for s in report["scores"]:
        lo, hi = s["ci95"]
        lines.append(f"| {names[s['method']]} | {s['correct']}/{s['n']} = {s['accuracy']:.1%} "
                     f"({lo:.1%}-{hi:.1%}) | {s['extraction_failure_rate']:.1%} |")
    return "\n".join(lines)
