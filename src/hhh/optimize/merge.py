"""`hhh merge`: fold a run's LoRA adapter into its base model and save a plain Hugging Face folder.

    W' = W + (alpha / r) * B @ A          for every adapted Linear (peft's merge_and_unload)

The folder holds safetensors weights, the tokenizer and its chat template: transformers loads it without peft, and
every hhh command takes it as a model spec.

>>> from hhh.optimize.merge import merge
>>> merge("runs/detox-20261129/run", "merged/detox")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tomllib

# Where a run keeps its final adapter: a training job's own, else a CAI run's last stage.
ADAPTER_PLACES = ("adapter", "rl/dpo/adapter", "rl/ppo/adapter", "sl/adapter")


@dataclass(frozen=True)
class Source:
    """What a merge or export starts from: a base model spec and, for a run, its adapter."""
    model: str                 # model spec of the base
    adapter: Path | None       # PEFT adapter folder (None: the model alone)
    run: Path | None           # the run folder the adapter came from, when there is one


def find_source(path: str, *, model: str | None = None) -> Source:
    """A run folder, an adapter folder, or a model spec. The base of an adapter is `model` if given, else the
    `model` of the run's config.toml, else the adapter's own base_model_name_or_path."""
    from hhh.models.spec import resolve

    where = Path(path).expanduser()
    adapter = run = None
    if (where / "adapter_config.json").is_file():
        adapter = where
        run = next((p for p in list(where.resolve().parents)[:3] if (p / "config.toml").is_file()), None)
    elif where.is_dir() and (where / "config.toml").is_file() and not (where / "config.json").is_file():
        found = [where / p for p in ADAPTER_PLACES if (where / p / "adapter_config.json").is_file()]
        if not found:
            raise ValueError(f"{path}: a run folder without an adapter (looked for {', '.join(ADAPTER_PLACES)})")
        adapter, run = found[0], where
    if adapter is None:
        resolve(path)  # a model spec, or a one-line error saying what it is not
        return Source(model or path, None, None)
    return Source(model or _base_of(adapter, run), adapter, run)


def _base_of(adapter: Path, run: Path | None) -> str:
    if run is not None:
        try:
            spec = tomllib.loads((run / "config.toml").read_text(encoding="utf-8")).get("model")
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{run / 'config.toml'}: not valid TOML ({e})") from None
        if isinstance(spec, str) and spec:
            return spec
    base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}: no base model recorded; pass --model")
    return str(base)


def load_merged(source: Source, *, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer): the base with the adapter folded in (a plain transformers model), in eval mode. The
    tokenizer is the base's own, as saved (hhh's padding choices are not written into a deployed model)."""
    from transformers import AutoTokenizer

    from hhh.models.load import load_adapter, load_causal_lm
    from hhh.models.spec import local_path

    model = load_causal_lm(source.model, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(local_path(source.model))
    if source.adapter is not None:
        model = load_adapter(model, source.adapter).merge_and_unload()
    model.eval()
    return model, tokenizer


def save_folder(model, tokenizer, out: str | Path, *, provenance: dict) -> Path:
    """Write model + tokenizer + hhh_provenance.json under a temporary name, then rename: an interrupted save
    leaves no half folder that looks like a model."""
    from hhh.runs import versions

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (choose another --out)")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "hhh_provenance.json").write_text(json.dumps({**provenance, "versions": versions()}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def merge(path: str, out: str | Path, *, model: str | None = None) -> Path:
    """Merge the adapter of a run (or an adapter folder) into its base; save a plain HF folder at `out`."""
    source = find_source(path, model=model)
    if source.adapter is None:
        raise ValueError(f"{path}: no adapter to merge (give a run folder or an adapter folder)")
    merged, tokenizer = load_merged(source)
    return save_folder(merged, tokenizer, out, provenance={
        "operation": "merge", "base": source.model, "adapter": str(source.adapter.resolve()),
        "run": str(source.run.resolve()) if source.run else None})
