"""Every alignment job has one shape, and one table says which trainer each command runs.

  1. check the settings and data, make the run folder (before any model loads)
  2. load the base model; evaluate it on the eval prompts (or the starting adapter, when there is one)
  3. train an adapter: the command's trainer, (config, run, base=, tokenizer=, console=, resume=) -> Trained
  4. evaluate the adapter on the same prompts with the same seeds
  5. write summary.json, report.html and the before/after table

A new method is one file in hhh.train with a `train` function of that signature, plus one row in JOBS.

Under `accelerate launch` (hhh.distributed) rank 0 makes the run folder and writes the evaluations and the report;
every rank trains and evaluates its share.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from hhh.config import DetoxConfig, DPOConfig, GRPOConfig, RLOOConfig, Settings, SFTConfig, load_config
from hhh.runs import RunDir


@dataclass(frozen=True)
class Job:
    command: str                        # `hhh COMMAND`, and the run folder's name
    help: str                           # one line for `hhh --help`
    config: type[Settings]
    trainer: str                        # "module:function" with the trainer's signature (imported when it runs)
    title: Callable[[Any], str]         # what the progress shows while it trains
    resumable: bool = True              # the trainer saves checkpoints and takes resume=True
    check: Callable[[Any], None] | None = None  # fail on bad data before a model loads
    shares: Callable[[Any], dict[str, int]] | None = None  # several processes: the counts each rank takes an equal
                                                            # part of; None: the trainer runs on one process only

    def train(self, config, run: RunDir, *, base, tokenizer, console, resume: bool = False):
        module, name = self.trainer.split(":")
        return getattr(import_module(module), name)(config, run, base=base, tokenizer=tokenizer, console=console,
                                                    resume=resume)


def _dpo_data(config: DPOConfig) -> None:
    if config.data:
        from hhh.data.pairs import load_pairs

        load_pairs(config, skip_ties=True)


def _sft_data(config: SFTConfig) -> None:
    if not config.data:
        raise ValueError("hhh sft needs demonstrations: --data FILE.jsonl, hf:NAME[:SPLIT] or db:PATH")
    from hhh.data.demos import load_demos

    load_demos(config.data, source=config.data_source, labelers=config.labelers, limit=config.max_examples)


def _group_shares(config) -> dict[str, int]:
    return {"prompts_per_step": config.prompts_per_step, "minibatch_size": config.minibatch_size}


JOBS: dict[str, Job] = {
    "detox": Job("detox", "the main job: evaluate, PPO against toxicity with a KL penalty, evaluate again, report",
                 DetoxConfig, "hhh.train.ppo:train", lambda c: "PPO",
                 shares=lambda c: {"batch_size": c.batch_size, "minibatch_size": c.minibatch_size}),
    "dpo": Job("dpo", "offline preference tuning (DPO, cDPO, robust, IPO, hinge, SimPO, ORPO, KTO), evaluated "
               "before/after", DPOConfig, "hhh.train.dpo:train", lambda c: f"DPO ({c.loss})", resumable=False,
               check=_dpo_data, shares=lambda c: {}),
    "sft": Job("sft", "supervised fine-tuning of a LoRA adapter on prompt -> response demonstrations (loss on the "
               "response only), evaluated before/after", SFTConfig, "hhh.train.sft:train", lambda c: "SFT",
               resumable=False, check=_sft_data),
    "grpo": Job("grpo", "GRPO: G samples per prompt, group-normalised advantages, clipped ratio, k3 KL in the loss",
                GRPOConfig, "hhh.train.grpo:train", lambda c: "GRPO", shares=_group_shares),
    "rloo": Job("rloo", "RLOO: leave-one-out baseline, KL in the reward, REINFORCE with a clipped ratio (or "
                "REINFORCE++)", RLOOConfig, "hhh.train.rloo:train",
                lambda c: "REINFORCE++" if c.advantage == "reinforce++" else "RLOO", shares=_group_shares),
}


def check_prompt_sets(specs) -> None:
    """Fail on a bad prompt set before any model loads."""
    from hhh.data import load_prompts
    from hhh.evaluate import set_and_samples

    for spec in specs:
        load_prompts(set_and_samples(spec, 1)[0], limit=1)


def _check_engine(config) -> None:
    """--rollout-engine vllm where vLLM cannot run: one line, before any model loads or any folder is made."""
    if getattr(config, "rollout_engine", "hhh") == "vllm":
        from hhh.engines import vllm_unavailable

        why = vllm_unavailable()
        if why:
            raise ValueError(f"rollout_engine = 'vllm': {why}")


def reopen_run(cls: type[Settings], resume: str, console) -> tuple[Any, RunDir]:
    """(the config saved in the run folder `resume`, that folder), to continue it."""
    run = RunDir(resume)
    if not (run.path / "config.toml").is_file():
        raise FileNotFoundError(f"{resume}: not a run folder (no config.toml)")
    console.print(f"resuming {run.path}")
    return load_config(cls, run.path / "config.toml"), run


def open_run(job: Job, config, resume: str | None, console) -> tuple[Any, RunDir, bool]:
    """(config, run folder, whether a checkpoint is there to resume): a new run folder for `config`, or the
    config saved in the `resume` folder."""
    from hhh import distributed as D

    if D.launched() and job.shares is None:
        raise ValueError(f"hhh {job.command} runs on one process: start it without accelerate launch or torchrun")
    if resume:
        if not job.resumable:
            raise ValueError(f"hhh {job.command} cannot resume (it saves no checkpoints)")
        config, run = reopen_run(job.config, resume, console)
        _check_engine(config)
        if job.shares is not None:  # a run may resume on another number of processes
            D.check_divisible(**job.shares(config))
        return config, run, (run.path / "checkpoints" / "last" / "state.json").is_file()
    config = config if config is not None else job.config()
    check_prompt_sets([config.prompts, *config.eval.prompts])
    if job.check is not None:
        job.check(config)
    _check_engine(config)
    if job.shares is not None:
        D.check_divisible(**job.shares(config))
    return config, new_run_folder(job.command, config), False


def new_run_folder(command: str, config) -> RunDir:
    """RunDir.create; on several processes rank 0 makes it (or fails) and the others open the same folder."""
    from hhh import distributed as D

    if D.world().size == 1:
        return RunDir.create(command, config, config.out)
    made: RunDir | None = None
    outcome: tuple[str, Any]
    if D.world().main:
        try:
            made = RunDir.create(command, config, config.out)
            outcome = ("path", str(made.path))
        except Exception as e:  # every rank raises it
            outcome = ("error", e)
    received: tuple[str, Any] = D.broadcast(outcome if D.world().main else ("", None))
    kind, value = received
    if kind == "error":
        raise value
    return made if made is not None else RunDir(value)


def run_job(command: str, config=None, *, resume: str | None = None, console=None) -> RunDir:
    """Run (or resume) `hhh COMMAND` and return its run folder.

    >>> run = run_job("detox", DetoxConfig(steps=2, eval={"max_prompts": 4}))  # doctest: +SKIP
    >>> run.read_json("eval.json")["redteam:eval"]["toxicity/mean"]  # doctest: +SKIP
    """
    from rich.console import Console

    from hhh import distributed as D

    job = JOBS[command]
    console = console or Console()
    if D.launched_rank() != 0:  # rank 0 speaks for the run (read from the environment: settings are checked
        console = Console(quiet=True)  # before the process group is joined)
    config, run, resuming = open_run(job, config, resume, console)
    with run.removed_on_error():  # a new run folder that fails before its first step is removed
        return _evaluate_train_evaluate(job, config, run, console, resuming)


def _evaluate_train_evaluate(job: Job, config, run: RunDir, console, resume: bool) -> RunDir:
    from hhh import distributed as D
    from hhh.evaluate import compare_table, evaluate
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.load import adapter_on
    from hhh.report import write_report
    from hhh.runs import seed_everything

    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=D.device(config.device), dtype=config.dtype)
    main = D.world().main
    # 2. before: the base model, or the adapter training starts from (every rank samples its share)
    if D.broadcast((run.path / "eval_before.json").is_file()):  # rank 0's folder decides
        before = run.read_json("eval_before.json") if main else None
    else:
        console.print("[bold]1/4 evaluating the model before training")
        start = getattr(config, "init_adapter", None)
        with adapter_on(base, start) if start else nullcontext(base) as model:
            before = evaluate(config.eval_config(), model=model, tokenizer=tokenizer, run=run, console=console,
                              tag="before")
    # 3. train
    console.print(f"[bold]2/4 {job.title(config)}")
    trained = job.train(config, run, base=base, tokenizer=tokenizer, console=console, resume=resume)
    if trained.stopped == "interrupted":
        console.print(f"[yellow]stopped early; continue with: hhh {job.command} --resume {run.path}")
        return run
    if trained.summary.get("best_step") is not None:
        console.print(f"best held-out checkpoint: step {trained.summary['best_step']} ({run.path / 'best'})")
    # 4. after
    console.print("[bold]3/4 evaluating the trained adapter")
    after = evaluate(config.eval_config(adapter=str(run.path / "adapter")), model=trained.model, tokenizer=tokenizer,
                     run=run, console=console)
    if not main:
        return run
    run.write_json("summary.json", {**trained.summary, "stopped": trained.stopped, "adapter": str(run.path / "adapter")})
    # 5. report
    console.print("[bold]4/4 report")
    report = write_report(run)
    assert before is not None
    console.print(compare_table(before, after, "before", "after"))
    console.print(f"report: {report}")
    return run


@contextmanager
def trained_adapter(command: str, config, run: RunDir, *, base, tokenizer, console):
    """Train `command`'s adapter on `base` for the length of the block (e.g. to evaluate it), then take it off:
    `base` is the bare model again after (hhh frontier trains many adapters on one base this way)."""
    from hhh.models.load import remove_adapters

    trained = JOBS[command].train(config, run, base=base, tokenizer=tokenizer, console=console)
    try:
        yield trained
    finally:
        remove_adapters(trained.model)
