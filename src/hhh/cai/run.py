"""`hhh cai`: the base model, evaluated; the supervised stage (hhh.cai.sl) and the RL stage (hhh.cai.rl), each
trained and evaluated; one report.

    RUN/config.toml, meta.json     the settings (with the constitution's path) and versions
    RUN/metrics.jsonl              generation progress (cai/revised per batch)
    RUN/eval_base.json             the base model on the eval prompts (samples_base_*.jsonl beside it)
    RUN/sl/                        revisions.jsonl, benign.jsonl, filters.json, dataset.jsonl, feedback.db,
                                   the SFT run (config.toml, metrics.jsonl, adapter/), eval.json
    RUN/rl/                        labels.jsonl, audit.json, feedback.db (AI labels with probabilities), the DPO run
                                   (dpo/) or the reward model and PPO runs (rm/, ppo/), eval.json
    RUN/report.html                base -> SL-CAI -> RL-CAI per prompt set, filters, label audit, examples

Resumable (`--resume RUN`): finished parts (evaluations, revision batches, SFT, labels, DPO; PPO from its
checkpoint) are kept and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hhh.config import CAIConfig, SFTConfig
from hhh.runs import RunDir


def check(config: CAIConfig) -> None:
    """Everything that can be wrong before a model loads: the constitution, the prompt sets."""
    from hhh.cai.constitution import load_constitution
    from hhh.cai.critic import parse_endpoint
    from hhh.jobs import check_prompt_sets

    load_constitution(config.constitution)
    for spec in (config.critic, config.rl.feedback_model):
        if spec.startswith("openai:"):
            parse_endpoint(spec)
    check_prompt_sets([config.prompts, *config.eval.prompts]
                      + ([config.benign_prompts] if config.max_benign != 0 else []))


def sft_config(config: CAIConfig) -> SFTConfig:
    """The SFT step's settings: the job's model, seed, LoRA and eval; the [sft] table's schedule."""
    return SFTConfig(**config.stage_settings(), **config.sft.model_dump(),
                     max_response_tokens=config.revision_tokens + 1, bucket=True)


def run_cai(config: CAIConfig | None = None, *, stage: str = "all", resume: str | None = None,
            allow_weak_labels: bool = False, console=None) -> RunDir:
    """Run (or resume) Constitutional AI: stage "all", "sl" (supervised only) or "rl" (continue a run whose
    supervised stage is done); returns the run folder. `allow_weak_labels` lets a resumed run train on labels
    that failed the agreement check.

    >>> run = run_cai(CAIConfig(max_prompts=8, max_benign=4))  # doctest: +SKIP
    >>> run.read_json("rl/audit.json")["agreement"]  # doctest: +SKIP
    """
    from rich.console import Console

    from hhh.jobs import reopen_run

    if stage not in ("all", "sl", "rl"):
        raise ValueError(f"unknown stage {stage!r} (expected all, sl or rl)")
    console = console or Console()
    if resume:
        config, run = reopen_run(CAIConfig, resume, console)
        if allow_weak_labels:
            config = config.model_copy(update={"rl": config.rl.model_copy(update={"allow_weak_labels": True})})
    else:
        if stage == "rl":
            raise ValueError("hhh cai rl continues a run whose supervised stage is done: hhh cai rl --resume RUN")
        config = config or CAIConfig()
        check(config)
        run = RunDir.create("cai", config, config.out)
    with run.removed_on_error():
        return _stages(config, run, console, stage)


