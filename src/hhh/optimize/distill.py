"""Smaller students of an aligned teacher: structured layer removal, and distillation into the layer-dropped copy.

    # 1. which layers matter: drop each decoder layer alone and measure KL(teacher || teacher without it) on the
    #    reference answers; the layers whose removal changes the output distribution least go first
    # 2. student: a copy of the teacher without those layers (same tokenizer, embeddings and head)
    # 3. distill (optional, `steps` > 0): the student learns the teacher's temperature-softened next-token
    #    distributions plus the answer tokens' cross-entropy (hhh.losses.distill_loss), on prompts and the teacher's
    #    own answers; with `on_policy`, on the student's answers instead, scored by the teacher (GKD)

>>> student = layer_dropped(teacher, keep=[0, 2, 4, 5])              # doctest: +SKIP
>>> distill(teacher, student, tokenizer, batches, steps=200)          # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hhh.rollout import Tokens


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def layer_dropped(model, keep: Sequence[int]):
    """A deep copy of `model` with only the decoder layers `keep` (in order); the config and each attention layer's
    cache index follow, so the copy generates and saves like any model of its family."""
    keep = sorted(set(keep))
    n = len(decoder_layers(model))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layers to keep must be within 0..{n - 1}, got {list(keep)}")
    student = copy.deepcopy(model)
    layers = decoder_layers(student)
    student.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def rebatch(batches: Sequence[Tokens], size: int, *, limit: int | None = None, pad_id: int = 0) -> list[Tokens]:
    """The rows of `batches`, in order (the first `limit` of them), regrouped `size` at a time and each group padded
    only to its own longest prompt and answer. Answers sample fastest in wide batches; training steps want narrow
    ones. Padding is masked everywhere it is read, so `pad_id` only fills it."""
    from hhh.rollout import tokens_from_ids

    queries, answers = [], []
    for t in batches:
        for q, qm, r, rm in zip(t.query_ids, t.query_mask, t.response_ids, t.response_mask, strict=True):
            queries.append(q[qm.bool()].tolist())
            answers.append(r[rm.bool()].tolist())
    if limit is not None:
        queries, answers = queries[:limit], answers[:limit]
    return [tokens_from_ids(queries[i:i + size], answers[i:i + size], pad_id, batches[0].query_ids.device)
            for i in range(0, len(queries), size)]


@torch.no_grad()
def layer_importance(model, batches: Sequence[Tokens]) -> list[float]:
    """Per decoder layer: mean KL(model || model without that layer) per answer token over `batches`. One batch's
    reference log-probs are held at a time: (B, R, V) floats, not the whole set's."""
    from hhh.rollout import response_logits

    layers = decoder_layers(model)
    totals, count = [0.0] * len(layers), 0.0
    try:
        for t in batches:
            model.model.layers = layers
            args = (t.query_ids, t.query_mask, t.response_ids, t.response_mask)
            ref = response_logits(model, *args).log_softmax(-1)                          # (B, R, V)
            mask = t.response_mask.float()
            count += float(mask.sum())
            for skip in range(len(layers)):
                model.model.layers = nn.ModuleList([m for i, m in enumerate(layers) if i != skip])
                lp = response_logits(model, *args).log_softmax(-1)
                totals[skip] += float(((ref.exp() * (ref - lp)).sum(-1) * mask).sum())
    finally:
        model.model.layers = layers
    return [x / count for x in totals]


def keep_by_importance(importance: Sequence[float], n_keep: int) -> list[int]:
    """The `n_keep` layers whose removal costs the most, in model order."""
    if not 0 < n_keep <= len(importance):
        raise ValueError(f"layers to keep must be in 1..{len(importance)}, got {n_keep}")
    order = sorted(range(len(importance)), key=lambda i: importance[i], reverse=True)
    return sorted(order[:n_keep])


def distill(teacher, student, tokenizer, batches: Sequence[Tokens], *, steps: int, lr: float = 1e-4,
            temperature: float = 2.0, alpha: float = 0.5, on_policy: bool = False, max_new_tokens: int = 48,
            seed: int = 0, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train every parameter of `student` for `steps` steps, cycling over `batches` (prompt + teacher answer tokens).
    Returns the loss per step."""
    from hhh.losses import distill_loss
    from hhh.rollout import response_logits, sample

    teacher.eval()
    student.train()
    for module in student.modules():  # dropout off: the teacher's distribution is the target, not a noisy copy
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        t = batches[step % len(batches)]
        if on_policy:  # the student's own answers to the same prompts (GKD): it learns where it actually goes
            student.eval()
            prompts = [tokenizer.decode(q[m.bool()]) for q, m in zip(t.query_ids, t.query_mask, strict=True)]
            roll = sample(student, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                          generator=generator, chat=False)
            t = Tokens(roll.query_ids, roll.query_mask, roll.response_ids, roll.response_mask)
            student.train()
        with torch.no_grad():
            target = response_logits(teacher, t.query_ids, t.query_mask, t.response_ids, t.response_mask)
        logits = response_logits(student, t.query_ids, t.query_mask, t.response_ids, t.response_mask)
        loss = distill_loss(logits, target, t.response_ids, t.response_mask.float(), temperature=temperature,
                            alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
    student.eval()
    return losses


def recover(teacher, student, tokenizer, batches: Sequence[Tokens], *, steps: int, lr: float = 5e-4,
            temperature: float = 2.0, alpha: float = 0.5, lora=None, seed: int = 0,
            progress: Callable[[int, float], None] | None = None):
    """A short LoRA fine-tune of a pruned or layer-dropped `student` towards the `teacher`'s outputs on `batches`
    (the distillation loss), merged back into its weights. Merging `W + (alpha/r) B A` would fill a pruned matrix
    again; every weight that was exactly zero is set back to zero, so the sparsity is what pruning made it.
    Returns (the plain merged model, the loss per step)."""
    from hhh.models.load import LoraSettings, attach_lora
    from hhh.optimize.prune import prunable

    zeros = {name: layer.weight == 0 for name, layer in prunable(student)}
    adapted = attach_lora(student, lora or LoraSettings(r=8, alpha=16), seed=seed)
    losses = distill(teacher, adapted, tokenizer, batches, steps=steps, lr=lr, temperature=temperature,
                     alpha=alpha, seed=seed, progress=progress)
    merged = adapted.merge_and_unload()
    with torch.no_grad():
        for name, layer in prunable(merged):
            layer.weight[zeros[name]] = 0.0
    return merged.eval(), losses
