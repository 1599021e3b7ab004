"""`hhh compress`: cheaper variants of an aligned model, and whether each one is still aligned.

    # 1. original: the run's adapter merged into its base (RUN/original, a plain HF folder)
    # 2. reference: the original's answers to held-out benign prompts, and its log-probs on them
    # 3. variants, each saved as a folder transformers loads (RUN/variants/NAME) and measured from that folder:
    #      int8-weight    torchao Int8WeightOnlyConfig (weights int8, matmuls in fp32)
    #      int8-dynamic   torchao Int8DynamicActivationInt8WeightConfig (activations quantized on the fly)
    #      magnitude      unstructured, smallest |W| per matrix (hhh.optimize.prune)
    #      wanda          unstructured, smallest |W| * ||X|| per output row, calibrated on the original's answers
    #      drop-layers    the layers whose removal alone changes the output least go (hhh.optimize.distill)
    #      distill        that layer-dropped student trained on the original's answers (distillation loss)
    #      NAME+lora      magnitude, wanda or drop-layers, then a short LoRA recovery fine-tune, merged, zeros kept
    # 4. the unaligned base, when the source has an adapter: the alignment every variant should keep
    # 5. the table: size, memory, speed, fidelity to the original, toxicity and refusals -> table.md/.json, plot

Every row is measured in this one process with the same threads, prompts and seeds. An interrupted run resumes
where it stopped (`--resume RUN`): finished rows are read back, not measured again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from hhh.config import CompressConfig, EvalConfig, load_config
from hhh.runs import RunDir

TORCHAO = {"int8-weight": "Int8WeightOnlyConfig", "int8-dynamic": "Int8DynamicActivationInt8WeightConfig"}


def _torchao_config(method: str):
    import torchao.quantization as q
    from transformers import TorchAoConfig

    return TorchAoConfig(getattr(q, TORCHAO[method])())


def make_variant(method: str, original: Path, out: Path, *, config: CompressConfig, calibration=None,
                 importance: list[float] | None = None, console=None) -> Path:
    """Build one variant from the original folder and save it to `out` (with the tokenizer and provenance).
    `calibration`: batches of hhh.rollout.Tokens (prompts + the original's answers) for wanda, drop-layers and
    distill; `importance`: the original's layer importance, when already measured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hhh.models.load import load_tokenizer
    from hhh.optimize import distill, prune
    from hhh.optimize.merge import save_folder

    tokenizer = AutoTokenizer.from_pretrained(original)
    detail: dict[str, Any] = {}
    base_method, _, recovery = method.partition("+")
    teacher = None
    if method in TORCHAO:
        model = AutoModelForCausalLM.from_pretrained(original, quantization_config=_torchao_config(method),
                                                     device_map="cpu")
        detail = {"torchao": TORCHAO[method]}
    else:
        model = AutoModelForCausalLM.from_pretrained(original).eval()
        if base_method == "magnitude":
            prune.magnitude(model, config.sparsity)
        elif base_method == "wanda":
            prune.wanda(model, [(t.ids(), t.mask()) for t in calibration], config.sparsity)
        if base_method in ("magnitude", "wanda"):
            detail = {"sparsity_asked": config.sparsity, "sparsity": prune.sparsity_of(model)}
        if base_method in ("drop-layers", "distill"):
            if importance is None:
                importance = importance_of(model, calibration or [], config, tokenizer.pad_token_id)
            keep = distill.keep_by_importance(importance, config.student_layers)
            teacher, model = model, distill.layer_dropped(model, keep)
            detail = {"layers_kept": keep, "layer_importance_kl": importance}
        if method == "distill":
            from hhh.data import load_prompts
            from hhh.optimize.measure import reference

            prompts = [p for spec in config.distill_prompts for p in load_prompts(spec, limit=config.distill_examples)]
            if console:
                console.print(f"distill: the original answers {len(prompts)} prompts")
            sampler = load_tokenizer(str(original))  # hhh's padding for sampling; `tokenizer` is saved as it ships
            answered = reference(teacher, sampler, prompts, max_new_tokens=config.max_new_tokens,
                                 seed=config.seed + 1, batch_size=64, logprobs=False).tokens
            data = distill.rebatch(answered, 8, pad_id=sampler.pad_token_id)  # sampled wide, trained 8 at a time
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)).tolist()
            from rich.progress import Progress

            with Progress(console=console, transient=True) as bar:
                task = bar.add_task("distill", total=config.distill_steps)
                losses = distill.distill(teacher, model, sampler, [data[i] for i in order],
                                         steps=config.distill_steps, lr=config.distill_lr,
                                         temperature=config.distill_temperature, alpha=config.distill_alpha,
                                         on_policy=config.on_policy, max_new_tokens=config.max_new_tokens,
                                         seed=config.seed,
                                         progress=lambda step, loss: bar.update(task, completed=step,
                                                                                description=f"distill {loss:.3f}"))
            detail["distill_loss"] = losses
        if recovery:
            if teacher is None:
                teacher = AutoModelForCausalLM.from_pretrained(original).eval()
            sampler = load_tokenizer(str(original))
            if console:
                console.print(f"{method}: LoRA recovery, {config.recover_steps} steps")
            model, losses = distill.recover(teacher, model, sampler,
                                            distill.rebatch(calibration, 8, pad_id=sampler.pad_token_id),
                                            steps=config.recover_steps, lr=config.recover_lr,
                                            temperature=config.distill_temperature, alpha=config.distill_alpha,
                                            seed=config.seed)
            detail.update(recover_loss=losses, recover_steps=config.recover_steps)
            if base_method in ("magnitude", "wanda"):
                detail["sparsity"] = prune.sparsity_of(model)
    return save_folder(model, tokenizer, out, provenance={"operation": f"compress:{method}", "base": str(original),
                                                          **detail})


