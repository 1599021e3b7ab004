"""Constitutional AI, RL stage (RL-CAI / RLAIF; Bai et al. 2022, sec. 4).

    # 1. pairs: two answers per red-team prompt (prompts the supervised stage did not use) from the SL-CAI model
    # 2. labels: the feedback model's soft label under a comparison principle drawn per pair (hhh.cai.feedback)
    # 3. audit: agreement with the offensive-language judge on the pairs it separates clearly, and position bias;
    #    labels below --rl-min-agreement do not train anything unless --rl-allow-weak-labels
    # 4. store: the pairs as AI labels with their probabilities (RUN/rl/feedback.db)
    # 5. train from the SL-CAI adapter (also the reference): DPO on the soft labels (default), or a reward model on
    #    them and PPO against it

RUN/rl/labels.jsonl keeps every pair: prompt, both answers, the principle, P(first better), P("(A)") in both
orders, both judge scores (and the reasoning, with chain-of-thought).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hhh.cai.constitution import Constitution
from hhh.config import CAIConfig, DetoxConfig, DPOConfig, RMConfig
from hhh.train.loop import step_generator


class WeakLabels(ValueError):
    """The feedback model's labels failed the agreement check: nothing was trained on them."""


def answer_pairs(config: CAIConfig, prompts: list[str], *, model, tokenizer) -> tuple[list[str], list[str]]:
    """Two sampled answers per prompt from `model` (the SL-CAI model): the first and second of each pair."""
    from hhh.rollout import sample
    from hhh.train.loop import chunks

    rows = [p for p in prompts for _ in range(2)]
    texts: list[str] = []
    device = next(model.parameters()).device
    for b, part in enumerate(chunks(len(rows), config.sample_batch_size)):
        gen = step_generator(config.seed, b, device, stream=4)
        texts += sample(model, tokenizer, rows[part], max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature, generator=gen).texts
    return texts[0::2], texts[1::2]


def label(config: CAIConfig, constitution: Constitution, prompts: list[str], first: list[str], second: list[str],
          *, critic, device) -> list[dict[str, Any]]:
    """One record per pair: the comparison principle, the soft label, P("(A)") in both orders, the judge's scores."""
    from hhh.cai.feedback import label_pairs
    from hhh.rewards.builtin import Toxicity

    questions = [constitution.comparison_for(config.seed, i) for i in range(len(prompts))]
    labels = label_pairs(critic, prompts, first, second, [q.question for q in questions], cot=config.rl.cot,
                         cot_tokens=config.rl.cot_tokens, temperature=config.temperature,
                         generator=step_generator(config.seed, 0, device, stream=5))
    judge = Toxicity()
    off_first, off_second = judge.offensive(first).tolist(), judge.offensive(second).tolist()
    return [{"prompt": p, "first": a, "second": b, "comparison": q.name, "p_first": float(labels.p_first[i]),
             "p_a": [float(x) for x in labels.p_a[i]], "offensive_first": off_first[i], "offensive_second": off_second[i],
             **({"reasoning": labels.reasoning[i]} if labels.reasoning else {})}
            for i, (p, a, b, q) in enumerate(zip(prompts, first, second, questions, strict=True))]


def audit(records: list[dict[str, Any]], config: CAIConfig) -> dict[str, Any]:
    """Agreement with the judge, position bias, label confidence; and whether the labels may train."""
    import numpy as np

    from hhh.cai.feedback import agreement

    p = np.array([r["p_first"] for r in records])
    result = agreement(p, [r["offensive_first"] for r in records], [r["offensive_second"] for r in records],
                       seed=config.seed)
    result["position_bias"] = float(np.mean([r["p_a"] for r in records]))
    result["mean_confidence"] = float(np.mean(np.maximum(p, 1 - p)))
    result["pairs_labelled"] = len(records)
    ok = result["agreement"] is not None and result["pairs"] >= config.rl.min_judged_pairs \
        and result["agreement"] >= config.rl.min_agreement
    result["passed"] = bool(ok)
    result["threshold"] = {"min_agreement": config.rl.min_agreement, "min_judged_pairs": config.rl.min_judged_pairs}
    return result


def to_store(store_path: Path, records: list[dict[str, Any]], *, model: str, adapter: str, labeler: str) -> None:
    """Each pair as an AI ranking with its probability (a tie at exactly 0.5); prompts ranked before are skipped."""
    from sqlalchemy import select

    from hhh.feedback.store import Ranking, Store

    store = Store(str(store_path))
    who = store.ai_labeler(labeler)
    with store.read() as s:
        ranked = set(s.scalars(select(Ranking.prompt_id).where(Ranking.labeler_id == who)))
    for r in records:
        pid = store.add_prompt(r["prompt"], source="cai")
        a = store.add_completion(pid, r["first"], model=model, adapter=adapter)
        b = store.add_completion(pid, r["second"], model=model, adapter=adapter)
        if pid in ranked or a == b:
            continue
        p = r["p_first"]
        tiers = [[a, b]] if p == 0.5 else ([[a], [b]] if p > 0.5 else [[b], [a]])
        store.submit(who, pid, tiers, submission_id=f"cai-feedback-{pid}",
                     probability=None if p == 0.5 else max(p, 1 - p))


def dpo_config(config: CAIConfig, sl_adapter: str, rl_dir: Path) -> DPOConfig:
    """DPO on the stage's AI labels (soft: each pair's probability), from the SL-CAI adapter; run folder rl/dpo."""
    rl = config.rl
    return DPOConfig(**config.stage_settings(), data=f"db:{rl_dir / 'feedback.db'}", data_source="ai",
                     init_adapter=sl_adapter, beta=rl.beta, epochs=rl.epochs, lr=rl.lr, batch_size=rl.batch_size,
                     micro_batch_size=rl.micro_batch_size, max_completion_tokens=config.max_new_tokens + 1,
                     out=str(rl_dir / "dpo"))


def rm_config(config: CAIConfig, rl_dir: Path) -> RMConfig:
    """A MiniLM reward model on the stage's AI labels (run folder rl/rm)."""
    return RMConfig(data=f"db:{rl_dir / 'feedback.db'}", data_source="ai", backbone="minilm", seed=config.seed,
                    device=config.device, out=str(rl_dir / "rm"))


def ppo_config(config: CAIConfig, sl_adapter: str, rl_dir: Path) -> DetoxConfig:
    """PPO from the SL-CAI adapter (also the reference) against the reward model of rl/rm (run folder rl/ppo);
    the reward spec is checked here, so the reward model must exist."""
    return DetoxConfig(**{**config.stage_settings(), "reward": f"rm:{rl_dir / 'rm'}"}, init_adapter=sl_adapter,
                       steps=config.rl.ppo_steps, out=str(rl_dir / "ppo"))


def read_labels(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
