"""Critic-free online RL: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024; REINFORCE++ as an option).

Each step:
  1. rollout: G samples for each of the step's prompts from the policy
  2. score: reward function on (prompt, completion)
  3. reference log-probs (same base, adapter disabled); the old policy's log-probs are the sampler's own in fp32,
     recorded in step 1 (recomputed through the training forward in bf16/fp16); the reference pass keeps the
     frozen trunk for the update
  4. advantages:
       GRPO   per completion, (r - mean_group) / std_group, KL kept out of the reward (it is in the loss)
       RLOO   per completion, r - beta * KL  minus the mean of the other G-1 samples of the prompt
       REINFORCE++  per token, r - beta * (KL still to come from that token), whitened over the batch's tokens
  5. update: GRPO clipped surrogate + beta * k3 KL, `epochs` passes; RLOO sequence-level REINFORCE with a clipped
     importance ratio, one pass (minibatches after the first are off-policy); REINFORCE++ the PPO clipped surrogate
  6. guards, log, held-out check and best checkpoint, checkpoint (resume as PPO)
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from hhh import losses as L
from hhh.config import GRPOConfig, OnlineRLSettings, RLOOConfig
from hhh.evaluate import distinct_n, repetition_rate
from hhh.rollout import Rollout, sample
from hhh.runs import RunDir
from hhh.train.guards import Guards
from hhh.train.loop import (
    MINIBATCHES,
    Checkpoints,
    GracefulStop,
    clip_and_step,
    linear_decay,
    step_generator,
    step_prompts,
)
from hhh.train.ppo import _chunks, held_out


@torch.no_grad()
def old_and_reference_logprobs(policy, r: Rollout, config: OnlineRLSettings) -> tuple[Tensor, Tensor, Tensor | None]:
    """3. old-policy log-probs (B, R), reference log-probs (B, R) and the frozen trunk's output, in micro-batches.

    The trunk (layers below the first adapted one) is the same for reference and policy, so the update passes
    reuse it and run only the adapted top layers. In fp32 the sampler's log-probs (KV cache) equal a fresh forward
    to ~1e-6 and serve as the old policy's; in bf16/fp16 they differ by up to ~5e-2, which would clip the first
    ratio, so the old log-probs are then recomputed through the training forward (top layers only)."""
    recompute = policy.lm.get_base_model().dtype != torch.float32
    olds, refs, trunks = [], [], []
    for s in _chunks(len(r.prompts), config.micro_batch_size):
        args = (r.query_ids[s], r.query_mask[s], r.response_ids[s], r.response_mask[s])
        with policy.reference():
            f = policy.forward_response(*args, temperature=config.temperature, values=False, keep_trunk=True)
        refs.append(f.logprobs)
        trunks.append(f.trunk)
        olds.append(policy.forward_response(*args, temperature=config.temperature, values=False, trunk=f.trunk).logprobs
                    if recompute else r.logprobs[s])
    return torch.cat(olds), torch.cat(refs), (None if trunks[0] is None else torch.cat(trunks))


def advantages(config: OnlineRLSettings, score: Tensor, kl: Tensor, mask: Tensor) -> Tensor:
    """4. GRPO and RLOO: one advantage per completion (B,), rows in groups of G; REINFORCE++: one per token (B, R).
    `kl` (B, R): per-token k1 KL of the old policy against the reference."""
    if isinstance(config, GRPOConfig):
        return L.grpo_advantages(score, config.group_size, scale=config.scale_rewards)
    if config.advantage == "reinforce++":
        return L.reinforce_pp_advantages(score, kl, mask, config.kl_coef)
    adv = L.rloo_advantages(score - config.kl_coef * (kl * mask).sum(-1), config.group_size)
    return L.global_whiten(adv) if config.normalize_advantages else adv


def update(policy, optimizer, scheduler, r: Rollout, old_logp, ref_logp, trunk, adv, config: OnlineRLSettings,
           generator: torch.Generator) -> dict[str, float]:
    """5. GRPO: clipped surrogate + beta*k3 over `epochs` passes. RLOO: REINFORCE with a clipped ratio (each optimizer
    step after the first on a batch is off-policy). REINFORCE++: the PPO clipped surrogate on its token advantages.
    Micro-batches accumulate gradients weighted by their share of the minibatch. The policy's entropy is measured on
    the way (mean over the passes, at the temperature)."""
    mask = r.response_mask.float()
    params = policy.trainable_parameters()
    grpo = isinstance(config, GRPOConfig)
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(config.epochs if grpo else 1):
        order = torch.randperm(len(r.prompts), generator=generator)
        for mb in _chunks(len(order), config.minibatch_size):
            idx = order[mb]
            optimizer.zero_grad(set_to_none=True)
            stats = {"loss/policy": 0.0, "policy/clipfrac": 0.0, "policy/entropy": 0.0}
            for micro in _chunks(len(idx), config.micro_batch_size):
                i = idx[micro]
                new = policy.forward_response(r.query_ids[i], r.query_mask[i], r.response_ids[i], r.response_mask[i],
                                              temperature=config.temperature, values=False, entropy=True,
                                              entropy_grad=False,
                                              trunk=None if trunk is None else trunk[i])
                seq_share = len(i) / len(idx)
                if grpo:
                    loss, clipfrac, _ = L.grpo_loss(new.logprobs, old_logp[i], ref_logp[i], adv[i], mask[i],
                                                    clip=config.cliprange, beta=config.beta,
                                                    aggregation=config.aggregation)
                    # "token": the minibatch's token mean, not a mean of micro-batch means
                    share = float(mask[i].sum() / mask[idx].sum()) if config.aggregation == "token" else seq_share
                    loss, clipfrac = loss * share, clipfrac * share
                elif config.advantage == "reinforce++":
                    loss, clipfrac, _ = L.ppo_policy_loss(new.logprobs, old_logp[i], adv[i], mask[i], config.cliprange,
                                                          n_tokens=mask[idx].sum())
                else:
                    loss, clipfrac = L.rloo_loss(new.logprobs, old_logp[i], adv[i], mask[i], clip=config.cliprange,
                                                 n_seqs=len(idx))
                    clipfrac = clipfrac * seq_share
                loss.backward()
                stats["loss/policy"] += float(loss.detach())
                stats["policy/clipfrac"] += float(clipfrac)
                stats["policy/entropy"] += float(L.masked_mean(new.entropy, mask[i])) * seq_share
            stats["grad_norm"] = clip_and_step(params, optimizer, scheduler, config.max_grad_norm)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


def train_online(config: GRPOConfig | RLOOConfig, run: RunDir, *, base, tokenizer, resume: bool = False, console=None):
    """Train a LoRA policy with GRPO or RLOO; returns (policy, steps done, best step, stopped)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hhh.data import load_prompts
    from hhh.models.policy import build_policy
    from hhh.rewards import build_reward

    name = "GRPO" if isinstance(config, GRPOConfig) else config.advantage.upper()
    prompts = load_prompts(config.prompts)
    if config.val_prompts >= len(prompts):
        raise ValueError(f"val_prompts={config.val_prompts} leaves no training prompts (set has {len(prompts)})")
    val, train = prompts[len(prompts) - config.val_prompts:], prompts[: len(prompts) - config.val_prompts]
    reward = build_reward(config.reward, device=config.device)
    second = build_reward(config.second_scorer, device=config.device)
    policy = build_policy(base, config.lora(), seed=config.seed)
    device = next(policy.parameters()).device
    batch_size = config.prompts_per_step * config.group_size
    updates = (config.epochs if isinstance(config, GRPOConfig) else 1) * math.ceil(batch_size / config.minibatch_size)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, eps=1e-5, weight_decay=0.0)
    scheduler = linear_decay(optimizer, config.steps * updates)
    guards = Guards(config.kl_budget, config.kl_budget_action, config.entropy_floor, config.length_drift)
    ckpt = Checkpoints(run.path)
    coef = "beta" if isinstance(config, GRPOConfig) else "kl_coef"
    state: dict = {"step": 0, "best_step": None, "best_val": None, "kl_coef": getattr(config, coef)}
    if resume:
        state = ckpt.load(policy, optimizer, scheduler)
        guards.load_state_dict(state.pop("guards"))
    config = config.model_copy(update={coef: state["kl_coef"]})  # raised by the KL budget guard
    step, stopped = state["step"], None
    columns = (TextColumn(name), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with GracefulStop(console) as stop, Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=config.steps, completed=step)
        while step < config.steps:
            t0 = time.time()
            # 1. rollout: G samples per prompt, rows grouped by prompt
            batch = [p for p in step_prompts(train, config.prompts_per_step, step, config.seed)
                     for _ in range(config.group_size)]
            policy.lm.eval()
            r = sample(policy.lm, tokenizer, batch, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, generator=step_generator(config.seed, step, device))
            # 2. score
            score = reward.score(batch, r.texts).float().to(device)
            # 3. old-policy and reference log-probs
            old_logp, ref_logp, trunk = old_and_reference_logprobs(policy, r, config)
            mask = r.response_mask.float()
            kl_tok = L.kl_per_token(old_logp, ref_logp, "k1") * mask
            kl_seq = kl_tok.sum(-1)
            # 4. advantages
            adv = advantages(config, score, kl_tok, mask)
            # 5. update
            stats = update(policy, optimizer, scheduler, r, old_logp, ref_logp, trunk, adv, config,
                           step_generator(config.seed, step, "cpu", MINIBATCHES))
            # 6. bookkeeping
            m = {"step": step + 1, "reward/score": float(score.mean()), "reward/std": float(score.std()),
                 "advantage/abs_mean": float(adv.abs().mean() if adv.dim() == 1 else L.masked_mean(adv.abs(), mask)), "kl/k1": float(kl_seq.mean()),
                 "kl/k3": float((L.kl_per_token(old_logp, ref_logp, "k3") * mask).sum(-1).mean()),
                 f"kl/{coef}": getattr(config, coef),
                 **stats, "lr": scheduler.get_last_lr()[0], "length/mean": float(r.lengths.float().mean()),
                 "eos_rate": float(r.ended.float().mean()), "samples/distinct_2": distinct_n(r.texts, 2),
                 "samples/repetition_3": repetition_rate(r.texts, 3),
                 "second/score": float(second.score(batch, r.texts).mean())}
            alarms, action = guards.check(step + 1, m)
            if action == "raise_beta":
                config = config.model_copy(update={coef: getattr(config, coef) * 1.5})
            if val and ((step + 1) % config.val_every == 0 or step + 1 == config.steps):
                m.update(held_out(policy, tokenizer, val, reward, second, config))
                if state["best_val"] is None or m["val/reward"] > state["best_val"]:
                    state["best_val"], state["best_step"] = m["val/reward"], step + 1
                    policy.save(run.path / "best")
            m.update(alarms=alarms, **{"time/step_s": time.time() - t0})
            run.log(m)
            step += 1
            bar.update(task, completed=step, description=f"reward {m['reward/score']:.3f}  KL {m['kl/k1']:.2f}  "
                       f"{m['time/step_s']:.0f}s/step" + (f"  [red]{','.join(alarms)}" if alarms else ""))
            stopped = "kl_budget" if action == "stop" else ("interrupted" if stop.requested else None)
            if stopped or step % config.checkpoint_every == 0 or step == config.steps:
                ckpt.save(policy, optimizer, scheduler, {**state, "step": step, "kl_coef": getattr(config, coef),
                                                         "guards": guards.state_dict()})
            if stopped:
                break
    policy.save(run.path / "adapter")
    return policy, step, state["best_step"], stopped
