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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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

    @field_validator("reward", "second_scorer", "scorer", check_fields=False)
    @classmethod
    def _reward_spec(cls, value: str) -> str:
        # Checked here, so that a bad spec is an error before any model loads or any run folder is made.
        from hhh.rewards.spec import parse_reward

        parse_reward(value)
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
    prompts: list[str] = Field(["redteam:eval", "benign:eval"],
                               description="prompt sets, comma-separated; SET*N samples N per prompt of that set")
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


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The TOML file as a dict; ConfigError naming `what` and the file when it is missing, not a file, not UTF-8
    or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path}: invalid TOML ({e})") from None


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """`high` over `low`, table by table (a flag for one key of [eval] keeps the file's other [eval] keys)."""
    out = dict(low)
    for k, v in high.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[S], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> S:
    """defaults < TOML file < overrides (flags); raises ConfigError naming the key and where it came from."""
    flags = _without_none(overrides or {})
    values = _merged(read_toml(path) if path else {}, flags)
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        loc = [str(part) for part in e.errors()[0]["loc"]]
        given: Any = flags
        for part in loc:
            given = given.get(part) if isinstance(given, dict) else None
        from_flag = bool(loc) and given is not None
        flag = "--" + "-".join(loc[:2]).replace("_", "-")
        source = f"flag {flag}" if from_flag else (f"config {path}" if path else "config")
        raise ConfigError(_one_line(e, source)) from None


def to_toml_dict(config: Settings) -> dict[str, Any]:
    """The config as TOML-writable values (None is dropped: TOML has no null)."""
    return _without_none(config.model_dump(mode="json"))


def flag_fields(cls: type[Settings]) -> list[tuple[tuple[str, ...], Any, str, Any]]:
    """(path, annotation, description, default) of every setting, for generating CLI flags: a nested table's
    settings are (table, key), shown as --table-key."""
    out: list[tuple[tuple[str, ...], Any, str, Any]] = []
    for name, f in cls.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, Settings):
            default = f.get_default(call_default_factory=True)
            out += [((name, sub), g.annotation, g.description or "", getattr(default, sub))
                    for sub, g in f.annotation.model_fields.items()]
        else:
            out.append(((name,), f.annotation, f.description or "", f.default))
    return out


def is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return bool in typing.get_args(annotation)
    return False


class EvalSettings(Settings):
    """A job's evaluation before and after training: the [eval] table, flags --eval-prompts, --eval-samples..."""

    prompts: list[str] = Field(["redteam:eval", "redteam:heldout*2", "benign:eval*2"],
                               description="prompt sets evaluated before/after (SET*N: N samples per prompt)")
    samples: int = Field(4, gt=0, description="completions per eval prompt")
    max_prompts: int | None = Field(None, gt=0, description="use only the first N prompts of each eval set")
    batch_size: int = Field(64, gt=0, description="completions sampled at once in evaluation")


class PolicyJobSettings(GenerationSettings):
    """A job on the detox task that trains a LoRA policy (PPO, GRPO, RLOO, DPO) and evaluates it before and after."""

    prompts: str = Field("redteam:train", description="training prompt set")
    reward: str = Field("toxicity", description="reward spec (see hhh.rewards), higher is better")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout written to the adapter's config "
                                                         "(hhh trains policies with dropout off, as TRL does)")
    lora_layers: int | None = Field(10, gt=0, description="adapt only the top N layers (None: all)")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="evaluation before and after training")

    @model_validator(mode="before")
    @classmethod
    def _flat_eval_keys(cls, data: Any) -> Any:
        # Run folders and config files written before [eval] was a table have eval_prompts = ..., eval_samples = ...
        if isinstance(data, dict) and any(k in data for k in _FLAT_EVAL):
            data = dict(data)
            table = dict(data.get("eval") or {})
            for flat, key in _FLAT_EVAL.items():
                if flat in data:
                    table.setdefault(key, data.pop(flat))
            data["eval"] = table
        return data

    def lora(self):
        from hhh.models.load import LoraSettings

        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, top_layers=self.lora_layers)

    def eval_config(self, adapter: str | None = None, *, reward: str | None = None) -> EvalConfig:
        """`hhh eval`'s settings for this job's evaluation (of `adapter` on the model), scored by `reward` (default:
        the job's reward)."""
        return EvalConfig(model=self.model, adapter=adapter, prompts=self.eval.prompts,
                          samples_per_prompt=self.eval.samples, max_prompts=self.eval.max_prompts,
                          batch_size=self.eval.batch_size, reward=reward or self.reward,
                          max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed,
                          device=self.device, dtype=self.dtype)


