"""What the critic-free methods share (GRPO in hhh.train.grpo, RLOO and REINFORCE++ in hhh.train.rloo): G samples
per prompt, scored, compared with the reference, and a policy-gradient update whose advantage and loss are the
method's own.

Each step:
  1. rollout: G samples for each of the step's prompts from the policy (rows grouped by prompt)
  2. score: reward function on (prompt, completion)
  3. reference log-probs (same base, adapter disabled); the old policy's log-probs are the sampler's own in fp32,
     recorded in step 1 (recomputed through the training forward in bf16/fp16, and after a bf16 sampler; then the
     first minibatch's rows take theirs from their own forward in step 5 where the advantages need no KL: GRPO)
  4. advantages: the method's `advantages(score, kl, mask, beta)`
  5. update: `epochs` passes over shuffled minibatches, the method's `loss` per micro-batch
  6. the shared tail (hhh.train.loop.OnlineRun): guards, held-out check and best checkpoint, log, checkpoint

Steps 3 and 5 take each group in one row by default (share_prompt, hhh.rollout.GroupTokens): the prompt once, its G
completions attending to it through a 4D mask; minibatches and micro-batches are then whole groups, and the method's
loss still reads (rows, R) tensors (`unpack`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hhh import distributed as D
from hhh import losses as L
from hhh import metrics as M
from hhh.config import GroupSettings
from hhh.engines import rollout_engine
from hhh.models.policy import Policy
from hhh.rollout import GroupTokens, Rollout, Tokens, group_tokens
from hhh.runs import RunDir
from hhh.train.loop import (
    MINIBATCHES,
    OnlineRun,
    Trained,
    chunks,
    first_minibatch,
    linear_decay,
    minibatch_updates,
    sample_stats,
    split_prompts,
    step_generator,
    step_prompts,
)


@dataclass(frozen=True)
class Batch:
    """One step's samples and what the update needs of them."""

    tokens: Tokens | GroupTokens  # the rows, or the groups in one row each (share_prompt)
    mask: Tensor        # (B, R) float, 1 on completion tokens
    old_logp: Tensor    # (B, R) the policy that sampled
    ref_logp: Tensor    # (B, R) the reference
    advantages: Tensor  # (B,) one per completion, or (B, R) one per token
    beta: float         # the KL coefficient of this step


# loss(new log-probs (b, R), the micro-batch's rows, the minibatch's rows, batch) -> (loss share, clip fraction share)
Loss = Callable[[Tensor, Tensor, Tensor, Batch], tuple[Tensor, Tensor]]
# advantages(scores (B,), per-token KL (B, R) or None where the method said it reads none, mask, beta)
Advantages = Callable[[Tensor, Tensor | None, Tensor, float], Tensor]


def recomputes_old_logprobs(policy: Policy, r: Rollout) -> bool:
    """In fp32 the sampler's log-probs (KV cache, adapter merged) equal a fresh forward to ~1e-5 and serve as the old
    policy's (one policy pass fewer per step); in bf16/fp16 (the weights', or a bf16 sampler's over fp32 weights)
    they differ by up to ~5e-2, which would clip the first ratio, so the old log-probs are then recomputed through
    the training forward (inside `frozen_trunk`: the adapted top layers only), unless they already came from it
    (another engine sampled: hhh.engines.VLLMRollouts)."""
    weights = policy.lm.get_base_model().dtype
    return not r.trainer_logprobs and (weights != torch.float32 or r.sampler_dtype != weights)


def prompt_sharing(config: GroupSettings, policy: Policy, console=None) -> bool:
    """Whether this run's training passes take a group per row (GroupTokens): share_prompt, unless the model's
    attention cannot read a 4D mask (flash-attention kernels read padding only) or a process's minibatch is not
    whole groups; then one row per completion, and a line saying why."""
    if not config.share_prompt:
        return False
    why = None
    if not policy.takes_4d_masks:
        why = f"{policy.lm.config._attn_implementation} attention takes no 4D mask (share_prompt needs sdpa or eager)"
    elif rank_minibatch(config) % config.group_size:
        why = f"a minibatch of {rank_minibatch(config)} completions per process is not whole groups of {config.group_size}"
    if why is None:
        return True
    line = f"{why}: one row per completion"
    print(line) if console is None else console.print(line)
    return False


