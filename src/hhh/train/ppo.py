"""RLHF with PPO (Ziegler et al. 2019; implementation details of Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO"; Zheng et al. 2023, "Secrets of RLHF, PPO-max").

Each step:
  1. rollout: sample completions from the policy at the temperature
  2. score: reward function on (prompt, completion), minus a penalty when no EOS
  3. old log-probs and values (policy), reference log-probs (same base, adapter disabled)
  4. shaped reward: -beta * KL per token, score at the last token
  5. advantages: GAE over completion tokens, whitened
  6. PPO epochs over minibatches: clipped surrogate + clipped value loss - entropy bonus
  7. adapt beta, check the guards, log, keep the best checkpoint by a held-out metric
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hhh.config import PPOConfig
from hhh.evaluate import distinct_n, repetition_rate
from hhh.losses import (
    AdaptiveKL,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    shaped_rewards,
    token_mean,
    value_loss,
)
from hhh.models.policy import Forward, PolicyWithValue
from hhh.rollout import Rollout, sample
from hhh.runs import RunDir
from hhh.train.guards import Guards
from hhh.train.loop import (
    HELD_OUT,
    MINIBATCHES,
    Checkpoints,
    GracefulStop,
    clip_and_step,
    linear_decay,
    step_generator,
    step_prompts,
)


@dataclass
class PPOResult:
    policy: PolicyWithValue
    steps_done: int
    best_step: int | None
    stopped: str | None  # None, "interrupted" or "kl_budget"


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _old_forward(policy: PolicyWithValue, r: Rollout, config: PPOConfig) -> tuple[Forward, torch.Tensor]:
    """Policy log-probs, entropy and values, and reference log-probs, in micro-batches."""
    parts, refs = [], []
    for s in _chunks(len(r.prompts), config.micro_batch_size):
        args = (r.query_ids[s], r.query_mask[s], r.response_ids[s], r.response_mask[s])
        parts.append(policy.forward_response(*args, temperature=config.temperature, entropy=True, keep_trunk=True))
        refs.append(policy.reference_logprobs(*args, temperature=config.temperature, trunk=parts[-1].trunk))

    def cat(name: str):
        return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

    return Forward(cat("logprobs"), cat("entropy"), cat("values"), cat("trunk")), torch.cat(refs)


def ppo_update(policy, optimizer, scheduler, r: Rollout, old: Forward, adv, returns, config: PPOConfig,
               generator: torch.Generator) -> dict[str, float]:
    """PPO epochs over shuffled minibatches; gradient accumulation over micro-batches."""
    mask = r.response_mask.float()
    sums: dict[str, float] = {}
    n_updates = 0
    params = policy.trainable_parameters()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(r.prompts), generator=generator)
        for mb in _chunks(len(order), config.minibatch_size):
            idx_mb = order[mb]
            n_tokens = mask[idx_mb].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            stats = dict.fromkeys(("loss/policy", "loss/value", "loss/entropy", "policy/clipfrac",
                                   "policy/approxkl", "value/clipfrac"), 0.0)
            for micro in _chunks(len(idx_mb), config.micro_batch_size):
                i = idx_mb[micro]
                new = policy.forward_response(r.query_ids[i], r.query_mask[i], r.response_ids[i], r.response_mask[i],
                                              temperature=config.temperature, entropy=config.ent_coef > 0,
                                              trunk=None if old.trunk is None else old.trunk[i])
                m = mask[i]
                pg, clipfrac, approx_kl = ppo_policy_loss(new.logprobs, old.logprobs[i], adv[i], m,
                                                          config.cliprange, n_tokens)
                vl, vclip = value_loss(new.values, old.values[i], returns[i], m, config.cliprange_value, n_tokens)
                ent = token_mean(new.entropy, m, n_tokens) if new.entropy is not None else torch.zeros(())
                (pg + config.vf_coef * vl - config.ent_coef * ent).backward()
                for k, v in (("loss/policy", pg), ("loss/value", vl), ("loss/entropy", ent),
                             ("policy/clipfrac", clipfrac), ("policy/approxkl", approx_kl), ("value/clipfrac", vclip)):
                    stats[k] += float(v.detach())
            stats["grad_norm"] = clip_and_step(params, optimizer, scheduler, config.max_grad_norm)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    return {k: v / n_updates for k, v in sums.items()}


@torch.no_grad()
def held_out(policy, tokenizer, prompts, reward, second, config: PPOConfig) -> dict[str, float]:
    gen = step_generator(config.seed, 0, next(policy.parameters()).device, HELD_OUT)  # same noise every check
    r = sample(policy.lm, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
               temperature=config.temperature, generator=gen)
    return {"val/reward": float(reward.score(prompts, r.texts).mean()),
            "val/second": float(second.score(prompts, r.texts).mean())}


def train_ppo(config: PPOConfig, run: RunDir, *, base=None, tokenizer=None, resume: bool = False,
              console=None) -> PPOResult:
    """Train a LoRA policy with PPO; everything lands in `run`. See module docstring for the loop."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hhh.data import load_prompts
    from hhh.models import load_causal_lm, load_tokenizer
    from hhh.models.policy import build_policy
    from hhh.rewards import Shaped, build_reward

    prompts = load_prompts(config.prompts)
    if config.val_prompts >= len(prompts):
        raise ValueError(f"val_prompts={config.val_prompts} leaves no training prompts (set has {len(prompts)})")
    val, train = prompts[len(prompts) - config.val_prompts:], prompts[: len(prompts) - config.val_prompts]
    base_reward = build_reward(config.reward, device=config.device)
    second = build_reward(config.second_scorer, device=config.device)
    clip = (-config.reward_clip, config.reward_clip) if config.reward_clip else None
    shaping = Shaped(base_reward, clip=clip, normalize=None if config.reward_normalize == "none" else config.reward_normalize)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    base = base if base is not None else load_causal_lm(config.model, device=config.device, dtype=config.dtype)
    policy = build_policy(base, config.lora(), seed=config.seed, init_adapter=config.init_adapter,
                          critic=config.critic)
    device = next(policy.parameters()).device

    updates_per_step = config.ppo_epochs * math.ceil(config.batch_size / config.minibatch_size)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, eps=1e-5, weight_decay=0.0)
    scheduler = linear_decay(optimizer, config.steps * updates_per_step)
    kl_ctl = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
    guards = Guards(config.kl_budget, config.kl_budget_action, config.entropy_floor, config.length_drift)
    ckpt = Checkpoints(run.path)
    state: dict = {"step": 0, "best_step": None, "best_val": None}
    if resume:
        state = ckpt.load(policy, optimizer, scheduler)
        kl_ctl.load_state_dict(state.pop("kl_ctl"))
        guards.load_state_dict(state.pop("guards"))
        shaping.load_state_dict(state.pop("shaping"))

    def save_checkpoint(next_step: int) -> None:
        ckpt.save(policy, optimizer, scheduler, {**state, "step": next_step, "kl_ctl": kl_ctl.state_dict(),
                                                 "guards": guards.state_dict(), "shaping": shaping.state_dict()})

    stopped = None
    step = state["step"]
    columns = (TextColumn("PPO"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with GracefulStop(console) as stop, Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=config.steps, completed=step)
        while step < config.steps:
            t0 = time.time()
            gen = step_generator(config.seed, step, device)
            batch = step_prompts(train, config.batch_size, step, config.seed)
            # 1. rollout
            policy.lm.eval()
            r = sample(policy.lm, tokenizer, batch, max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, generator=gen)
            t_rollout = time.time() - t0
            # 2. score
            raw = base_reward.score(batch, r.texts).to(device)
            score = shaping.transform(raw) - config.no_eos_penalty * (~r.ended).float()
            # 3. old log-probs, values, reference log-probs
            old, ref_logp = _old_forward(policy, r, config)
            mask = r.response_mask.float()
            # 4. shaped per-token reward
            kl_tok = kl_per_token(old.logprobs, ref_logp, config.kl_estimator) * mask
            rewards = shaped_rewards(score, kl_tok, mask, kl_ctl.beta)
            # 5. advantages
            adv, returns = gae(rewards, old.values, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                # Whitening shifts advantages to mean 0: without it a positive reward bias pushes every token up.
                adv = masked_whiten(adv, mask)
            # 6. PPO epochs
            update = ppo_update(policy, optimizer, scheduler, r, old, adv, returns, config,
                                step_generator(config.seed, step, "cpu", MINIBATCHES))
            # 7. bookkeeping
            k1 = ((old.logprobs - ref_logp) * mask).sum(-1)
            k3 = (kl_per_token(old.logprobs, ref_logp, "k3") * mask).sum(-1)
            m = {
                "step": step + 1,
                "reward/score": float(raw.mean()),
                "reward/mean": float(score.mean()),
                "reward/std": float(score.std()) if score.numel() > 1 else 0.0,
                "reward/total": float(rewards.sum(-1).mean()),
                "kl/k1": float(k1.mean()),
                "kl/k3": float(k3.mean()),
                "kl/k1_per_token": float(k1.sum() / mask.sum()),
                "kl/beta": kl_ctl.beta,
                "policy/entropy": float(masked_mean(old.entropy, mask)),
                "value/mean": float(masked_mean(old.values, mask)),
                **update,
                "lr": scheduler.get_last_lr()[0],
                "length/mean": float(r.lengths.float().mean()),
                "eos_rate": float(r.ended.float().mean()),
                "samples/distinct_2": distinct_n(r.texts, 2),
                "samples/repetition_3": repetition_rate(r.texts, 3),
                "second/score": float(second.score(batch, r.texts).mean()),
            }
            kl_ctl.update(m["kl/k1"], len(batch))
            alarms, action = guards.check(step + 1, m)
            if action == "raise_beta":
                kl_ctl.beta *= 1.5
            if (step + 1) % config.val_every == 0 or step + 1 == config.steps:
                if val:
                    m.update(held_out(policy, tokenizer, val, base_reward, second, config))
                    if state["best_val"] is None or m["val/reward"] > state["best_val"]:
                        state["best_val"], state["best_step"] = m["val/reward"], step + 1
                        policy.save(run.path / "best")
            m["alarms"] = alarms
            m["time/rollout_s"] = t_rollout
            m["time/step_s"] = time.time() - t0
            run.log(m)
            step += 1
            bar.update(task, completed=step, description=f"reward {m['reward/score']:.3f}  KL {m['kl/k1']:.2f}  "
                       f"beta {kl_ctl.beta:.3f}  {m['time/step_s']:.0f}s/step" + (f"  [red]{','.join(alarms)}" if alarms else ""))
            if action == "stop":
                stopped = "kl_budget"
            if stop.requested:
                stopped = "interrupted"
            if stopped or step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(step)
            if stopped:
                break
    policy.save(run.path / "adapter")
    return PPOResult(policy, step, state["best_step"], stopped)