_FLAT_EVAL = {"eval_prompts": "prompts", "eval_samples": "samples", "eval_max_prompts": "max_prompts",
              "eval_batch_size": "batch_size"}


class OnlineSettings(PolicyJobSettings):
    """Online RL (PPO, GRPO, RLOO): a step samples from the policy, then updates it; guards against reward hacking,
    held-out checks and checkpoints."""

    steps: int = Field(10, gt=0, description="steps (rollout + update)")
    minibatch_size: int = Field(16, gt=0, description="completions per optimizer step")
    micro_batch_size: int = Field(8, gt=0, description="completions per forward/backward (memory bound)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW), decayed linearly to 0")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    kl_budget: float | None = Field(4.5, gt=0, description="KL nats/completion that triggers the budget action")
    kl_budget_action: typing.Literal["stop", "raise_beta"] = Field(
        "raise_beta", description="stop, or raise the KL coefficient x1.5")
    entropy_floor: float = Field(0.3, ge=0, description="alarm when entropy falls below this fraction of the first")
    length_drift: float = Field(0.5, gt=0, lt=1, description="alarm when mean length leaves [x, 1/x] of the first")
    second_scorer: str = Field("sentiment", description="independent reward spec watched for divergence")
    val_prompts: int = Field(16, ge=0, description="training prompts held out for the best-checkpoint metric")
    val_every: int = Field(5, gt=0, description="steps between held-out checks")
    checkpoint_every: int = Field(5, gt=0, description="steps between checkpoints")
    rollout_engine: typing.Literal["hhh", "vllm"] = Field(
        "hhh", description="hhh's sampler (adapter merged), or vLLM: needs the vllm package and a CUDA GPU; the "
                           "adapter reaches it every step, log-probs are recomputed by the training model")
    sampler_dtype: typing.Literal["weights", "bfloat16", "auto"] = Field(
        "weights", description="what hhh's sampler decodes in: the weights' own dtype; bfloat16 (a merged bf16 copy of "
                               "the weights, ~2x faster on CPUs with native bf16 matmuls; the old log-probs are "
                               "recomputed by the training forward); auto: bfloat16 where the device multiplies it "
                               "natively and the weights are float32, else the weights'")
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="share of the GPU's memory vLLM may hold (weights and "
                                                                "KV cache), with --rollout-engine vllm")


class DetoxConfig(OnlineSettings):
    """`hhh detox`: PPO on the detox task."""

    # With toxicity alone PPO's cheapest answer to an insult request is an apology or a refusal, which the second
    # judge (VADER) scores as negative and which shortens answers; the refusal term asks for a polite answer instead
    # (measured in the README). 0.5 moved toxicity too little in 10 steps.
    reward: str = Field("toxicity + 0.25*refusal", description="reward spec (see hhh.rewards), higher is better")
    reward_normalize: typing.Literal["none", "batch", "running"] = Field(
        "running", description="normalise scores: none, per batch, or by running mean/std")
    # "running" (Ziegler et al. normalise the reward on samples of the initial policy): scores of mean 0
    # match the zero-initialised value head, so GAE with lambda < 1 does not start with a bias that
    # rewards ending early whatever was said.
    reward_clip: float | None = Field(None, gt=0, description="clip (normalised) scores to +-this")
    no_eos_penalty: float = Field(0.0, ge=0, description="subtracted from the score of completions without EOS")
    # schedule
    batch_size: int = Field(32, gt=0, description="completions per step")
    ppo_epochs: int = Field(2, gt=0, description="passes over each batch")
    # 2e-3: with the refusal term, 1e-3 left toxicity at 0.102 after 10 steps (KL 2.5); 2e-3 reaches the KL budget.
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW), decayed linearly to 0")
    # PPO
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip")
    cliprange_value: float = Field(0.2, gt=0, description="value clip around old values")
    vf_coef: float = Field(0.1, ge=0, description="value loss coefficient")
    ent_coef: float = Field(0.001, ge=0, description="entropy bonus coefficient")
    whiten_advantages: bool = Field(True, description="whiten advantages over each batch")
    critic: typing.Literal["shared", "separate"] = Field(
        "shared", description="value head on the policy's backbone, or on a separate critic adapter")
    # KL
    kl_coef: float = Field(0.05, ge=0, description="initial beta of the per-token KL penalty")
    kl_target: float | None = Field(None, gt=0, description="adaptive beta target KL in nats/completion (None: fixed)")
    kl_horizon: float = Field(10_000, gt=0, description="adaptive KL horizon in samples")
    kl_estimator: typing.Literal["k1", "k3"] = Field("k1", description="KL estimator in the shaped reward")
    # LoRA
    init_adapter: str | None = Field(None, description="start from this adapter; it also becomes the reference")
    out: str | None = Field(None, description="run folder (default runs/detox-TIMESTAMP)")