def units(tokens: Tokens | GroupTokens, rows: int) -> int:
    """How many of `tokens`' model rows hold `rows` completions (at least one): rows, or whole groups."""
    return max(1, rows // tokens.completions_per_row)


@torch.no_grad()
def old_and_reference_logprobs(policy: Policy, r: Rollout, tokens: Tokens | GroupTokens, micro_batch_size: int,
                               temperature: float, *, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """3. (old-policy log-probs, reference log-probs), each (B, R), in micro-batches of `tokens` (r.tokens, or its
    groups). The old ones are the sampler's or recomputed (`recomputes_old_logprobs`); a recompute leaves out the
    model rows of `tokens` in `skip` (NaN here): the update's first minibatch, whose own training forward gives
    them (`update`)."""
    size = units(tokens, micro_batch_size)
    ref = torch.cat([tokens.unpack(policy.reference_logprobs(tokens[s], temperature=temperature))
                     for s in chunks(len(tokens), size)])
    if not recomputes_old_logprobs(policy, r):
        return r.logprobs, ref
    old = torch.full_like(ref, math.nan)
    todo = torch.arange(len(tokens))
    if skip is not None:
        todo = todo[~torch.isin(todo, skip.cpu())]
    for s in chunks(len(todo), size):
        old[tokens.row_indices(todo[s]).to(old.device)] = tokens.unpack(
            policy(tokens[todo[s]], temperature=temperature).logprobs)
    return old, ref


def rank_minibatch(config: GroupSettings) -> int:
    """Rows of one minibatch on this process (the global minibatch split over the processes)."""
    return config.minibatch_size // D.world().size


def update(policy: Policy, optimizer, scheduler, batch: Batch, loss: Loss, config: GroupSettings, *, epochs: int,
           generator: torch.Generator, old_from_first: Tensor | None = None) -> dict[str, float]:
    """5. `epochs` passes of minibatch steps with the method's loss. The policy's entropy is measured on the way
    (mean over the passes, at the temperature).

    Minibatches and micro-batches are of `batch.tokens`' model rows: completions, or whole groups (share_prompt);
    the method's loss reads the completions' rows either way.

    `old_from_first`: the model rows of the first minibatch (`first_minibatch` with this generator) whose old
    log-probs step 3 left out. No optimizer step has happened when their training forward runs, so its detached
    log-probs are the old policy's: they are written into `batch.old_logp` before the loss reads them (the ratio
    is then 1 exactly, as when TRL's GRPO takes a batch in one optimizer step)."""
    mask, tokens = batch.mask, batch.tokens
    pending = torch.zeros(len(mask), dtype=torch.bool)
    first = None if old_from_first is None else old_from_first.cpu().sort().values
    if first is not None:
        pending[tokens.row_indices(first)] = True

    def micro_loss(u: Tensor, minibatch_units: Tensor) -> tuple[Tensor, dict[str, float]]:
        new = policy(tokens[u], temperature=config.temperature, entropy="measure")
        logp, entropy = tokens.unpack(new.logprobs), tokens.unpack(new.entropy)
        i, minibatch = tokens.row_indices(u), tokens.row_indices(minibatch_units)
        todo = pending[i]
        if todo.any():
            if first is None or not torch.equal(minibatch_units.cpu().sort().values, first):
                raise RuntimeError("old log-probs missing outside the first minibatch (its rows were mispredicted)")
            batch.old_logp[i[todo].to(logp.device)] = logp.detach()[todo.to(logp.device)]
            pending[i[todo]] = False
        i, minibatch = i.to(mask.device), minibatch.to(mask.device)
        value, clipfrac = loss(logp, i, minibatch, batch)
        share = len(i) / len(minibatch)
        return value, {M.LOSS_POLICY: float(value.detach()), M.CLIPFRAC: float(clipfrac),
                       M.ENTROPY: float(L.masked_mean(entropy, mask[i])) * share}

    return minibatch_updates(policy.trainable_parameters(), optimizer, scheduler, len(tokens), epochs=epochs,
                             minibatch_size=units(tokens, rank_minibatch(config)),
                             micro_batch_size=units(tokens, config.micro_batch_size),
                             max_grad_norm=config.max_grad_norm, generator=generator, micro_loss=micro_loss)


def train_groups(name: str, config: GroupSettings, run: RunDir, *, beta: float, epochs: int,
                 advantages: Advantages, loss: Loss, base, tokenizer, console=None, resume: bool = False,
                 kl_in_advantages: bool = True) -> Trained:
    """Train a LoRA policy on `base` with a critic-free method given by its `advantages` and `loss`.
    `kl_in_advantages=False` (GRPO: the KL is a loss term) says the advantages do not read the per-token KL (they
    get None): the first minibatch's old log-probs can then wait for its own forward (`update`).

    On several processes (hhh.distributed) each rank samples, scores and updates on its share of the step's prompts
    (whole groups) with its own sampling seed; gradients are averaged before each optimizer step."""
    from hhh.data import load_prompts
    from hhh.models.policy import build_policy
    from hhh.rewards import build_reward

    train_prompts, val = split_prompts(load_prompts(config.prompts), config.val_prompts)
    reward = build_reward(config.reward, device=config.device)
    second = build_reward(config.second_scorer, device=config.device)
    policy = build_policy(base, config.lora(), seed=config.seed)
    device = next(policy.parameters()).device
    rollouts = rollout_engine(config, policy, tokenizer)
    batch_size = config.prompts_per_step * config.group_size
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, eps=1e-5, weight_decay=0.0)
    scheduler = linear_decay(optimizer, config.steps * epochs * math.ceil(batch_size / config.minibatch_size))
    kl = L.AdaptiveKL(beta)  # fixed, but for the KL budget guard
    share = prompt_sharing(config, policy, console)
    loop = OnlineRun(name, config, run, policy=policy, parts=[policy], optimizer=optimizer, scheduler=scheduler,
                     kl=kl, reward=reward, second=second, tokenizer=tokenizer, val=val, console=console,
                     resume=resume)
    with loop:
        for step in loop.steps():
            t0 = time.time()
            # 1. rollout: G samples per prompt, rows grouped by prompt
            prompts = [p for p in D.shard(step_prompts(train_prompts, config.prompts_per_step, step, config.seed))
                       for _ in range(config.group_size)]
            r = rollouts(prompts, step, step_generator(config.seed, step, device, rank=D.world().rank))
            tokens = group_tokens(r.tokens, config.group_size) if share else r.tokens
            mask = r.response_mask.float()
            # 2. score
            score = reward.score(prompts, r.texts).float().to(device)
            shuffle = step_generator(config.seed, step, "cpu", MINIBATCHES)
            first = None if kl_in_advantages or not recomputes_old_logprobs(policy, r) else \
                first_minibatch(len(tokens), units(tokens, rank_minibatch(config)), shuffle)
            known = None if r.trunk is None else tokens.from_rows(r.trunk)  # the sampler's, when it computed one
            with policy.frozen_trunk(tokens, micro_batch_size=units(tokens, config.micro_batch_size), known=known):
                # 3. old-policy and reference log-probs (the first minibatch's old ones may come in step 5)
                old_logp, ref_logp = old_and_reference_logprobs(policy, r, tokens, config.micro_batch_size,
                                                                config.temperature, skip=first)
                # 4. advantages
                kl_before = L.kl_per_token(old_logp, ref_logp, "k1") * mask if kl_in_advantages else None
                adv = advantages(score, kl_before, mask, kl.beta)
                # 5. update
                batch = Batch(tokens, mask, old_logp, ref_logp, adv, kl.beta)
                stats = update(policy, optimizer, scheduler, batch, loss, config, epochs=epochs, generator=shuffle,
                               old_from_first=first)
            # 6. log (and the shared tail): every row's old log-probs are in by now
            kl_tok = L.kl_per_token(old_logp, ref_logp, "k1") * mask  # (B, R)
            k3 = (L.kl_per_token(old_logp, ref_logp, "k3") * mask).sum(-1)
            abs_adv = adv.abs().mean() if adv.dim() == 1 else L.masked_mean(adv.abs(), mask)
            every = D.gather(score)  # the whole step's scores (one process: these)
            loop.finish({"step": step + 1, M.REWARD_MEAN: float(every.mean()), M.REWARD_STD: float(every.std()),
                         M.ADVANTAGE_ABS: float(abs_adv), M.KL: float(kl_tok.sum(-1).mean()), M.KL_K3: float(k3.mean()),
                         **stats, M.LR: scheduler.get_last_lr()[0], **sample_stats(prompts, r, second)},
                        samples=len(prompts), t0=t0)
    return loop.result()
