"""`hhh detox`: the whole RLHF loop on the bundled model, offline.

  1. evaluate the base model on the red-team and benign eval prompts
  2. PPO with the toxicity reward on the red-team train prompts (LoRA; reference = adapter disabled)
  3. evaluate the trained adapter on the same prompts with the same seeds
  4. write report.html
"""

from __future__ import annotations

from pathlib import Path

from hhh.config import DetoxConfig, load_config
from hhh.runs import RunDir, seed_everything


def detox(config: DetoxConfig | None = None, *, resume: str | None = None, console=None) -> RunDir:
    """Run (or resume) a detox job and return its run folder.

    >>> run = detox(DetoxConfig(steps=2, eval_max_prompts=4))  # doctest: +SKIP
    >>> run.read_json("eval.json")["redteam:eval"]["toxicity/mean"]  # doctest: +SKIP
    """
    from rich.console import Console

    from hhh.data import load_prompts
    from hhh.evaluate import compare_table, evaluate, set_and_samples
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.report import write_report
    from hhh.train.ppo import train_ppo

    console = console or Console()
    if resume:
        run = RunDir(resume)
        if not (run.path / "config.toml").is_file():
            raise FileNotFoundError(f"{resume}: not a run folder (no config.toml)")
        config = load_config(DetoxConfig, run.path / "config.toml")
        console.print(f"resuming {run.path}")
    else:
        config = config or DetoxConfig()
        for spec in [config.prompts, *config.eval_prompts]:  # fail on bad data before any model loads
            load_prompts(set_and_samples(spec, 1)[0])
        run = RunDir.create("detox", config, config.out)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=config.device, dtype=config.dtype)

    # 1. before: the base model (or the starting adapter)
    if (run.path / "eval_before.json").is_file():
        before = run.read_json("eval_before.json")
    else:
        console.print("[bold]1/4 evaluating the model before training")
        start = base
        if config.init_adapter:
            from hhh.models import load_adapter

            start = load_adapter(base, config.init_adapter)
        before = evaluate(config.eval_config(), model=start, tokenizer=tokenizer, run=run, console=console, tag="before")
        if config.init_adapter:
            base = start.unload()  # back to the bare base; build_policy loads the adapter again
    # 2. PPO
    console.print("[bold]2/4 PPO")
    resuming_ppo = resume is not None and (run.path / "checkpoints" / "last" / "state.json").is_file()
    result = train_ppo(config, run, base=base, tokenizer=tokenizer, resume=resuming_ppo, console=console)
    if result.stopped == "interrupted":
        console.print(f"[yellow]stopped at step {result.steps_done}; continue with: hhh detox --resume {run.path}")
        return run
    # 3. after
    console.print("[bold]3/4 evaluating the trained adapter")
    after = evaluate(config.eval_config(adapter=str(run.path / "adapter")), model=result.policy.lm,
                     tokenizer=tokenizer, run=run, console=console)
    run.write_json("summary.json", {"steps": result.steps_done, "best_step": result.best_step,
                                    "stopped": result.stopped, "adapter": str(Path(run.path / "adapter"))})
    # 4. report
    console.print("[bold]4/4 report")
    report = write_report(run)
    console.print(compare_table(before, after, "before", "after"))
    if result.best_step is not None:
        console.print(f"best held-out checkpoint: step {result.best_step} ({run.path / 'best'})")
    console.print(f"report: {report}")
    return run