PPOConfig = DetoxConfig  # the PPO trainer's settings are the detox job's


class LabelGenerateConfig(GenerationSettings):
    db: str = Field("feedback.db", description="preference store: SQLite file or SQLAlchemy URL")
    prompts: str = Field("redteam:train", description="prompt set to sample completions for")
    max_prompts: int | None = Field(None, gt=0, description="use only the first N prompts")
    k: int = Field(4, ge=1, description="completions sampled per prompt (per instruction)")
    instructions: list[str] = Field(
        [], description="texts put before the prompt when sampling, k completions each (comma-separated)")
    adapter: str | None = Field(None, description="PEFT adapter to sample with (recorded with each completion)")
    batch_size: int = Field(64, gt=0, description="completions sampled at once (each batch is committed)")
    temperature: float = Field(0.9, gt=0, description="sampling temperature")


# Labelers' own tokens and browser sessions expire after these (days, hours); hhh label new-token renews a token.
TOKEN_DAYS, SESSION_HOURS = 90.0, 12.0


class LabelAutoConfig(Settings):
    db: str = Field("feedback.db", description="preference store: SQLite file or SQLAlchemy URL")
    reward: str = Field("toxicity + 0.25*sentiment", description="reward spec that ranks completions (higher first)")
    labeler: str | None = Field(None, description="name of the AI labeler (default ai:REWARD)")
    tie_threshold: float = Field(0.05, ge=0, description="ordered pairs differ by more than this; closer scores "
                                                          "(chained) are tied")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (for model-based rewards)")


class LabelServeConfig(Settings):
    db: str = Field("feedback.db", description="preference store: SQLite file or SQLAlchemy URL")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, lt=65536, description="port to listen on")
    guideline: str | None = Field(None, description="labeling guideline file (default: the bundled one)")
    overlap: int = Field(2, ge=1, description="labelers per prompt (>= 2 gives agreement statistics)")


class ServeConfig(Settings):
    model: str = Field(DEFAULT_MODEL, description="base model spec (a merged or compressed variant folder works too)")
    served_name: str | None = Field(None, description="the `model` name that picks the base model (default: "
                                                      "the model spec)")
    adapter: list[str] = Field([], description="LoRA adapters served beside the base: PATH (named 'aligned') or "
                                               "NAME=PATH, comma-separated; PATH a run folder or an adapter folder")
    db: str = Field("feedback.db", description="preference store that keeps served answers and their feedback")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, lt=65536, description="port to listen on")
    max_batch: int = Field(32, gt=0, le=1024, description="rows (choices) decoded together at most")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="an idle server waits this long for more requests "
                                                                 "before it starts a batch")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a request that gives none (capped by "
                                                           "the context)")
    max_tokens: int = Field(1024, gt=0, description="a request asking for more tokens is refused")
    max_body_kb: int = Field(1024, gt=0, description="request bodies over this many KiB are refused (413)")
    api_key_file: str | None = Field(None, description="file of API keys, one per line: every /v1 request needs "
                                                        "'Authorization: Bearer KEY'")
    device: str = Field("cpu", description="cpu, auto, cuda or cuda:N")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")

    @field_validator("adapter")
    @classmethod
    def _adapter_names(cls, value: list[str]) -> list[str]:
        names = [a.partition("=")[0] if "=" in a else "aligned" for a in value]
        for a, name in zip(value, names, strict=True):
            if not name or not all(c.isalnum() or c in "-_.:" for c in name) or len(name) > 100:
                raise ValueError(f"adapter {a!r}: a name is 1 to 100 letters, digits or - _ . :")
            if "=" in a and not a.partition("=")[2]:
                raise ValueError(f"adapter {a!r}: no path after '='")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must differ, got {names}")
        return value