def load_variant(folder: Path):
    from transformers import AutoModelForCausalLM

    from hhh.models.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    return model, load_tokenizer(str(folder))


def measure(name: str, model, tokenizer, folder: Path, config: CompressConfig, ref, speed_prompts: list[str],
            console) -> dict[str, Any]:
    """One row of the table."""
    from hhh.evaluate import evaluate
    from hhh.optimize import measure as m

    console.print(f"[bold]{name}[/]: size, memory, speed, fidelity")
    params, nonzero = m.parameter_counts(model)
    row: dict[str, Any] = {"name": name, "folder": str(folder), "parameters": params, "nonzero_parameters": nonzero,
                           "bytes_on_disk": m.folder_bytes(folder), **m.peak_memory_mib(folder),
                           "threads": torch.get_num_threads()}
    for batch in (1, 16):
        row[f"tokens_per_s_batch{batch}"] = m.tokens_per_second(model, tokenizer, speed_prompts, batch=batch,
                                                                new_tokens=config.speed_tokens)
    row.update(m.fidelity(model, ref))
    console.print(f"[bold]{name}[/]: alignment check")
    results = evaluate(EvalConfig(model=str(folder), prompts=config.eval_prompts, seed=config.seed,
                                  samples_per_prompt=config.samples_per_prompt, max_prompts=config.max_prompts,
                                  max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  device="cpu"), model=model, tokenizer=tokenizer, console=console)
    row["eval"] = results
    return row


