"""The math of hhh: pure functions on tensors. Imports only torch; no models, no I/O.

Shapes: B = sequences, T = completion tokens. `mask` is 1 on real completion tokens (up to and
including EOS) and 0 after; every mean, variance and whitening below is taken over mask == 1 only.

References
  [Ziegler19]  Fine-Tuning Language Models from Human Preferences (lm-human-preferences), arXiv:1909.08593
  [Schulman17] Proximal Policy Optimization Algorithms, arXiv:1707.06347
  [GAE]        High-Dimensional Continuous Control Using Generalized Advantage Estimation, arXiv:1506.02438
  [Huang24]    The N+ Implementation Details of RLHF with PPO, arXiv:2403.17031
  [Schulman20] Approximating KL divergence, joschu.net/blog/kl-approx.html
  [Ouyang22]   Training language models to follow instructions with human feedback, arXiv:2203.02155
  [Touvron23]  Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288
  [Eisenstein23] Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking,
               arXiv:2312.09244
  [Rafailov23] Direct Preference Optimization, arXiv:2305.18290
  [Mitchell23] A note on DPO with noisy preferences and relationship to IPO (cDPO), ericmitchell.ai/cdpo.pdf
  [Chowdhury24] Provably Robust DPO: Aligning Language Models with Noisy Feedback, arXiv:2403.00409
  [Azar23]     A General Theoretical Paradigm to Understand Learning from Human Preferences (IPO), arXiv:2310.12036
  [Zhao23]     SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv:2305.10425
  [Meng24]     SimPO: Simple Preference Optimization with a Reference-Free Reward, arXiv:2405.14734
  [Hong24]     ORPO: Monolithic Preference Optimization without Reference Model, arXiv:2403.07691
  [Ethayarajh24] KTO: Model Alignment as Prospect Theoretic Optimization, arXiv:2402.01306
  [Shao24]     DeepSeekMath (GRPO), arXiv:2402.03300
  [Ahmadian24] Back to Basics: Revisiting REINFORCE Style Optimization (RLOO), arXiv:2402.14740
  [Hu25]       REINFORCE++, arXiv:2501.03262
  [Maechler12] Accurately Computing log(1 - exp(-|a|)), CRAN Rmpfr vignette
  [Hinton15]   Distilling the Knowledge in a Neural Network, arXiv:1503.02531
  [Agarwal24]  On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes (GKD),
               arXiv:2306.13649

Preference losses take sequence log-probs (B,): the sum over completion tokens of log pi(y_t | x, y_<t),
or the mean over them where the method says so (SimPO, ORPO). pi_* are the policy's, ref_* the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over masked entries; masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi [Schulman20].

    k1 = log pi - log ref                    unbiased, can be negative per token
    k3 = r - 1 - log r, r = ref / pi         unbiased and always >= 0, lower variance
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last real token of each row (0 for an empty row)."""
    return (mask.sum(-1) - 1).clamp(min=0).long()