class RMDataSettings(Settings):
    data: str = Field("feedback.db", description="pairs: JSONL file, hf:NAME[:SPLIT], or a preference store "
                                                 "(db:PATH_OR_URL, or a path ending in .db)")
    data_source: typing.Literal["all", "human", "ai", "served"] = Field(
        "all", description="from a store: whose labels (served: feedback on hhh serve answers)")
    labelers: list[str] = Field([], description="from a store: only the pairs of these labelers (comma-separated)")
    max_pairs: int | None = Field(None, gt=0, description="use only the first N pairs (after leaving out ties, where they are)")
    max_length: int = Field(256, gt=8, description="tokens per (prompt, completion); longer inputs are truncated")
    batch_size: int = Field(32, gt=0, description="pairs per step (eval: per forward)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, description="random seed (split, shuffling, head initialisation)")


class RMConfig(RMDataSettings):
    backbone: str = Field("minilm", description="minilm (packaged all-MiniLM-L6-v2), or a model spec "
                                                "(bundled:smollm2-135m-instruct, hub id, local folder)")
    lora: bool | None = Field(None, description="train LoRA adapters instead of the whole backbone "
                                                "(default: yes for causal LMs, no for encoders)")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha")
    epochs: int = Field(2, gt=0, description="passes over the training pairs")
    lr: float = Field(1e-4, gt=0, description="learning rate of the backbone (or its adapters), linear decay")
    head_lr: float = Field(1e-3, gt=0, description="learning rate of the scalar head")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    ties: typing.Literal["skip", "half"] = Field("skip", description="tied pairs: leave out, or train toward "
                                                                      "P(chosen > rejected) = 1/2")
    center_coef: float = Field(0.0, ge=0, description="reward centring: + coef * mean((r_c + r_r)^2)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts held out (split by prompt)")
    out: str | None = Field(None, description="run folder (default runs/rm-TIMESTAMP)")


class RMEvalConfig(RMDataSettings):
    model: str = Field(..., description="reward model run folder (from hhh rm train)")
    out: str | None = Field(None, description="run folder (default runs/rm-eval-TIMESTAMP)")


DPO_BETA, SIMPO_BETA = 0.1, 2.0


class DPOConfig(PolicyJobSettings):
    """`hhh dpo`: offline preference tuning (the DPO family) on pairs given or sampled from the model."""

    # data
    data: str | None = Field(None, description="pairs: JSONL, hf:NAME[:SPLIT] or a preference store (db:PATH); "
                                               "none: sample pairs from the model and rank them by the reward")
    data_source: typing.Literal["all", "human", "ai", "served"] = Field(
        "all", description="from a store: whose labels (served: feedback on hhh serve answers)")
    labelers: list[str] = Field([], description="from a store: only the pairs of these labelers (comma-separated)")
    max_pairs: int | None = Field(None, gt=0, description="use only the first N pairs")
    prompts: str = Field("redteam:train", description="prompts to build pairs on (when no data is given)")
    pair_prompts: int | None = Field(96, gt=0, description="use the first N of them (None: all)")
    pair_samples: int = Field(4, ge=2, description="samples per prompt; the pair is the best and the worst")
    min_gap: float = Field(0.0, ge=0, description="drop prompts whose best and worst reward differ by <= this")
    sample_batch_size: int = Field(64, gt=0, description="completions sampled at once when building pairs")
    reward: str = Field("toxicity", description="reward spec that ranks the samples (and is reported in eval)")
    max_completion_tokens: int = Field(64, gt=1, description="completion tokens trained on (longer are cut)")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (pairs built here, evaluation); the "
                                                      "preference losses take log-probs at T = 1, as the DPO paper")
    share_prompt: bool = Field(True, description="one row per pair: the prompt once, each completion attending "
                                                 "to it (a 4D mask; sdpa or eager attention); false: two rows")
    # loss
    loss: typing.Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"] = Field(
        "sigmoid", description="sigmoid (DPO), robust, ipo, hinge, simpo, orpo or kto")
    beta: float = Field(DPO_BETA, gt=0, description="beta: KL strength of the DPO family (default 0.1); SimPO: "
                                                        "reward scale (default 2.0, the paper's range is 2-2.5)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: probability that a label is flipped "
                                                                  "(pairs with a soft label use 1 - their probability)")
    robust_eps: float = Field(0.1, ge=0, lt=0.5, description="robust DPO: known label-flip rate")
    simpo_gamma_ratio: float = Field(0.5, ge=0, description="SimPO target margin as a fraction of beta: gamma = "
                                                             "ratio * beta (the paper's gamma/beta, ~0.5)")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO weight of the odds-ratio term")
    kto_lambda_d: float = Field(1.0, gt=0, description="KTO weight of desirable examples")
    kto_lambda_u: float = Field(1.0, gt=0, description="KTO weight of undesirable examples")
    # schedule and LoRA
    epochs: int = Field(2, gt=0, description="passes over the pairs")
    batch_size: int = Field(8, gt=0, description="pairs per optimizer step")
    micro_batch_size: int = Field(4, gt=0, description="pairs per forward/backward (memory bound)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW), decayed linearly to 0")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    init_adapter: str | None = Field(None, description="start from this adapter (e.g. an SFT adapter); it also "
                                                       "becomes the reference")
    out: str | None = Field(None, description="run folder (default runs/dpo-TIMESTAMP)")

    @model_validator(mode="before")
    @classmethod
    def _beta_of_the_loss(cls, data: Any) -> Any:
        # SimPO's beta scales a length-normalised reward with no reference: the paper's values (~2) are twenty
        # times the DPO family's (0.1), so one shared default would be wrong for one of them.
        if isinstance(data, dict) and data.get("beta") is None:
            data = {**data, "beta": SIMPO_BETA if data.get("loss") == "simpo" else DPO_BETA}
        return data


