"""The shape every alignment job on the detox task shares (`hhh detox`, `hhh dpo`, ...):

  1. evaluate the base model on the eval prompts
  2. train an adapter (the method's own loop in hhh.train)
  3. evaluate the adapter on the same prompts with the same seeds
  4. write report.html and the before/after table
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hhh.runs import RunDir


@dataclass(frozen=True)
class Trained:
    model: Any                 # the base model with the trained adapter on it, for the after-evaluation
    summary: dict[str, Any]    # written to summary.json
    stopped: str | None = None  # "interrupted" skips evaluation and report


def run_job(name: str, config, train: Callable[..., Trained], *, run: RunDir, console, resume: bool = False,
            command: str = "detox") -> RunDir:
    """Evaluate, `train(config, run, base=, tokenizer=, console=, resume=)`, evaluate again, report. A new run
    folder that fails before its first step is removed."""
    with run.removed_on_error():
        return _run_job(name, config, train, run=run, console=console, resume=resume, command=command)


def _run_job(name: str, config, train: Callable[..., Trained], *, run: RunDir, console, resume: bool,
             command: str) -> RunDir:
    from hhh.evaluate import compare_table, evaluate
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.report import write_report
    from hhh.runs import seed_everything

    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    # 1. before: the base model (or the starting adapter)
    init_adapter = getattr(config, "init_adapter", None)
    if (run.path / "eval_before.json").is_file():
        before = run.read_json("eval_before.json")
    else:
        console.print("[bold]1/4 evaluating the model before training")
        start = base
        if init_adapter:
            from hhh.models import load_adapter

            start = load_adapter(base, init_adapter)
        before = evaluate(config.eval_config(), model=start, tokenizer=tokenizer, run=run, console=console, tag="before")
        if init_adapter:
            base = start.unload()  # back to the bare base; the trainer loads the adapter again
    # 2. train
    console.print(f"[bold]2/4 {name}")
    result = train(config, run, base=base, tokenizer=tokenizer, console=console, resume=resume)
    if result.stopped == "interrupted":
        console.print(f"[yellow]stopped early; continue with: hhh {command} --resume {run.path}")
        return run
    # 3. after
    console.print("[bold]3/4 evaluating the trained adapter")
    after = evaluate(config.eval_config(adapter=str(run.path / "adapter")), model=result.model,
                     tokenizer=tokenizer, run=run, console=console)
    run.write_json("summary.json", {**result.summary, "stopped": result.stopped,
                                    "adapter": str(Path(run.path / "adapter"))})
    # 4. report
    console.print("[bold]4/4 report")
    report = write_report(run)
    console.print(compare_table(before, after, "before", "after"))
    console.print(f"report: {report}")
    return run