def shaped_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token reward [Ziegler19]: -beta * KL_t on every completion token, plus the sequence
    score at the last real token (EOS, or the last token of a truncated completion); 0 after it."""
    rewards = -beta * kl * mask
    idx = last_token_index(mask)
    return rewards.scatter_add(1, idx[:, None], score[:, None].to(rewards.dtype) * (mask.sum(-1, keepdim=True) > 0))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation [GAE], batched over rows, one reverse sweep over time.

    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1}
    V after the last real token is 0 (the episode ends at EOS or at the length limit).
    Returns (advantages, returns = A + V), both zero where mask == 0.
    """
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values  # (B, T); V_{T} = 0 and V after EOS is 0
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def token_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None = None) -> Tensor:
    """Masked mean over all tokens; with `n_tokens` (the minibatch's token count) a micro-batch's
    share of the minibatch mean, so gradient accumulation equals one big batch."""
    return masked_sum(x, mask) / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2,
                    n_tokens: Tensor | float | None = None):
    """Clipped surrogate [Schulman17 eq. 7], as a loss to minimise, token-level mean.

    L = mean_t max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps)),  r_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    Returns (loss, clip fraction, approx KL(old || new) = mean 0.5 * (log r)^2).
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    clipfrac = token_mean((clipped > unclipped).float(), mask, n_tokens)
    approx_kl = token_mean(0.5 * log_ratio**2, mask, n_tokens)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2,
               n_tokens: Tensor | float | None = None):
    """Clipped value loss [Huang24 detail 10]: 0.5 * mean max((V - R)^2, (clip(V, V_old +- eps) - R)^2).
    Returns (loss, fraction of tokens where the clipped term was the larger)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(loss_unclipped, loss_clipped), mask, n_tokens)
    return loss, token_mean((loss_clipped > loss_unclipped).float(), mask, n_tokens).detach()


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy over the last axis from log-probabilities (e.g. log_softmax(logits / T)): -sum p log p."""
    return -(logp.exp() * logp).sum(-1)


# Elements of one chunk of logits in `output_logprobs`: 2^23 fp32 values (32 MiB; 170 positions of a 49,152 vocabulary).
_CHUNK_ELEMENTS = 1 << 23


class _OutputLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[y] and H(softmax(h W^T / T)) for rows of h, a chunk of rows at a time.

    Gradients, with z = h W^T / T, p = softmax(z), y the target:
        d log p_y / dz_j = [j = y] - p_j          d H / dz_j = -p_j (log p_j + H)
        dL/dh = (1/T) (g_logp * (onehot_y - p) - g_H * p * (log p + H)) W
    Backward rebuilds log p chunk by chunk from h and the saved log-sum-exp: one more (N, H) x (H, V) multiply,
    and nothing of size V kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy):
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, _CHUNK_ELEMENTS // vocab)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_entropy else None
        for s in range(0, n, rows):
            z = _scaled_logits(hidden[s:s + rows], weight, temperature)  # (rows, V) fp32
            lse[s:s + rows] = torch.logsumexp(z, dim=-1)
            z = z.sub_(lse[s:s + rows, None])  # log p
            logp[s:s + rows] = z.gather(-1, targets[s:s + rows, None]).squeeze(-1)
            if ent is not None:
                ent[s:s + rows] = entropy_from_logprobs(z)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.set_materialize_grads(False)
        return (logp, ent) if ent is not None else (logp,)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None
        grad = torch.empty_like(hidden)
        rows = ctx.rows
        for s in range(0, hidden.shape[0], rows):
            logp = _scaled_logits(hidden[s:s + rows], weight, ctx.temperature).sub_(lse[s:s + rows, None])
            p = logp.exp()
            if g_ent is None:  # -g_logp * p
                g_z = p.mul_(-g_logp[s:s + rows, None])
            else:  # -(g_logp + g_H (log p + H)) * p
                g_z = (logp + ent[s:s + rows, None]).mul_(g_ent[s:s + rows, None])
                if g_logp is not None:
                    g_z.add_(g_logp[s:s + rows, None])
                g_z = g_z.mul_(p).neg_()
            if g_logp is not None:
                g_z.scatter_add_(-1, targets[s:s + rows, None], g_logp[s:s + rows, None])
            if ctx.temperature != 1.0:
                g_z /= ctx.temperature
            grad[s:s + rows] = g_z.to(weight.dtype) @ weight
        return grad, None, None, None, None


def _scaled_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    z = torch.nn.functional.linear(hidden, weight).float()
    return z if temperature == 1.0 else z.div_(temperature)


def output_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0, *,
                    entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `targets` under softmax(hidden @ weight.T / temperature), and optionally the entropy of that
    distribution, from the last hidden states and a frozen output layer, never holding the logits of every
    position at once.

    hidden (..., H), weight (V, H) with no gradient, targets (...) -> log-probs (...) fp32, entropy (...) fp32 or None.
    Equals log_softmax(F.linear(hidden, weight).float() / T).gather(targets) and entropy_from_logprobs of the same,
    in value and in gradient to `hidden`. Memory: the plain version holds the (N, V) logits, their scaled copy, the
    log-softmax and the entropy's terms at once, and keeps the log-softmax for backward; this one holds 32 MiB
    chunks and keeps (N,) numbers, for one more output-layer multiply in backward.
    """
    if weight.requires_grad:
        raise ValueError("output_logprobs: the output layer must be frozen (it gets no gradient here)")
    shape = targets.shape
    out = _OutputLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                float(temperature), entropy)
    logp = out[0].reshape(shape)
    return logp, (out[1].reshape(shape) if entropy else None)