def _unique(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _stages(config: CAIConfig, run: RunDir, console, stage: str) -> RunDir:
    from hhh.cai.constitution import load_constitution
    from hhh.evaluate import evaluate
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.runs import seed_everything

    constitution = load_constitution(config.constitution)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    if not (run.path / "eval_base.json").is_file():
        console.print("[bold]evaluating the base model")
        evaluate(config.eval_config(), model=base, tokenizer=tokenizer, run=run, console=console, tag="base")
    sl_adapter = run.path / "sl" / "adapter"
    if stage in ("all", "sl"):
        if not _supervised(config, constitution, run, base=base, tokenizer=tokenizer, console=console):
            return run
    if stage in ("all", "rl"):
        if not (sl_adapter / "adapter_model.safetensors").is_file():
            raise ValueError(f"{run.path}: the supervised stage has not finished (run hhh cai sl --resume {run.path})")
        try:
            _reinforce(config, constitution, run, str(sl_adapter), base=base, tokenizer=tokenizer, console=console)
        finally:
            report = write_cai_report(run)
    else:
        report = write_cai_report(run)
    console.print(stage_table(run))
    console.print(f"report: {report}")
    return run


def _supervised(config: CAIConfig, constitution, run: RunDir, *, base, tokenizer, console) -> bool:
    """SL-CAI: revisions, filters, store, SFT, evaluation (each skipped when done). False if interrupted."""
    from hhh.cai import sl
    from hhh.cai.critic import build_critic
    from hhh.data import load_prompts
    from hhh.evaluate import evaluate
    from hhh.models.load import adapter_on, remove_adapters

    console.print(f"[bold]SL-CAI: answers, critiques and revisions ({len(constitution.principle)} principles, "
                  f"{config.rounds} round(s), critic: {config.critic})")
    prompts = _unique(load_prompts(config.prompts, limit=config.max_prompts))
    critic = build_critic(config.critic, policy=base, tokenizer=tokenizer, device=config.device, dtype=config.dtype,
                          batch_size=config.sample_batch_size)
    records, finished = sl.revise(config, constitution, prompts, model=base, tokenizer=tokenizer, critic=critic,
                                  run=run, console=console)
    if not finished:
        console.print(f"[yellow]stopped after {len(records)} of {len(prompts)} prompts; continue with: "
                      f"hhh cai --resume {run.path}")
        return False
    filters = sl.apply_filters(records, config)
    sl.write_jsonl(run.path / "sl" / "revisions.jsonl", records)
    run.write_json("sl/filters.json", filters)
    console.print(f"revisions kept: {filters['kept']} of {filters['revisions']} (filtered: "
                  + ", ".join(f"{k} {v}" for k, v in filters["filtered"].items()) + ")")
    benign = []
    if config.max_benign != 0:
        benign = sl.benign_answers(config, _unique(load_prompts(config.benign_prompts, limit=config.max_benign)),
                                   model=base, tokenizer=tokenizer, run=run)
    sl.to_store(run.path / "sl" / "feedback.db", records, model=config.model, critic=critic.name)
    demos = sl.sft_data(records, benign)
    sl.write_jsonl(run.path / "sl" / "dataset.jsonl",
                   [{"prompt": p, "response": r, "ended": e}
                    for p, r, e in zip(demos.prompts, demos.responses, demos.ends(), strict=True)])
    if not len(demos):
        raise ValueError("no revision passed the filters and no benign answer ended: nothing to fine-tune on "
                         "(see RUN/sl/revisions.jsonl; loosen --min-relevance or --max-copy, raise --revision-tokens)")
    adapter = run.path / "sl" / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        console.print(f"[bold]SL-CAI: SFT on {filters['kept']} revisions and {sum(b['kept'] for b in benign)} "
                      "benign answers")
        from hhh.train.sft import train_sft

        settings = sft_config(config)
        sl_run = RunDir.create("sft", settings, str(run.path / "sl"), exist_ok=True)
        trained = train_sft(settings, sl_run, demos, base=base, tokenizer=tokenizer, console=console)
        run.write_json("sl/summary.json", trained.summary)
        remove_adapters(trained.model)
    if not (run.path / "sl" / "eval.json").is_file():
        console.print("[bold]evaluating the SL-CAI model")
        with adapter_on(base, adapter) as model:
            evaluate(config.eval_config(adapter=str(adapter)), model=model, tokenizer=tokenizer,
                     run=RunDir(run.path / "sl"), console=console)
    return True


def _reinforce(config: CAIConfig, constitution, run: RunDir, sl_adapter: str, *, base, tokenizer, console) -> None:
    """RL-CAI: pairs from the SL-CAI model, AI labels, audit, store, DPO or RM + PPO, evaluation."""
    from hhh.cai import rl
    from hhh.cai.critic import build_critic
    from hhh.cai.sl import write_jsonl
    from hhh.data import load_prompts
    from hhh.evaluate import evaluate
    from hhh.models.load import adapter_on, remove_adapters

    rl_dir = run.path / "rl"
    rl_dir.mkdir(exist_ok=True)
    records = rl.read_labels(rl_dir / "labels.jsonl")
    if not records:
        everything = _unique(load_prompts(config.prompts))
        used = len(_unique(load_prompts(config.prompts, limit=config.max_prompts)))
        limit = config.rl.max_prompts or len(everything)
        prompts = everything[used:used + limit] or everything[:limit]  # unseen prompts, if any are left
        console.print(f"[bold]RL-CAI: two answers to each of {len(prompts)} prompts from the SL-CAI model")
        with adapter_on(base, sl_adapter) as model:
            first, second = rl.answer_pairs(config, prompts, model=model, tokenizer=tokenizer)
        who = "policy" if config.rl.feedback_model == "base" else config.rl.feedback_model
        critic = build_critic(who, policy=base, tokenizer=tokenizer, device=config.device, dtype=config.dtype,
                              batch_size=config.sample_batch_size)
        console.print(f"[bold]RL-CAI: labels from {config.rl.feedback_model}" + (" (chain-of-thought)" if config.rl.cot
                                                                               else ""))
        records = rl.label(config, constitution, prompts, first, second, critic=critic,
                           device=next(base.parameters()).device)
        write_jsonl(rl_dir / "labels.jsonl", records)
    audit = rl.audit(records, config)
    run.write_json("rl/audit.json", audit)
    shown = "-" if audit["agreement"] is None else f"{audit['agreement']:.2f}"
    console.print(f"feedback labels: agreement with the judge {shown} on {audit['pairs']} clearly separated pairs, "
                  f"position bias {audit['position_bias']:.2f} (0.5: none), mean confidence "
                  f"{audit['mean_confidence']:.2f}")
    rl.to_store(rl_dir / "feedback.db", records, model=config.model, adapter=sl_adapter,
                labeler=f"cai:{config.rl.feedback_model}")
    if not audit["passed"] and not config.rl.allow_weak_labels:
        raise rl.WeakLabels(
            f"RL-CAI refused: the feedback labels agree with the judge {shown} on {audit['pairs']} pairs (need >= "
            f"{config.rl.min_agreement} on >= {config.rl.min_judged_pairs}); labels are in {rl_dir / 'labels.jsonl'}"
            f"; train on them anyway with: hhh cai --resume {run.path} --rl-allow-weak-labels")
    if config.rl.method == "dpo":
        adapter = rl_dir / "dpo" / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            from hhh.data.pairs import load_pairs
            from hhh.train.dpo import train_dpo

            settings = rl.dpo_config(config, sl_adapter, rl_dir)
            pairs = load_pairs(settings, skip_ties=True)
            console.print(f"[bold]RL-CAI: DPO on {len(pairs)} AI-labelled pairs (soft labels), from the SL-CAI adapter")
            policy = train_dpo(settings, RunDir.create("dpo", settings, settings.out, exist_ok=True), pairs,
                               base=base, tokenizer=tokenizer, console=console)
            remove_adapters(policy.lm)
    else:
        adapter = rl_dir / "ppo" / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            from hhh.jobs import JOBS
            from hhh.train.rm import train_rm

            if not (rl_dir / "rm" / "model" / "rm.json").is_file():
                console.print("[bold]RL-CAI: a reward model on the AI labels")
                train_rm(rl.rm_config(config, rl_dir), console=console)
            ppo_settings = rl.ppo_config(config, sl_adapter, rl_dir)
            console.print(f"[bold]RL-CAI: PPO against it, from the SL-CAI adapter ({ppo_settings.steps} steps)")
            ppo_run = rl_dir / "ppo"
            resume = (ppo_run / "checkpoints" / "last" / "state.json").is_file()
            run_dir = RunDir(ppo_run) if resume else RunDir.create("detox", ppo_settings, str(ppo_run), exist_ok=True)
            trained = JOBS["detox"].train(ppo_settings, run_dir, base=base, tokenizer=tokenizer, console=console,
                                          resume=resume)
            remove_adapters(trained.model)
            if trained.stopped == "interrupted":
                raise KeyboardInterrupt
    if not (rl_dir / "eval.json").is_file():
        console.print("[bold]evaluating the RL-CAI model")
        with adapter_on(base, adapter) as model:
            evaluate(config.eval_config(adapter=str(adapter)), model=model, tokenizer=tokenizer, run=RunDir(rl_dir),
                     console=console)


def stages(run: RunDir) -> dict[str, dict[str, Any]]:
    """{stage: eval results} for the stages evaluated so far: base, SL-CAI, RL-CAI."""
    out = {}
    for name, file in (("base", run.path / "eval_base.json"), ("SL-CAI", run.path / "sl" / "eval.json"),
                       ("RL-CAI", run.path / "rl" / "eval.json")):
        if file.is_file():
            out[name] = json.loads(file.read_text())
    return out


def stage_table(run: RunDir):
    from rich.table import Table

    from hhh.evaluate import ROWS, _fmt

    results = stages(run)
    table = Table(title=f"hhh cai: {' -> '.join(results)}")
    for col in ("prompt set", "metric", *results):
        table.add_column(col, justify="left" if col in ("prompt set", "metric") else "right")
    first = next(iter(results.values()), {})
    for spec in first:
        for key, label in ROWS:
            if any(key in r.get(spec, {}) for r in results.values()):
                table.add_row(spec, label, *(_fmt(key, r.get(spec, {})) for r in results.values()))
    return table


def write_cai_report(run: RunDir) -> Path:
    from hhh.report import cai_report

    return cai_report(run, stages(run))
