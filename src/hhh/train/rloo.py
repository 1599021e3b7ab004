"""RLOO (Ahmadian et al. 2024, "Back to Basics") and REINFORCE++ (Hu 2025): REINFORCE with the KL to the reference
in the reward, one pass over each batch.

RLOO        per completion  A_i = (r_i - beta * KL_i) - mean_{j != i} (r_j - beta * KL_j), whitened over the batch;
            loss: REINFORCE summed over the completion's tokens, mean over completions, with a clipped importance
            ratio (minibatches after the first are off-policy; on-policy the gradient is REINFORCE's exactly)
REINFORCE++ per token  A_t = r - beta * (KL still to come from token t), whitened over the batch's tokens, no
            baseline; loss: PPO's clipped surrogate (token mean)

The step itself (rollout, reference pass, update, guards, log) is hhh.train.groups.
"""

from __future__ import annotations

from torch import Tensor

from hhh import distributed as D
from hhh import losses as L
from hhh.config import RLOOConfig
from hhh.runs import RunDir
from hhh.train.groups import Batch, train_groups
from hhh.train.loop import Trained


def rloo_advantages(config: RLOOConfig, score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """(B,) from scores (B,) and per-token KL (B, R)."""
    adv = L.rloo_advantages(score - beta * (kl * mask).sum(-1), config.group_size)
    return D.whiten(adv) if config.normalize_advantages else adv  # over the whole batch, every process's part


def train(config: RLOOConfig, run: RunDir, *, base, tokenizer, console=None, resume: bool = False) -> Trained:
    reinforce_pp = config.advantage == "reinforce++"

    def advantages(score: Tensor, kl: Tensor | None, mask: Tensor, beta: float) -> Tensor:
        assert kl is not None  # train_groups computes it before the update (kl_in_advantages)
        if reinforce_pp:
            returns = L.reinforce_pp_advantages(score, kl, mask, beta, whiten=False)  # (B, R)
            return D.masked_whiten(returns, mask)  # over every token of the batch, every process's part
        return rloo_advantages(config, score, kl, mask, beta)

    def loss(logp: Tensor, i: Tensor, minibatch: Tensor, b: Batch) -> tuple[Tensor, Tensor]:
        if reinforce_pp:
            value, clipfrac, _ = L.ppo_policy_loss(logp, b.old_logp[i], b.advantages[i], b.mask[i], config.cliprange,
                                                   n_tokens=b.mask[minibatch].sum())
            return value, clipfrac
        value, clipfrac = L.rloo_loss(logp, b.old_logp[i], b.advantages[i], b.mask[i], clip=config.cliprange,
                                      n_seqs=len(minibatch))
        return value, clipfrac * (len(i) / len(minibatch))

    return train_groups("REINFORCE++" if reinforce_pp else "RLOO", config, run, beta=config.kl_coef, epochs=1,
                        advantages=advantages, loss=loss, base=base, tokenizer=tokenizer, console=console,
                        resume=resume)