@dataclass
class AdaptiveKL:
    """Adaptive KL coefficient [Ziegler19 sec. 2.2]:

    e = clip(KL / target - 1, -0.2, 0.2) ;  beta <- beta * (1 + e * n_steps / horizon)
    With target None, beta stays fixed.
    """

    beta: float
    target: float | None = None
    horizon: float = 10_000.0

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float | None]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = state["beta"], state["target"], state["horizon"]


def bradley_terry_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    *,
    margin: Tensor | None = None,
    tie: Tensor | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Reward-model loss on pairs, averaged over the batch; all inputs (B,).

    Ordered pair:  -log sigma(r_c - r_r - m)          [Ouyang22 eq. 1; the margin m from [Touvron23 eq. 2]]
    Tie:           -(log sigma(d) + log sigma(-d)) / 2  (Bradley-Terry with target 1/2: least at d = 0; no margin)
    Centring:      + center_coef * mean((r_c + r_r)^2)  [Eisenstein23]: pins the free offset of the rewards near 0
    """
    d = r_chosen - r_rejected
    ordered = -torch.nn.functional.logsigmoid(d - margin if margin is not None else d)
    if tie is not None:
        tied = -0.5 * (torch.nn.functional.logsigmoid(d) + torch.nn.functional.logsigmoid(-d))
        ordered = torch.where(tie.bool(), tied, ordered)
    loss = ordered.mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# --- supervised fine-tuning ---------------------------------------------------------------------------


def sft_loss(logp: Tensor, mask: Tensor, n_tokens: Tensor | float | None = None) -> Tensor:
    """Negative log-likelihood of the response tokens, a mean over every response token of the batch (as TRL's
    SFTTrainer): logp (B, R) at temperature 1, mask (B, R) 1 on response tokens only, so prompt tokens and padding
    get no loss. With `n_tokens` (the minibatch's count), a micro-batch's share of the minibatch mean."""
    return -token_mean(logp, mask, n_tokens)


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor, *,
                 temperature: float = 2.0, alpha: float = 0.5, n_tokens: Tensor | float | None = None) -> Tensor:
    """Knowledge distillation [Hinton15] on response tokens (logits (B, R, V), targets and mask (B, R)):

        alpha * tau^2 * KL( softmax(z_teacher / tau) || softmax(z_student / tau) ) + (1 - alpha) * CE(z_student, y)

    both terms a mean over the masked tokens. The tau^2 keeps the soft term's gradient on the scale of the hard one
    as tau grows; forward KL (teacher first) is the classic choice, GKD's [Agarwal24] default with on-policy data."""
    teacher = (teacher_logits.float() / temperature).log_softmax(-1)
    student = (student_logits.float() / temperature).log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)                                        # (B, R)
    ce = -student_logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]        # (B, R)
    return alpha * temperature**2 * token_mean(kl, mask, n_tokens) + (1 - alpha) * token_mean(ce, mask, n_tokens)


# --- offline preference optimisation ---------------------------------------------------------------


