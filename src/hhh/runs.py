"""The run folder: everything a run writes, in one place.

    RUN/config.toml     the settings used (defaults filled in)
    RUN/meta.json       command, seed, versions, host, start time
    RUN/metrics.jsonl   one JSON object per step, fixed metric names
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from hhh.config import Settings, to_toml_dict


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("hhh", "torch", "transformers", "peft", "accelerate", "alt-profanity-check", "vaderSentiment"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class RunDir:
    def __init__(self, path: str | Path, *, fresh: bool = False) -> None:
        self.path = Path(path)
        self.fresh = fresh  # made by this process (create), not an existing folder opened to resume

    @classmethod
    def create(cls, command: str, config: Settings, out: str | None = None, *, exist_ok: bool = False) -> RunDir:
        path = Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
        if path.exists() and any(path.iterdir()) and not exist_ok:
            raise FileExistsError(f"run folder {path} exists and is not empty (use --resume or another --out)")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, fresh=True)
        (path / "config.toml").write_text(tomli_w.dumps(to_toml_dict(config)))
        run.write_json(
            "meta.json",
            {
                "command": command,
                "argv": sys.argv,
                "seed": getattr(config, "seed", None),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": platform.node(),
                "pid": os.getpid(),
                "processes": int(os.environ.get("WORLD_SIZE", "1")),  # under accelerate launch / torchrun
                "versions": versions(),
            },
        )
        return run

    @contextmanager
    def removed_on_error(self):
        """A run folder made by this process whose job fails before its first logged step is removed: a typo leaves
        nothing behind to clean up or to mistake for a result. A folder with steps in it, or one opened to resume,
        stays."""
        try:
            yield self
        except Exception:
            if self.fresh and not (self.path / "metrics.jsonl").exists():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `name` whole or not at all: a reader never sees half a file, and writers of the same file at once
        (the processes of one run) each rename their own temporary file, the last one winning."""
        import uuid

        target = self.path / name
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        text = json.dumps(obj, indent=2, default=float)
        try:
            tmp.write_text(text)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON file ({type(e).__name__}: {str(e)[:120]})") from None

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, default=float) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