def compress(config: CompressConfig | None = None, *, resume: str | None = None, console=None) -> RunDir:
    """Make and measure every variant; returns the run folder (table.md, table.json, plot_compress.png)."""
    from rich.console import Console

    from hhh.data import load_prompts
    from hhh.models.load import load_tokenizer
    from hhh.optimize.merge import find_source, load_merged, save_folder
    from hhh.optimize.report import write_table
    from hhh.runs import seed_everything

    console = console or Console()
    if resume:
        if not (Path(resume) / "config.toml").is_file():
            raise ValueError(f"--resume {resume}: not an hhh compress run folder (no config.toml)")
        config = load_config(CompressConfig, Path(resume) / "config.toml")
    assert config is not None
    # fail on a bad source or prompt set before any folder is made or model loaded
    source = find_source(config.source, model=None)
    answers = load_prompts(config.answers, limit=config.answer_prompts)
    calibration_prompts = load_prompts(config.calibration, limit=config.calibration_prompts)
    for spec in config.eval_prompts:
        load_prompts(spec, limit=1)
    run = RunDir(resume) if resume else RunDir.create("compress", config, config.out)
    seed_everything(config.seed)
    rows_dir = run.path / "rows"
    rows_dir.mkdir(exist_ok=True)

    original = run.path / "original"
    if not (original / "hhh_provenance.json").is_file():
        console.print(f"[bold]original[/]: {source.model}" + (f" + {source.adapter}" if source.adapter else ""))
        model, tokenizer = load_merged(source)
        save_folder(model, tokenizer, original, provenance={
            "operation": "merge" if source.adapter else "copy", "base": source.model,
            "adapter": str(source.adapter.resolve()) if source.adapter else None})
    model, tokenizer = load_variant(original)
    console.print("reference: the original's answers to held-out benign prompts")
    ref = reference_of(model, tokenizer, answers, config)
    speed_prompts = answers[:16]

    def row(name: str, folder: Path, loaded=None) -> None:
        target = rows_dir / f"{name}.json"
        if target.is_file():
            return
        start = time.perf_counter()
        m, t = loaded or load_variant(folder)
        result = measure(name, m, t, folder, config, ref, speed_prompts, console)
        result["seconds_measuring"] = time.perf_counter() - start
        made = folder / "hhh_provenance.json"
        if made.is_file() and "seconds_making" in (record := json.loads(made.read_text())):
            result["seconds_making"] = record["seconds_making"]
        target.write_text(json.dumps(result, indent=2, default=float))

    row("original", original, (model, tokenizer))
    calibration: list | None = None
    importance: list[float] | None = None
    for method in config.methods:
        folder = run.path / "variants" / method
        if not (rows_dir / f"{method}.json").is_file():
            start = time.perf_counter()  # the making of a variant includes the calibration it is the first to need
            base_method, _, recovery = method.partition("+")
            if (base_method in ("wanda", "drop-layers", "distill") or recovery) and calibration is None:
                calibration = reference_of(model, tokenizer, calibration_prompts, config, keep_logprobs=False).tokens
            if base_method in ("drop-layers", "distill") and importance is None:
                console.print("layer importance: KL to the original with each decoder layer removed alone")
                importance = importance_of(model, calibration or [], config, tokenizer.pad_token_id)
            if folder.exists() and not (folder / "hhh_provenance.json").is_file():
                import shutil

                shutil.rmtree(folder)  # half made before an interruption
            if not folder.exists():
                console.print(f"[bold]{method}[/]: making the variant")
                (run.path / "variants").mkdir(exist_ok=True)
                make_variant(method, original, folder, config=config, calibration=calibration, importance=importance,
                             console=console)
                record = json.loads((folder / "hhh_provenance.json").read_text())  # how long it took, for the table
                record["seconds_making"] = time.perf_counter() - start
                (folder / "hhh_provenance.json").write_text(json.dumps(record, indent=2))
        row(method, folder)
    if source.adapter is not None:
        from hhh.models.spec import local_path

        base = Path(local_path(source.model))
        base_model, _ = load_variant(base)
        row("base (unaligned)", base, (base_model, load_tokenizer(source.model)))
    rows = [json.loads((rows_dir / f"{n}.json").read_text()) for n in
            ["original", *config.methods, *(["base (unaligned)"] if source.adapter else [])]]
    write_table(run, rows)
    console.print(f"table: {run.path / 'table.md'}")
    return run


def reference_of(model, tokenizer, prompts: list[str], config: CompressConfig, *, keep_logprobs: bool = True):
    from hhh.optimize.measure import reference

    # full log-probs are (B, R, V) floats per batch: 32 rows of 48 tokens hold 0.3 GB; without them, sample wider
    return reference(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, seed=config.seed,
                     logprobs=keep_logprobs, batch_size=32 if keep_logprobs else 64)


def importance_of(model, calibration, config: CompressConfig, pad_id: int) -> list[float]:
    """Each decoder layer's importance, on the first `config.importance_prompts` calibration answers."""
    from hhh.optimize.distill import layer_importance, rebatch

    return layer_importance(model, rebatch(calibration, 16, limit=config.importance_prompts, pad_id=pad_id))