def dpo_margin(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), (B,): the implicit reward margin / beta."""
    return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float = 0.1,
             label_smoothing: float | Tensor = 0.0) -> Tensor:
    """DPO [Rafailov23 eq. 7]: -log sigma(beta h). With label_smoothing eps > 0, cDPO [Mitchell23]: the label is
    flipped with probability eps, (1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h). Mean over the batch.
    eps may be a (B,) tensor: per-pair soft labels, eps_i = 1 - P(chosen_i is better) (e.g. AI feedback)."""
    z = beta * dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    loss = -torch.nn.functional.logsigmoid(z)
    if isinstance(label_smoothing, Tensor) or label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * torch.nn.functional.logsigmoid(-z)
    return loss.mean()


def robust_dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
                    beta: float = 0.1, eps: float = 0.1) -> Tensor:
    """Robust DPO [Chowdhury24]: an unbiased loss under labels flipped with known rate eps < 1/2,
    ((1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)) / (1 - 2 eps)."""
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= eps < 0.5, got {eps}")
    z = beta * dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    logsig = torch.nn.functional.logsigmoid
    return ((-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)).mean()


def ipo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1) -> Tensor:
    """IPO [Azar23 eq. 17]: (h - 1 / (2 beta))^2 — regresses the margin to a finite target instead of pushing it
    to infinity. (The IPO authors and TRL use per-token mean log-probs here; the loop passes those.)"""
    return ((dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2).mean()


def hinge_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
               beta: float = 0.1) -> Tensor:
    """Hinge / SLiC [Zhao23], with the reference as in the DPO family: max(0, 1 - beta h)."""
    return torch.relu(1 - beta * dpo_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)).mean()


def simpo_loss(pi_chosen_mean: Tensor, pi_rejected_mean: Tensor, *, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SimPO [Meng24 eq. 6], reference-free: -log sigma(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma),
    with per-token *mean* log-probs (length-normalised) and a target margin gamma."""
    return -torch.nn.functional.logsigmoid(beta * (pi_chosen_mean - pi_rejected_mean) - gamma).mean()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends [Maechler12]: log(-expm1(x)) for x > -log 2, where
    1 - exp(x) cancels, and log1p(-exp(x)) below, where exp(x) is small. Its gradient -1/expm1(-x) stays finite
    (and large) as x -> 0-; only x = 0 itself, a probability of exactly 1, is clamped to the largest float below 0."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(pi_chosen_mean: Tensor, pi_rejected_mean: Tensor, nll_chosen: Tensor, *, lam: float = 0.1) -> Tensor:
    """ORPO [Hong24 eq. 6-7], reference-free: NLL(y_w) + lam * -log sigma(log odds(y_w) - log odds(y_l)),
    odds(y) = P / (1 - P) with P = exp(mean log pi(y)); nll_chosen is the SFT loss on the chosen tokens (B,)."""

    def log_odds(mean_logp: Tensor) -> Tensor:
        return mean_logp - log1mexp(mean_logp)  # log P - log(1 - P)

    ratio = -torch.nn.functional.logsigmoid(log_odds(pi_chosen_mean) - log_odds(pi_rejected_mean))
    return (nll_chosen + lam * ratio).mean()


def kto_kl_baseline(pi_mismatched: Tensor, ref_mismatched: Tensor) -> Tensor:
    """KTO's reference point z0 [Ethayarajh24 sec. 4.1]: KL(pi || ref) estimated on completions paired with
    prompts they do not answer, clamped at 0 and detached (no gradient flows through the baseline)."""
    return (pi_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(pi: Tensor, ref: Tensor, desirable: Tensor, kl: Tensor, *, beta: float = 0.1,
             lambda_d: float = 1.0, lambda_u: float = 1.0) -> Tensor:
    """KTO [Ethayarajh24 sec. 4] on unpaired examples, r = log pi(y|x) - log ref(y|x) (B,):
    desirable:   lambda_d * (1 - sigma(beta (r - z0)))
    undesirable: lambda_u * (1 - sigma(beta (z0 - r)))
    z0 = `kl` from `kto_kl_baseline`. Mean over the batch."""
    r = pi - ref
    good = lambda_d * (1 - torch.sigmoid(beta * (r - kl)))
    bad = lambda_u * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable.bool(), good, bad).mean()


# --- critic-free online RL -----------------------------------------------------------------------------


