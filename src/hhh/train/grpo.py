"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): G samples per prompt; each completion's advantage is its reward
standardised within its group, so no critic is needed; the KL to the reference is a loss term, not in the reward.

    advantage  A_i = (r_i - mean_group) / std_group        (Dr. GRPO: --no-scale-rewards drops the division)
    loss       per token max(-A_i r_t, -A_i clip(r_t, 1 - eps, 1 + eps)) + beta * k3(pi, ref),
               mean per sequence then over sequences (the paper) or over all tokens (--aggregation token, DAPO)
    update     `epochs` passes (mu) over each batch

The step itself (rollout, reference pass, update, guards, log) is hhh.train.groups.
"""

from __future__ import annotations

from torch import Tensor

from hhh import losses as L
from hhh.config import GRPOConfig
from hhh.runs import RunDir
from hhh.train.groups import Batch, train_groups
from hhh.train.loop import Trained


def train(config: GRPOConfig, run: RunDir, *, base, tokenizer, console=None, resume: bool = False) -> Trained:
    def advantages(score: Tensor, kl: Tensor | None, mask: Tensor, beta: float) -> Tensor:
        return L.grpo_advantages(score, config.group_size, scale=config.scale_rewards)  # (B,)

    def loss(logp: Tensor, i: Tensor, minibatch: Tensor, b: Batch) -> tuple[Tensor, Tensor]:
        value, clipfrac, _ = L.grpo_loss(logp, b.old_logp[i], b.ref_logp[i], b.advantages[i], b.mask[i],
                                         clip=config.cliprange, beta=b.beta, aggregation=config.aggregation)
        # micro-batches add up to the minibatch's mean: "token" is the minibatch's token mean, not a mean of means
        share = float(b.mask[i].sum() / b.mask[minibatch].sum()) if config.aggregation == "token" \
            else len(i) / len(minibatch)
        return value * share, clipfrac * share

    return train_groups("GRPO", config, run, beta=config.beta, epochs=config.epochs, advantages=advantages, loss=loss,
                        base=base, tokenizer=tokenizer, console=console, resume=resume, kl_in_advantages=False)
