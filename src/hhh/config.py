"""Typed, validated settings: one frozen pydantic model per command.

The same model serves the Python API, the TOML file (`--config FILE`) and the command-line flags
(`--field-name VALUE`, generated from the fields, whose descriptions become the `--help` text).
Precedence: defaults < TOML file < flags. Unknown keys and wrong types are one-line errors naming
the key.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hhh.models.spec import DEFAULT_MODEL


class ConfigError(ValueError):
    """A bad setting; str() is one line naming the key."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _split_lists(cls, value: Any, info) -> Any:
        # Flags give lists as comma-separated strings: --prompts redteam:eval,benign:eval
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and typing.get_origin(annotation) in (list, tuple):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


class GenerationSettings(Settings):
    model: str = Field(DEFAULT_MODEL, description="model spec: bundled:NAME, hub id, local folder or .gguf file")
    max_new_tokens: int = Field(48, gt=0, description="most tokens sampled per completion")
    temperature: float = Field(0.7, gt=0, description="sampling temperature, also used in every log-prob pass")
    seed: int = Field(0, description="random seed for sampling and initialisation")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: typing.Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")


class EvalConfig(GenerationSettings):
    adapter: str | None = Field(None, description="PEFT adapter folder to evaluate on top of the model")
    prompts: list[str] = Field(["redteam:eval", "benign:eval"], description="prompt sets, comma-separated")
    samples_per_prompt: int = Field(4, gt=0, description="completions sampled per prompt")
    max_prompts: int | None = Field(None, gt=0, description="use only the first N prompts of each set")
    batch_size: int = Field(64, gt=0, description="completions sampled at once")
    reward: str = Field("toxicity", description="reward spec whose mean is reported (see hhh.rewards)")
    out: str | None = Field(None, description="run folder (default runs/eval-TIMESTAMP)")


S = TypeVar("S", bound=Settings)


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "(root)"
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: key {key!r}: {e['msg']}{shown}{more}"


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML ({e})") from None


def load_config(cls: type[S], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> S:
    """defaults < TOML file < overrides (flags); raises ConfigError naming the key and where it came from."""
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = {**(read_toml(path) if path else {}), **flags}
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        loc = e.errors()[0]["loc"]
        key = str(loc[0]) if loc else ""
        source = f"flag --{key.replace('_', '-')}" if key in flags else (f"config {path}" if path else "config")
        raise ConfigError(_one_line(e, source)) from None


def to_toml_dict(config: Settings) -> dict[str, Any]:
    """The config as TOML-writable values (None is dropped: TOML has no null)."""
    return {k: v for k, v in config.model_dump(mode="json").items() if v is not None}


def flag_fields(cls: type[Settings]) -> list[tuple[str, Any, str, Any]]:
    """(name, annotation, description, default) for each field, for generating CLI flags."""
    return [(n, f.annotation, f.description or "", f.default) for n, f in cls.model_fields.items()]


def is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return bool in typing.get_args(annotation)
    return False