def grpo_advantages(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO [Shao24 sec. 4.1.2]: rows come in groups of G samples of one prompt; A_i = (r_i - mean_g) / (std_g + eps)
    (sample std), or r_i - mean_g with scale=False (Dr. GRPO drops the division). (B,) -> (B,)."""
    g = rewards.view(-1, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO [Ahmadian24]: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g). (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = rewards.view(-1, group_size)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def global_whiten(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Sequence advantages (B,) normalised over the whole batch (not per prompt group)."""
    return (x - x.mean()) / (x.std() + eps) if x.numel() > 1 else x - x.mean()


def reinforce_pp_advantages(score: Tensor, kl: Tensor, mask: Tensor, beta: float, gamma: float = 1.0, *,
                            whiten: bool = True) -> Tensor:
    """REINFORCE++ [Hu25 eq. 8-10], token-level (B, T):
        A_t = r(x, y) - beta * sum_{i >= t} KL_i      (gamma = 1; in general the discounted return of the shaped
                                                       rewards -beta KL_i + r at the last token)
    then whitened over every completion token of the batch (mean 0, std 1 across tokens, not sequences); with
    whiten=False the returns as they are (whitened by the caller over a batch split across processes).
    `kl` (B, T) is the per-token KL estimate of pi_old against the reference (k1 in the paper)."""
    rewards = shaped_rewards(score, kl, mask, beta)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)  # V = 0, lambda = 1: the return
    return masked_whiten(returns, mask) if whiten else returns * mask


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              clip: float = 0.2, beta: float = 0.04, aggregation: str = "token") -> tuple[Tensor, Tensor, Tensor]:
    """GRPO objective [Shao24 eq. 3] as a loss: per token, the clipped surrogate with the sequence advantage A_i
    broadcast over its tokens, plus beta * k3 KL to the reference [Schulman20]:
        l_t = max(-A r_t, -A clip(r_t, 1-eps, 1+eps)) + beta * (ref/pi - log(ref/pi) - 1)
    aggregation "sequence": mean over each sequence's tokens, then over sequences (the paper);
    "token": one mean over all tokens of the batch (DAPO; long answers weigh by their length).
    Returns (loss, clip fraction, mean k3 KL)."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    kl = kl_per_token(logp, ref_logp, "k3")
    per_token = torch.maximum(unclipped, clipped) + beta * kl
    if aggregation == "token":
        loss = masked_mean(per_token, mask)
    elif aggregation == "sequence":
        loss = masked_mean(per_token, mask, dim=-1).mean()
    else:
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    return loss, masked_mean((clipped > unclipped).float(), mask).detach(), masked_mean(kl, mask).detach()


def reinforce_loss(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level REINFORCE (RLOO [Ahmadian24]): -A_i * log pi(y_i | x), summed over the completion's tokens,
    mean over sequences. `advantages` (B,) already hold the KL-penalised reward minus the baseline."""
    return -(advantages * masked_sum(logp, mask, dim=-1)).mean()


def rloo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip: float = 0.2,
              n_seqs: float | None = None) -> tuple[Tensor, Tensor]:
    """RLOO with an importance ratio, for the optimizer steps after the first on one batch (the PPO-style variant
    of [Ahmadian24], as TRL's RLOOTrainer): per token the clipped surrogate with the sequence advantage A_i,
        l_t = max(-A_i r_t, -A_i clip(r_t, 1 - eps, 1 + eps)),  r_t = pi(y_t | .) / pi_old(y_t | .)
    summed over the completion's tokens, mean over sequences. On-policy (r = 1) its gradient is REINFORCE's,
    -A_i * grad sum_t log pi(y_t | .); off-policy the ratio corrects it and the clip bounds the step.
    `n_seqs`: the minibatch's sequence count, so micro-batches add up to its mean. Returns (loss, clip fraction)."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    per_seq = masked_sum(torch.maximum(unclipped, clipped), mask, dim=-1)
    loss = per_seq.sum() / (n_seqs if n_seqs is not None else logp.shape[0])
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()