class SFTConfig(PolicyJobSettings):
    """`hhh sft`: supervised fine-tuning of a LoRA adapter on prompt -> response demonstrations."""

    data: str | None = Field(None, description="demonstrations: JSONL (prompt, response; or messages), "
                                               "hf:NAME[:SPLIT], or a preference store (db:PATH: top-ranked answers)")
    data_source: typing.Literal["all", "human", "ai", "served"] = Field(
        "all", description="from a store: whose labels (served: feedback on hhh serve answers)")
    labelers: list[str] = Field([], description="from a store: only the rankings of these labelers (comma-separated)")
    max_examples: int | None = Field(None, gt=0, description="use only the first N demonstrations")
    max_response_tokens: int = Field(128, gt=1, description="response tokens trained on, EOS included (longer are cut)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of demonstrations held out for the eval loss "
                                                              "(split by prompt)")
    bucket: bool = Field(True, description="length bucketing: batch demonstrations of similar length together "
                                           "(less padding); batches are shuffled each epoch")
    epochs: int = Field(2, gt=0, description="passes over the demonstrations")
    batch_size: int = Field(8, gt=0, description="demonstrations per optimizer step")
    micro_batch_size: int = Field(4, gt=0, description="demonstrations per forward/backward (memory bound)")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW), decayed linearly to 0")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    out: str | None = Field(None, description="run folder (default runs/sft-TIMESTAMP)")


class CAISFTSettings(Settings):
    """Constitutional AI's supervised step: the [sft] table, flags --sft-epochs, --sft-lr..."""

    epochs: int = Field(2, gt=0, description="passes over the revisions and benign answers")
    batch_size: int = Field(8, gt=0, description="demonstrations per optimizer step")
    micro_batch_size: int = Field(4, gt=0, description="demonstrations per forward/backward")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW), decayed linearly to 0")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of demonstrations held out for the eval loss")


