"""Fill the store: sample completions from a model (`hhh label generate`), rank them with an AI judge
(`hhh label auto`). Both commit batch by batch and skip what is already done, so an interrupted job is
resumed by running it again."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sqlalchemy import func, select

from hhh.config import LabelAutoConfig, LabelGenerateConfig
from hhh.feedback.store import Completion, Ranking, Store


def rank_by_score(ids: Sequence[int], scores: Sequence[float], tie_threshold: float = 0.0) -> list[list[int]]:
    """Tiers, best first, split where consecutive sorted scores differ by more than `tie_threshold`.

    So any two completions in different tiers differ by more than the threshold: every ordered pair the AI
    labeler states is a clear preference, and near-equal scores become ties (a tier may chain wider).
    """
    order = sorted(zip(scores, ids, strict=True), key=lambda t: (-t[0], t[1]))
    tiers: list[list[int]] = []
    previous = None
    for score, cid in order:
        if previous is not None and previous - score <= tie_threshold:
            tiers[-1].append(cid)
        else:
            tiers.append([cid])
        previous = score
    return [sorted(t) for t in tiers]


def generate(config: LabelGenerateConfig, *, console=None) -> dict[str, int]:
    """Sample `k` completions per (prompt, instruction) into the store; returns counts of what was added."""
    from rich.console import Console
    from rich.progress import Progress

    from hhh.data import load_prompts
    from hhh.models import load_adapter, load_causal_lm, load_tokenizer
    from hhh.rollout import sample

    console = console or Console(stderr=True)
    prompts = load_prompts(config.prompts, limit=config.max_prompts)
    store = Store(config.db)
    instructions = config.instructions or [""]
    with store.write() as s:
        pids = [store.add_prompt(p, config.prompts, session=s) for p in prompts]
        # resume: (prompt, instruction) groups that already hold k completions of this model and adapter
        same_adapter = Completion.adapter.is_(None) if config.adapter is None else Completion.adapter == config.adapter
        have = {(pid, instr): n for pid, instr, n in s.execute(
            select(Completion.prompt_id, Completion.instruction, func.count(Completion.id))
            .where(Completion.model == config.model, same_adapter)
            .group_by(Completion.prompt_id, Completion.instruction))}
    rows = [(pid, text, instr) for pid, text in zip(pids, prompts, strict=True) for instr in instructions
            for _ in range(max(config.k - have.get((pid, instr or None), 0), 0))]
    if not rows:
        console.print(f"all {len(prompts)} prompts already have {config.k} completions per instruction")
        return {"prompts": len(prompts), "completions": 0}
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    if config.adapter:
        model = load_adapter(model, config.adapter)
    added = 0
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"sampling {len(rows)} completions", total=len(rows))
        for start in range(0, len(rows), config.batch_size):
            batch = rows[start:start + config.batch_size]
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed + start)
            rollout = sample(model, tokenizer, [f"{instr} {text}" if instr else text for _, text, instr in batch],
                             max_new_tokens=config.max_new_tokens, temperature=config.temperature, generator=generator)
            with store.write() as s:
                before = s.scalar(select(func.count(Completion.id))) or 0
                for (pid, _, instr), completion in zip(batch, rollout.texts, strict=True):
                    if completion.strip():
                        store.add_completion(pid, completion.strip(), model=config.model, adapter=config.adapter,
                                             instruction=instr or None, session=s)
                added += (s.scalar(select(func.count(Completion.id))) or 0) - before
            bar.advance(task, len(batch))
    return {"prompts": len(prompts), "completions": added}


def auto_label(config: LabelAutoConfig, *, batch_size: int = 256) -> dict[str, int]:
    """Rank every prompt's completions by a reward, as an AI labeler; prompts it already ranked are left alone."""
    from hhh.rewards import build_reward

    store = Store(config.db)
    reward = build_reward(config.reward, device=config.device)
    labeler_id = store.ai_labeler(config.labeler or f"ai:{config.reward}")
    with store.read() as s:
        done = set(s.scalars(select(Ranking.prompt_id).where(Ranking.labeler_id == labeler_id)))
    todo = [it for it in store.items() if it["prompt_id"] not in done]
    ranked = pairs = 0
    while todo:
        chunk: list[dict] = []
        size = 0
        while todo and (size < batch_size or not chunk):
            chunk.append(todo.pop(0))
            size += len(chunk[-1]["completions"])
        prompts = [it["prompt"] for it in chunk for _ in it["completions"]]
        texts = [c["text"] for it in chunk for c in it["completions"]]
        scores = reward.score(prompts, texts).tolist()
        at = 0
        for it in chunk:
            ids = [c["id"] for c in it["completions"]]
            tiers = rank_by_score(ids, scores[at:at + len(ids)], config.tie_threshold)
            at += len(ids)
            store.submit(labeler_id, it["prompt_id"], tiers, submission_id=f"auto-{labeler_id}-{it['prompt_id']}")
            ranked += 1
            pairs += sum(len(a) * len(b) for i, a in enumerate(tiers) for b in tiers[i + 1:])
    return {"rankings": ranked, "ordered_pairs": pairs}
