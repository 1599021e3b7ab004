"""RLHF with PPO (Ziegler et al. 2019; implementation details of Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO"; Zheng et al. 2023, "Secrets of RLHF, PPO-max").

Each step:
  1. rollout: sample completions from the policy at the temperature
  2. score: reward function on (prompt, completion), normalised, minus a penalty when no EOS
  3. old log-probs and values (policy, critic), reference log-probs (same base, adapter disabled)
  4. shaped reward: -beta * KL per token, score at the last token
  5. advantages: GAE over completion tokens, whitened
  6. PPO epochs over minibatches: clipped surrogate + clipped value loss - entropy bonus
  7. adapt beta, check the guards, keep the best checkpoint by a held-out metric, log (hhh.train.loop.OnlineRun)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hhh import distributed as D
from hhh import metrics as M
from hhh.config import PPOConfig
from hhh.engines import rollout_engine
from hhh.losses import (
    AdaptiveKL,
    gae,
    kl_per_token,
    masked_mean,
    ppo_policy_loss,
    shaped_rewards,
    token_mean,
    value_loss,
)
from hhh.models.critic import Critic
from hhh.models.policy import Policy, Tokens
from hhh.rollout import Rollout
from hhh.runs import RunDir
from hhh.train.loop import (
    MINIBATCHES,
    OnlineRun,
    Trained,
    chunks,
    linear_decay,
    minibatch_updates,
    sample_stats,
    split_prompts,
    step_generator,
    step_prompts,
)


@dataclass(frozen=True)
class Old:
    """Step 3's passes over a rollout, without gradient: what the update compares against."""

    logprobs: Tensor      # (B, R) old policy
    entropy: Tensor       # (B, R)
    values: Tensor        # (B, R) V(s_t)
    ref_logprobs: Tensor  # (B, R) reference


@torch.no_grad()
def old_passes(policy: Policy, critic: Critic, tokens: Tokens, config: PPOConfig) -> Old:
    """3. Policy log-probs, entropy and values, and reference log-probs, in micro-batches."""
    parts = []
    for s in chunks(len(tokens), config.micro_batch_size):
        f = policy(tokens[s], temperature=config.temperature, entropy="measure", hidden=critic.needs_hidden)
        ref = policy.reference_logprobs(tokens[s], temperature=config.temperature)
        parts.append((f.logprobs, f.entropy, critic.values(tokens[s], f), ref))
    return Old(*(torch.cat(column) for column in zip(*parts, strict=True)))


def ppo_update(policy: Policy, critic: Critic, optimizer, scheduler, tokens: Tokens, old: Old, adv: Tensor,
               returns: Tensor, config: PPOConfig, generator: torch.Generator) -> dict[str, float]:
    """6. PPO epochs over shuffled minibatches; gradient accumulation over micro-batches."""
    mask = tokens.response_mask.float()

    def micro_loss(i: Tensor, minibatch: Tensor) -> tuple[Tensor, dict[str, float]]:
        n_tokens = mask[minibatch].sum().clamp(min=1)  # token mean over the whole minibatch
        new = policy(tokens[i], temperature=config.temperature, entropy="train" if config.ent_coef > 0 else None,
                     hidden=critic.needs_hidden)
        values = critic.values(tokens[i], new)
        pg, clipfrac, approx_kl = ppo_policy_loss(new.logprobs, old.logprobs[i], adv[i], mask[i], config.cliprange,
                                                  n_tokens)
        vl, vclip = value_loss(values, old.values[i], returns[i], mask[i], config.cliprange_value, n_tokens)
        ent = token_mean(new.entropy, mask[i], n_tokens) if new.entropy is not None else torch.zeros(())
        stats = {M.LOSS_POLICY: pg, M.LOSS_VALUE: vl, M.LOSS_ENTROPY: ent, M.CLIPFRAC: clipfrac,
                 M.APPROX_KL: approx_kl, M.VALUE_CLIPFRAC: vclip}
        return pg + config.vf_coef * vl - config.ent_coef * ent, {k: float(v.detach()) for k, v in stats.items()}

    params = policy.trainable_parameters() + critic.trainable_parameters()
    return minibatch_updates(params, optimizer, scheduler, len(tokens), epochs=config.ppo_epochs,
                             minibatch_size=config.minibatch_size // D.world().size, micro_batch_size=config.micro_batch_size,
                             max_grad_norm=config.max_grad_norm, generator=generator, micro_loss=micro_loss)