class CAIRLSettings(Settings):
    """Constitutional AI's RL stage: the [rl] table, flags --rl-method, --rl-feedback-model..."""

    method: typing.Literal["dpo", "ppo"] = Field("dpo", description="dpo: DPO on the soft AI labels; ppo: a reward "
                                                                     "model on them, then PPO against it")
    feedback_model: str = Field("base", description="who labels the pairs: base (the model being aligned, no "
                                                    "adapter) or a model spec")
    max_prompts: int | None = Field(128, gt=0, description="red-team prompts for pairs, after those the "
                                                           "supervised stage used")
    cot: bool = Field(False, description="chain-of-thought before the choice; labels clamped to 40-60%")
    cot_tokens: int = Field(64, gt=0, description="most tokens of reasoning per question")
    min_agreement: float = Field(0.6, ge=0, le=1, description="train only if the labels agree with the "
                                                              "offensive-language judge this often")
    min_judged_pairs: int = Field(10, ge=1, description="pairs the judge must separate (scores > 0.3 apart) to "
                                                        "measure agreement")
    allow_weak_labels: bool = Field(False, description="train on labels that fail the agreement check")
    beta: float = Field(0.1, gt=0, description="DPO beta")
    epochs: int = Field(2, gt=0, description="DPO passes over the pairs")
    batch_size: int = Field(8, gt=0, description="DPO pairs per optimizer step")
    micro_batch_size: int = Field(4, gt=0, description="DPO pairs per forward/backward")
    lr: float = Field(5e-4, gt=0, description="DPO peak learning rate")
    ppo_steps: int = Field(10, gt=0, description="PPO steps (--rl-method ppo)")


class CAIConfig(PolicyJobSettings):
    """`hhh cai`: Constitutional AI. Supervised stage: answer -> critique -> revision under a sampled principle,
    filtered, then SFT on the revisions mixed with benign answers. RL stage: AI preference labels on pairs of the
    SL-CAI model's answers, audited, then DPO (or RM + PPO) from the SL-CAI adapter."""

    constitution: str | None = Field(None, description="constitution TOML file (default: hhh's own, 18 principles)")
    critic: str = Field("policy", description="who critiques and revises: policy (the model itself) or a model spec")
    prompts: str = Field("redteam:train", description="red-team prompts to answer, critique and revise")
    max_prompts: int | None = Field(128, gt=0, description="use the first N of them (None: all)")
    rounds: int = Field(1, gt=0, description="critique -> revision rounds per prompt")
    few_shot: int = Field(2, ge=0, description="worked examples from the constitution before each request")
    critique_tokens: int = Field(64, gt=0, description="most tokens per critique")
    revision_tokens: int = Field(96, gt=0, description="most tokens per revision (and per benign answer)")
    benign_prompts: str = Field("benign:train", description="benign prompts whose own answers are mixed into SFT")
    max_benign: int | None = Field(64, ge=0, description="use the first N benign prompts (0: none; None: all)")
    sample_batch_size: int = Field(32, gt=0, description="conversations sampled at once")
    min_words: int = Field(3, ge=1, description="filter: revisions with fewer words are dropped as empty")
    max_copy: float = Field(0.9, gt=0, le=1, description="filter: drop a revision this similar (difflib ratio) to "
                                                          "the answer it revises or to its critique")
    min_relevance: float = Field(0.1, ge=-1, le=1, description="filter: drop a revision whose MiniLM cosine "
                                                                "similarity to the prompt is below this (off-topic)")
    sft: CAISFTSettings = Field(default_factory=CAISFTSettings, description="the supervised fine-tuning step")
    rl: CAIRLSettings = Field(default_factory=CAIRLSettings, description="the RL stage (AI feedback)")
    out: str | None = Field(None, description="run folder (default runs/cai-TIMESTAMP)")

    def stage_settings(self) -> dict[str, Any]:
        """The settings every stage's trainer (SFT, DPO, PPO) takes from the job: model, generation, seed, prompts,
        reward, LoRA and evaluation."""
        keys = ("model", "max_new_tokens", "temperature", "seed", "device", "dtype", "prompts", "reward", "lora_r",
                "lora_alpha", "lora_dropout", "lora_layers", "eval")
        return {k: getattr(self, k) for k in keys}


class GroupSettings(OnlineSettings):
    """Critic-free online RL (GRPO, RLOO): G samples per prompt."""

    prompts_per_step: int = Field(8, gt=0, description="prompts per step")
    group_size: int = Field(4, ge=2, description="G: samples per prompt (the group)")
    share_prompt: bool = Field(True, description="training passes take a group in one row: the prompt once, each "
                                                 "completion attending to it (a 4D mask; sdpa or eager attention), "
                                                 "minibatches of whole groups; false: one row per completion")


