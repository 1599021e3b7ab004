"""hhh: align instruction-tuned language models (helpful, honest, harmless).

The public API, imported lazily so that `import hhh` stays light:

    >>> from hhh import DetoxConfig, run_job
    >>> run = run_job("detox", DetoxConfig(steps=2))  # doctest: +SKIP
"""

from importlib import import_module

_EXPORTS = {
    "DetoxConfig": "hhh.config",
    "EvalConfig": "hhh.config",
    "PPOConfig": "hhh.config",
    "load_config": "hhh.config",
    "run_job": "hhh.jobs",
    "JOBS": "hhh.jobs",
    "DPOConfig": "hhh.config",
    "GRPOConfig": "hhh.config",
    "RLOOConfig": "hhh.config",
    "FrontierConfig": "hhh.config",
    "frontier": "hhh.frontier",
    "evaluate": "hhh.evaluate",
    "Policy": "hhh.models.policy",
    "build_policy": "hhh.models.policy",
    "sample": "hhh.rollout",
    "build_reward": "hhh.rewards",
    "load_prompts": "hhh.data",
    "RunDir": "hhh.runs",
    "Store": "hhh.feedback.store",
    "create_app": "hhh.feedback.app",
    "LabelGenerateConfig": "hhh.config",
    "LabelAutoConfig": "hhh.config",
    "RMConfig": "hhh.config",
    "RMEvalConfig": "hhh.config",
    "train_rm": "hhh.train.rm",
    "eval_rm": "hhh.train.rm",
    "build_reward_model": "hhh.models.reward_model",
    "load_reward_model": "hhh.models.reward_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hhh' has no attribute {name!r}")