def train(config: PPOConfig, run: RunDir, *, base, tokenizer, console=None, resume: bool = False) -> Trained:
    """Train a LoRA policy with PPO on `base`; everything lands in `run` (see the module docstring).

    On several processes (hhh.distributed) each rank samples and updates its share of the step's prompts with its
    own sampling seed; reward normalisation and advantage whitening run over the whole batch, gradients are
    averaged before each optimizer step."""
    from hhh.data import load_prompts
    from hhh.models.policy import build_policy
    from hhh.rewards import Shaped, build_reward

    train_prompts, val = split_prompts(load_prompts(config.prompts), config.val_prompts)
    reward = build_reward(config.reward, device=config.device)
    second = build_reward(config.second_scorer, device=config.device)
    clip = (-config.reward_clip, config.reward_clip) if config.reward_clip else None
    shaping = Shaped(reward, clip=clip, normalize=None if config.reward_normalize == "none" else config.reward_normalize)
    policy = build_policy(base, config.lora(), seed=config.seed, init_adapter=config.init_adapter)
    critic = Critic(policy, separate=config.critic == "separate", lora=config.lora(), seed=config.seed)
    device = next(policy.parameters()).device
    rollouts = rollout_engine(config, policy, tokenizer)
    updates_per_step = config.ppo_epochs * math.ceil(config.batch_size / config.minibatch_size)
    optimizer = torch.optim.AdamW(policy.trainable_parameters() + critic.trainable_parameters(), lr=config.lr,
                                  eps=1e-5, weight_decay=0.0)
    scheduler = linear_decay(optimizer, config.steps * updates_per_step)
    kl = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
    loop = OnlineRun("PPO", config, run, policy=policy, parts=[policy, critic], optimizer=optimizer,
                     scheduler=scheduler, kl=kl, reward=reward, second=second, tokenizer=tokenizer, val=val,
                     console=console, resume=resume, stateful={"shaping": shaping})
    with loop:
        for step in loop.steps():
            t0 = time.time()
            batch = D.shard(step_prompts(train_prompts, config.batch_size, step, config.seed))
            # 1. rollout
            r: Rollout = rollouts(batch, step, step_generator(config.seed, step, device, rank=D.world().rank))
            t_rollout = time.time() - t0
            tokens, mask = r.tokens, r.response_mask.float()
            # 2. score
            raw = reward.score(batch, r.texts).to(device)
            every = D.gather(raw)  # normalised with the whole step's scores, so the running statistics agree
            mine = D.shard_slice(len(every))
            score = shaping.transform(every)[mine] - config.no_eos_penalty * (~r.ended).float()
            with policy.frozen_trunk(tokens, micro_batch_size=config.micro_batch_size, known=r.trunk):
                # 3. old log-probs, values, reference log-probs
                old = old_passes(policy, critic, tokens, config)
                # 4. shaped per-token reward
                kl_tok = kl_per_token(old.logprobs, old.ref_logprobs, config.kl_estimator) * mask
                rewards = shaped_rewards(score, kl_tok, mask, kl.beta)
                # 5. advantages
                adv, returns = gae(rewards, old.values, mask, config.gamma, config.lam)
                if config.whiten_advantages:
                    # Whitening shifts advantages to mean 0: without it a positive reward bias pushes every token up.
                    adv = D.masked_whiten(adv, mask)
                # 6. PPO epochs
                update = ppo_update(policy, critic, optimizer, scheduler, tokens, old, adv, returns, config,
                                    step_generator(config.seed, step, "cpu", MINIBATCHES))
            # 7. log (and the shared tail: beta, guards, held-out check, checkpoint)
            k1 = ((old.logprobs - old.ref_logprobs) * mask).sum(-1)
            k3 = (kl_per_token(old.logprobs, old.ref_logprobs, "k3") * mask).sum(-1)
            loop.finish({
                "step": step + 1, M.REWARD_MEAN: float(every.mean()), M.SHAPED_MEAN: float(score.mean()),
                M.SHAPED_STD: float(score.std()) if score.numel() > 1 else 0.0,
                M.SHAPED_TOTAL: float(rewards.sum(-1).mean()), M.KL: float(k1.mean()), M.KL_K3: float(k3.mean()),
                M.KL_PER_TOKEN: float(k1.sum() / mask.sum()), M.ENTROPY: float(masked_mean(old.entropy, mask)),
                M.VALUE_MEAN: float(masked_mean(old.values, mask)), **update, M.LR: scheduler.get_last_lr()[0],
                **sample_stats(batch, r, second), "time/rollout_s": t_rollout,
            }, samples=len(batch), t0=t0)
    return loop.result()