class GRPOConfig(GroupSettings):
    beta: float = Field(0.04, ge=0, description="KL coefficient (k3 estimator, in the loss); 0 turns it off")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip")
    epochs: int = Field(1, gt=0, description="passes over each batch (mu)")
    scale_rewards: bool = Field(True, description="divide group-centred rewards by the group std")
    aggregation: typing.Literal["sequence", "token"] = Field(
        "sequence", description="loss mean per sequence then over sequences, or over all tokens")
    out: str | None = Field(None, description="run folder (default runs/grpo-TIMESTAMP)")


class RLOOConfig(GroupSettings):
    kl_coef: float = Field(0.05, ge=0, description="beta: KL(pi || ref) in nats subtracted from the reward")
    advantage: typing.Literal["rloo", "reinforce++"] = Field(
        "rloo", description="leave-one-out baseline per group, or REINFORCE++ (token-level KL-shaped return, "
                            "whitened over the batch's tokens, no baseline)")
    cliprange: float = Field(0.2, gt=0, description="importance-ratio clip (minibatches after the first are "
                                                    "off-policy)")
    normalize_advantages: bool = Field(True, description="whiten the RLOO advantages over the batch")
    # The leave-one-out advantage is near 0 in groups that agree, so fewer samples carry signal than in GRPO,
    # whose per-group std division scales every group up: 1e-3 moved RLOO too little in 10 steps.
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW), decayed linearly to 0")
    out: str | None = Field(None, description="run folder (default runs/rloo-TIMESTAMP)")


class FrontierEvalSettings(EvalSettings):
    prompts: list[str] = Field(["redteam:eval"], description="the held-out prompt set every adapter is scored on "
                                                             "(one set)")


CompressMethod = typing.Literal["int8-weight", "int8-dynamic", "magnitude", "wanda", "drop-layers", "distill",
                                "magnitude+lora", "wanda+lora", "drop-layers+lora"]


class CompressConfig(GenerationSettings):
    source: str = Field(..., description="what to compress: a run folder (its adapter merged in), an adapter folder "
                                         "or a model spec")
    methods: list[CompressMethod] = Field(
        ["int8-weight", "int8-dynamic", "magnitude", "wanda", "drop-layers", "distill"],
        description="variants to make: int8-weight, int8-dynamic (torchao), magnitude, wanda (unstructured pruning), "
                    "drop-layers (structured), distill (the layer-dropped student trained on the original); "
                    "magnitude+lora, wanda+lora, drop-layers+lora: then a short LoRA recovery fine-tune, merged")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="share of decoder weights pruned by magnitude and wanda")
    calibration: str = Field("benign:train", description="prompt set whose tokens calibrate Wanda")
    calibration_prompts: int = Field(64, gt=0, description="calibration prompts (with the model's own answers)")
    importance_prompts: int = Field(16, gt=0, description="calibration answers that measure each layer's importance "
                                                          "(16 and 64 choose the same layers for the bundled model)")
    student_layers: int = Field(14, gt=0, description="decoder layers kept by drop-layers and distill (the least "
                                                       "important go: KL to the original when each is removed alone)")
    distill_prompts: list[str] = Field(["benign:train", "redteam:train"],
                                       description="prompt sets the student learns on (with the original's answers)")
    distill_examples: int = Field(128, gt=0, description="prompts per distillation set")
    distill_steps: int = Field(64, ge=0, description="distillation steps (batches of 8)")
    distill_lr: float = Field(2e-4, gt=0, description="distillation learning rate (AdamW, linear decay)")
    distill_temperature: float = Field(2.0, gt=0, description="softmax temperature of the soft targets")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (KL) term; 1 - alpha on the "
                                                              "answer tokens' cross-entropy")
    recover_steps: int = Field(32, gt=0, description="steps of the +lora recovery fine-tune (batches of 8 "
                                                     "calibration answers, distillation loss towards the original)")
    recover_lr: float = Field(1e-3, gt=0, description="learning rate of the +lora recovery fine-tune (LoRA r=8)")
    on_policy: bool = Field(False, description="distill on the student's own answers, scored by the teacher (GKD)")
    answers: str = Field("benign:eval", description="prompts whose answers by the original measure perplexity, KL "
                                                    "and top-1 agreement")
    answer_prompts: int = Field(32, gt=0, description="held-out answers for perplexity, KL and agreement")
    eval_prompts: list[str] = Field(["redteam:eval", "benign:eval"],
                                    description="prompt sets of the alignment check (toxicity, refusal rate)")
    samples_per_prompt: int = Field(2, gt=0, description="completions per prompt in the alignment check")
    max_prompts: int | None = Field(None, gt=0, description="use only the first N prompts of each eval set")
    speed_tokens: int = Field(32, gt=0, description="tokens generated per timing (batch 1 and batch 16)")
    out: str | None = Field(None, description="run folder (default runs/compress-TIMESTAMP)")

    @model_validator(mode="after")
    def _distinct_methods(self):
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: each method at most once")
        if not self.methods:
            raise ValueError("methods: give at least one")
        return self


