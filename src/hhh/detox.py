"""The jobs on the detox task: `hhh detox` (PPO), `hhh dpo` (offline preference tuning), `hhh grpo` and
`hhh rloo` (critic-free online RL), offline.

Both run hhh.pipeline.run_job: evaluate the base model on the red-team and benign eval prompts, train a LoRA
adapter on the red-team train prompts, evaluate it on the same prompts with the same seeds, write report.html.
"""

from __future__ import annotations

from hhh.config import DetoxConfig, DPOConfig, GRPOConfig, RLOOConfig, load_config
from hhh.pipeline import Trained, run_job
from hhh.runs import RunDir


def _check_prompt_sets(specs) -> None:
    """Fail on bad data before any model loads."""
    from hhh.data import load_prompts
    from hhh.evaluate import set_and_samples

    for spec in specs:
        load_prompts(set_and_samples(spec, 1)[0])


def detox(config: DetoxConfig | None = None, *, resume: str | None = None, console=None) -> RunDir:
    """Run (or resume) a detox job and return its run folder.

    >>> run = detox(DetoxConfig(steps=2, eval_max_prompts=4))  # doctest: +SKIP
    >>> run.read_json("eval.json")["redteam:eval"]["toxicity/mean"]  # doctest: +SKIP
    """
    from rich.console import Console

    console = console or Console()
    config, run, resuming = _open_run("detox", config or DetoxConfig(), resume, console)
    return run_job("PPO", config, _ppo, run=run, console=console, resume=resuming)


def _open_run(command: str, config, resume: str | None, console):
    """(config, run folder, whether a checkpoint is there to resume): a new run folder for `config`, or the
    config saved in the `resume` folder."""
    if resume:
        run = RunDir(resume)
        if not (run.path / "config.toml").is_file():
            raise FileNotFoundError(f"{resume}: not a run folder (no config.toml)")
        config = load_config(type(config), run.path / "config.toml")
        console.print(f"resuming {run.path}")
    else:
        _check_prompt_sets([config.prompts, *config.eval_prompts])
        run = RunDir.create(command, config, config.out)
    return config, run, resume is not None and (run.path / "checkpoints" / "last" / "state.json").is_file()


def _ppo(config: DetoxConfig, run: RunDir, *, base, tokenizer, console, resume: bool) -> Trained:
    from hhh.train.ppo import train_ppo

    result = train_ppo(config, run, base=base, tokenizer=tokenizer, resume=resume, console=console)
    if result.best_step is not None:
        console.print(f"best held-out checkpoint: step {result.best_step} ({run.path / 'best'})")
    return Trained(result.policy.lm, {"steps": result.steps_done, "best_step": result.best_step}, result.stopped)


def dpo(config: DPOConfig | None = None, *, console=None) -> RunDir:
    """Offline preference tuning (DPO or a relative) with evaluation before and after.

    With no `data`, pairs are built on-policy: `pair_samples` samples per red-team train prompt from the base
    model, the best and the worst by the reward.

    >>> run = dpo(DPOConfig(loss="ipo", pair_prompts=16, eval_max_prompts=4))  # doctest: +SKIP
    """
    from rich.console import Console

    from hhh.train.rm import load_pairs

    console = console or Console()
    config = config or DPOConfig()
    _check_prompt_sets([config.prompts, *config.eval_prompts])
    pairs = load_pairs(config, skip_ties=True) if config.data else None  # bad data fails before a model loads
    run = RunDir.create("dpo", config, config.out)

    def train(config: DPOConfig, run: RunDir, *, base, tokenizer, console, resume: bool) -> Trained:
        from hhh.train.dpo import build_pairs, train_dpo

        data = pairs if pairs is not None else build_pairs(config, base, tokenizer, console)
        if not len(data):
            raise ValueError("no preference pairs to train on (lower --min-gap, or give --data)")
        run.write_json("pairs.json", {"pairs": len(data), "source": config.data or f"sampled from {config.model}"})
        policy = train_dpo(config, run, data, base=base, tokenizer=tokenizer, console=console)
        return Trained(policy.lm, {"pairs": len(data), "loss": config.loss})

    return run_job(f"DPO ({config.loss})", config, train, run=run, console=console)


def online(config: GRPOConfig | RLOOConfig, *, resume: str | None = None, console=None) -> RunDir:
    """GRPO or RLOO (by the config's type) on the detox task, evaluated before and after; resumable.

    >>> run = online(GRPOConfig(steps=2, eval_max_prompts=4))  # doctest: +SKIP
    """
    from rich.console import Console

    console = console or Console()
    kind = "grpo" if isinstance(config, GRPOConfig) else "rloo"
    config, run, resuming = _open_run(kind, config, resume, console)

    def train(config, run: RunDir, *, base, tokenizer, console, resume: bool) -> Trained:
        from hhh.train.grpo import train_online

        policy, steps, best, stopped = train_online(config, run, base=base, tokenizer=tokenizer, resume=resume,
                                                    console=console)
        return Trained(policy.lm, {"steps": steps, "best_step": best}, stopped)

    return run_job(kind.upper(), config, train, run=run, console=console, resume=resuming, command=kind)
