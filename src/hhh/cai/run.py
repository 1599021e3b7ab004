"""`hhh cai`: the base model, evaluated; the supervised stage (hhh.cai.sl), trained and evaluated; one report.

    RUN/config.toml, meta.json     the settings (with the constitution's path) and versions
    RUN/metrics.jsonl              generation progress (cai/revised per batch)
    RUN/eval_base.json             the base model on the eval prompts (samples_base_*.jsonl beside it)
    RUN/sl/                        revisions.jsonl, benign.jsonl, filters.json, dataset.jsonl, feedback.db,
                                   the SFT run (config.toml, metrics.jsonl, adapter/), eval.json
    RUN/report.html                base -> SL-CAI per prompt set, the filters, examples side by side

Resumable (`--resume RUN`): finished parts (evaluations, revision batches, the SFT adapter) are kept and skipped.
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
    from hhh.jobs import check_prompt_sets

    load_constitution(config.constitution)
    check_prompt_sets([config.prompts, *config.eval.prompts]
                      + ([config.benign_prompts] if config.max_benign != 0 else []))


def sft_config(config: CAIConfig) -> SFTConfig:
    """The SFT step's settings: the job's model, seed, LoRA and eval; the [sft] table's schedule."""
    shared = {k: getattr(config, k) for k in ("model", "max_new_tokens", "temperature", "seed", "device", "dtype",
                                              "reward", "lora_r", "lora_alpha", "lora_dropout", "lora_layers", "eval")}
    return SFTConfig(**shared, **config.sft.model_dump(), max_response_tokens=config.revision_tokens + 1, bucket=True)


def run_cai(config: CAIConfig | None = None, *, resume: str | None = None, console=None) -> RunDir:
    """Run (or resume) the supervised stage of Constitutional AI; returns the run folder.

    >>> run = run_cai(CAIConfig(max_prompts=8, max_benign=4))  # doctest: +SKIP
    >>> run.read_json("sl/filters.json")["kept"]  # doctest: +SKIP
    """
    from rich.console import Console

    from hhh.jobs import reopen_run

    console = console or Console()
    if resume:
        config, run = reopen_run(CAIConfig, resume, console)
    else:
        config = config or CAIConfig()
        check(config)
        run = RunDir.create("cai", config, config.out)
    with run.removed_on_error():
        return _stages(config, run, console)


def _unique(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _stages(config: CAIConfig, run: RunDir, console) -> RunDir:
    from hhh.cai import sl
    from hhh.cai.constitution import load_constitution
    from hhh.cai.critic import build_critic
    from hhh.data import load_prompts
    from hhh.evaluate import evaluate
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.load import adapter_on, remove_adapters
    from hhh.runs import seed_everything

    constitution = load_constitution(config.constitution)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.model)
    base = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    # the base model
    if not (run.path / "eval_base.json").is_file():
        console.print("[bold]1/4 evaluating the base model")
        evaluate(config.eval_config(), model=base, tokenizer=tokenizer, run=run, console=console, tag="base")
    # SL-CAI: answer -> critique -> revision, filtered
    console.print(f"[bold]2/4 answers, critiques and revisions ({len(constitution.principle)} principles, "
                  f"{config.rounds} round(s), critic: {config.critic})")
    prompts = _unique(load_prompts(config.prompts, limit=config.max_prompts))
    critic = build_critic(config.critic, policy=base, tokenizer=tokenizer, device=config.device, dtype=config.dtype,
                          batch_size=config.sample_batch_size)
    records, finished = sl.revise(config, constitution, prompts, model=base, tokenizer=tokenizer, critic=critic,
                                  run=run, console=console)
    if not finished:
        console.print(f"[yellow]stopped after {len(records)} of {len(prompts)} prompts; continue with: "
                      f"hhh cai sl --resume {run.path}")
        return run
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
                   [{"prompt": p, "response": r} for p, r in zip(demos.prompts, demos.responses, strict=True)])
    if not len(demos):
        raise ValueError("no revision passed the filters and no benign answer ended: nothing to fine-tune on "
                         "(see RUN/sl/revisions.jsonl; loosen --min-relevance or --max-copy, raise --revision-tokens)")
    # SFT on the revisions and the benign answers
    adapter = run.path / "sl" / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        console.print(f"[bold]3/4 SFT on {filters['kept']} revisions and {sum(b['kept'] for b in benign)} benign answers")
        from hhh.train.sft import train_sft

        settings = sft_config(config)
        sl_run = RunDir.create("sft", settings, str(run.path / "sl"), exist_ok=True)
        trained = train_sft(settings, sl_run, demos, base=base, tokenizer=tokenizer, console=console)
        run.write_json("sl/summary.json", trained.summary)
        remove_adapters(trained.model)
    if not (run.path / "sl" / "eval.json").is_file():
        console.print("[bold]4/4 evaluating the SL-CAI model")
        with adapter_on(base, adapter) as model:
            evaluate(config.eval_config(adapter=str(adapter)), model=model, tokenizer=tokenizer,
                     run=RunDir(run.path / "sl"), console=console)
    report = write_cai_report(run)
    console.print(stage_table(run))
    console.print(f"report: {report}")
    return run


def stages(run: RunDir) -> dict[str, dict[str, Any]]:
    """{stage: eval results} for the stages evaluated so far: base, sl."""
    out = {}
    for name, file in (("base", run.path / "eval_base.json"), ("SL-CAI", run.path / "sl" / "eval.json")):
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