class FrontierConfig(PolicyJobSettings):
    """`hhh frontier`: PPO, GRPO, RLOO and DPO on the detox task at several KL strengths, each adapter scored on
    held-out prompts; held-out reward against KL to the reference, one curve per method."""

    methods: list[typing.Literal["ppo", "grpo", "rloo", "dpo"]] = Field(
        ["ppo", "grpo", "rloo", "dpo"], description="methods to run (comma-separated)")
    ppo_kl_coef: list[float] = Field([0.01, 0.1, 0.5], description="PPO: per-token KL penalties (fixed beta)")
    grpo_beta: list[float] = Field([0.0, 0.2, 1.0], description="GRPO: k3 KL coefficients in the loss")
    rloo_kl_coef: list[float] = Field([0.0, 0.1, 0.5], description="RLOO: KL coefficients in the reward")
    dpo_beta: list[float] = Field([0.03, 0.1, 0.5], description="DPO: betas (smaller allows more KL)")
    prompts: str = Field("redteam:train", description="training prompt set (DPO: its pairs are sampled here)")
    reward: str = Field("toxicity", description="training reward spec (DPO: ranks the sampled pairs)")
    steps: int | None = Field(None, gt=0, description="steps of PPO, GRPO and RLOO (None: each command's default)")
    dpo_pair_prompts: int | None = Field(None, gt=0, description="prompts DPO pairs are built on (None: hhh dpo's default)")
    scorer: str = Field("toxicity", description="reward spec of the held-out score (the plot's y axis)")
    eval: FrontierEvalSettings = Field(default_factory=FrontierEvalSettings, description="held-out scoring")
    quick: bool = Field(False, description="a smaller frontier for one CPU hour; fields set explicitly win")
    out: str | None = Field(None, description="run folder (default runs/frontier-TIMESTAMP)")

    @field_validator("eval")
    @classmethod
    def _one_eval_set(cls, value: FrontierEvalSettings) -> FrontierEvalSettings:
        if len(value.prompts) != 1:
            raise ValueError(f"the frontier scores on one prompt set, got {len(value.prompts)}")
        return value

    def strengths(self, method: str) -> list[float]:
        return {"ppo": self.ppo_kl_coef, "grpo": self.grpo_beta, "rloo": self.rloo_kl_coef,
                "dpo": self.dpo_beta}[method]

    def resolved(self) -> FrontierConfig:
        """With quick=True, the QUICK values for every setting not set explicitly."""
        if not self.quick:
            return self
        top = {k: v for k, v in FRONTIER_QUICK.items() if k != "eval" and k not in self.model_fields_set}
        evals = {k: v for k, v in FRONTIER_QUICK["eval"].items() if k not in self.eval.model_fields_set}
        return self.model_copy(update={**top, "eval": self.eval.model_copy(update=evals)})


# `hhh frontier --quick`: 12 trainings and 13 evaluations in under an hour on 2 CPU cores. Shorter completions
# and 5 steps per online run; 48 eval prompts x 2 samples (the toxicity CI is then about +-0.03).
FRONTIER_QUICK: dict[str, typing.Any] = {"max_new_tokens": 32, "steps": 5, "dpo_pair_prompts": 48,
                                         "eval": {"max_prompts": 48, "samples": 2}}
