"""Offline preference tuning: DPO (Rafailov et al. 2023) and its family, on a LoRA adapter.

    # 1. pairs: a JSONL / hf: / preference-store set, or sampled from the base model and ranked by the reward
    # 2. tokens: chat-formatted prompt (as in rollout) + each completion + EOS; fixed minibatches of pairs;
    #    one row per pair (hhh.rollout.PairTokens): the prompt once, chosen and rejected each attending to it
    # 3. reference log-probs: the same base with the adapter disabled, once per minibatch, cached
    #    (the frozen lower layers' output is cached too, Policy.frozen_trunk: later passes run only the top layers)
    # 4. epochs over the minibatches (shuffled order): policy log-probs of chosen and rejected, the loss
    # 5. log: loss, implicit rewards beta*(log pi - log ref) of both, margin, accuracy, and both log-probs
    #    (both usually fall; the margin is what DPO raises)

Losses (hhh.losses): sigmoid (DPO; cDPO with label_smoothing, or per pair from soft labels), robust, ipo, hinge,
simpo, orpo, kto.
IPO, SimPO and ORPO use per-token mean log-probs; the others sums. KTO takes each pair as one desirable and
one undesirable example, with its reference point from every example's prompt paired with the next one's answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hhh import distributed as D
from hhh import losses as L
from hhh import metrics as M
from hhh.config import DPOConfig
from hhh.data.pairs import Pairs, load_pairs
from hhh.models.policy import Policy
from hhh.rollout import Batch, PairTokens, Tokens, pair_tokens, prompt_response_tokens
from hhh.runs import RunDir
from hhh.train.loop import GracefulStop, Trained, clip_and_step, linear_decay, step_generator

MEAN_LOGP = ("ipo", "simpo", "orpo")  # losses on per-token mean log-probs
NO_REFERENCE = ("simpo", "orpo")


@dataclass(frozen=True)
class Minibatch:
    tokens: Batch | None  # PairTokens (b rows: each prompt once, its chosen and its rejected completion), or
                          # Tokens (2b rows: [0, b) the prompts with their chosen completion, [b, 2b) the same
                          # prompts with their rejected one); completions + EOS, right-padded. On several processes
                          # this rank's pairs of the minibatch (None: none of them)
    total: int  # the pairs of the whole minibatch, over every process
    mismatched: Tokens | None = None  # KTO: (2b rows), the prompt of row k with the completion of row k+1 mod 2b
    label_smoothing: Tensor | None = None  # (b,) sigmoid loss: per pair, 1 - P(chosen is better) of a soft label

    @property
    def pairs(self) -> int:
        if self.tokens is None:
            return 0
        return len(self.tokens) if isinstance(self.tokens, PairTokens) else len(self.tokens) // 2

    def rows(self, pairs: slice) -> tuple[Tensor, Batch]:
        """The indices of `pairs` in the minibatch's (2b,) completions (their chosen ones, then their rejected
        ones; what sequence_logps returns) and the token rows of those pairs."""
        assert self.tokens is not None
        b = self.pairs
        idx = torch.cat([torch.arange(b)[pairs], torch.arange(b)[pairs] + b])
        return idx, self.tokens[pairs] if isinstance(self.tokens, PairTokens) else self.tokens[idx]


def build_pairs(config: DPOConfig, model, tokenizer, console) -> Pairs:
    """On-policy pairs for a task: K samples per prompt from `model`, best vs worst by the reward
    (prompts whose best and worst differ by less than `min_gap` are dropped)."""
    from hhh.data import load_prompts
    from hhh.rewards import build_reward
    from hhh.rollout import sample

    prompts = load_prompts(config.prompts, limit=config.pair_prompts)
    reward = build_reward(config.reward, device=config.device)
    rows = [p for p in prompts for _ in range(config.pair_samples)]
    done: list[tuple[int, list[str]]] = []
    starts = range(0, len(rows), config.sample_batch_size)
    for i in starts[D.world().rank::D.world().size]:  # processes share the batches; each batch keeps its own seed
        gen = step_generator(config.seed, i, next(model.parameters()).device)
        done.append((i, sample(model, tokenizer, rows[i:i + config.sample_batch_size],
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               generator=gen).texts))
    texts = [t for _, part in sorted(D.gather_lists(done)) for t in part]
    scores = reward.score(rows, texts).view(len(prompts), config.pair_samples)
    out = Pairs([], [], [], [], [])
    for i, prompt in enumerate(prompts):
        best, worst = int(scores[i].argmax()), int(scores[i].argmin())
        if scores[i, best] - scores[i, worst] <= config.min_gap:
            continue
        out.prompts.append(prompt)
        out.chosen.append(texts[i * config.pair_samples + best])
        out.rejected.append(texts[i * config.pair_samples + worst])
        out.tie.append(False)
        out.margin.append(None)
    console.print(f"built {len(out)} pairs from {len(prompts)} prompts x {config.pair_samples} samples "
                  f"(reward {config.reward}, mean gap {float((scores.max(1).values - scores.min(1).values).mean()):.3f})")
    return out


def _tokens(tokenizer, prompts: list[str], completions: list[str], max_tokens: int, device) -> Tokens:
    return prompt_response_tokens(tokenizer, prompts, completions, max_tokens, device)


def minibatches(pairs: Pairs, tokenizer, config: DPOConfig, device) -> list[Minibatch]:
    """A fixed partition of the pairs into minibatches (shuffled once by the seed); on several processes each rank
    tokenizes its consecutive share of every minibatch."""
    order = np.random.default_rng(config.seed).permutation(len(pairs)).tolist()
    out = []
    for i in range(0, len(order), config.batch_size):
        ids = order[i:i + config.batch_size]
        mine = D.shard_slice(len(ids))
        b = pairs.take(ids[mine])
        if not len(b):
            out.append(Minibatch(None, len(ids)))
            continue
        tokens: Batch = (pair_tokens(tokenizer, b.prompts, b.chosen, b.rejected, config.max_completion_tokens, device)
                         if config.share_prompt else
                         _tokens(tokenizer, b.prompts * 2, b.chosen + b.rejected, config.max_completion_tokens, device))
        mismatched = None
        if config.loss == "kto":
            # KTO's reference point [Ethayarajh24 sec. 4.1]: each of the 2b examples (x_k, y_k), desirable and
            # undesirable alike, paired with the next example's completion y_{k+1 mod 2b}, an answer to another
            # prompt: log pi - log ref on those estimates KL(pi || ref) with no signal about x_k. (With b = 1 the
            # rotation pairs x_0 with its own other answer; TRL's rotation has the same limit.) The rotation runs
            # over the whole minibatch; this rank keeps the rows of its pairs.
            every = pairs.take(ids)
            completions = every.chosen + every.rejected
            shifted = completions[1:] + completions[:1]
            rows = list(range(len(ids)))[mine]
            rows += [len(ids) + k for k in rows]
            mismatched = _tokens(tokenizer, [(every.prompts * 2)[k] for k in rows], [shifted[k] for k in rows],
                                 config.max_completion_tokens, device)
        smoothing = None
        if b.probability is not None:  # soft labels (AI feedback): cDPO with each pair's own flip probability
            smoothing = torch.tensor([config.label_smoothing if p is None else 1.0 - p for p in b.probability],
                                     device=device)
        out.append(Minibatch(tokens, len(ids), mismatched, smoothing))
    return out


def sequence_logps(policy: Policy, tokens: Batch, *, reference: bool = False) -> tuple[Tensor, Tensor]:
    """(sum, mean) of log pi over each completion's tokens, (2b,) each: the b chosen completions, then the b
    rejected ones (from PairTokens or from 2b rows alike).

    At temperature 1, whatever the sampling temperature: the DPO family's beta is defined on the model's own
    log-probs (the DPO paper, TRL), and at T = 0.7 every sequence log-prob, and so the margin, would be rescaled."""
    logp = policy.reference_logprobs(tokens, temperature=1.0) if reference else policy(tokens, temperature=1.0).logprobs
    mask = tokens.response_mask.float()
    total = tokens.per_completion(logp * mask)
    return total, total / tokens.per_completion(mask).clamp(min=1)


def preference_loss(config: DPOConfig, pi: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor] | None,
                    kl: Tensor | None = None, label_smoothing: Tensor | None = None) -> Tensor:
    """The configured loss from (sum, mean) log-probs of the 2b rows (chosen first) of policy and reference;
    `label_smoothing` (b,): the sigmoid loss's per-pair flip probabilities (soft labels), else the config's."""
    which = 1 if config.loss in MEAN_LOGP else 0
    b = pi[0].shape[0] // 2
    pc, pr = pi[which][:b], pi[which][b:]
    if config.loss == "simpo":
        return L.simpo_loss(pc, pr, beta=config.beta, gamma=config.simpo_gamma_ratio * config.beta)
    if config.loss == "orpo":
        return L.orpo_loss(pc, pr, -pc, lam=config.orpo_lambda)
    if ref is None:
        raise ValueError(f"loss {config.loss!r} needs the reference's log-probs")
    rc, rr = ref[which][:b], ref[which][b:]
    if config.loss == "sigmoid":
        smoothing = config.label_smoothing if label_smoothing is None else label_smoothing
        return L.dpo_loss(pc, pr, rc, rr, beta=config.beta, label_smoothing=smoothing)
    if config.loss == "robust":
        return L.robust_dpo_loss(pc, pr, rc, rr, beta=config.beta, eps=config.robust_eps)
    if config.loss == "ipo":
        return L.ipo_loss(pc, pr, rc, rr, beta=config.beta)
    if config.loss == "hinge":
        return L.hinge_loss(pc, pr, rc, rr, beta=config.beta)
    if config.loss == "kto":
        if kl is None:
            raise ValueError("KTO needs its reference point (the mismatched pairs' KL)")
        desirable = torch.arange(2 * b, device=pi[0].device) < b
        return L.kto_loss(pi[0], ref[0], desirable, kl, beta=config.beta, lambda_d=config.kto_lambda_d,
                          lambda_u=config.kto_lambda_u)
    raise ValueError(f"unknown loss {config.loss!r}")


def train(config: DPOConfig, run: RunDir, *, base, tokenizer, console=None, resume: bool = False) -> Trained:
    """The jobs table's entry: pairs from `config.data`, or sampled from `base` and ranked by the reward; then
    `train_dpo`. (No checkpoints: a DPO run is short and restarts whole.)"""
    pairs = load_pairs(config, skip_ties=True) if config.data else build_pairs(config, base, tokenizer, console)
    if not len(pairs):
        raise ValueError("no preference pairs to train on (lower --min-gap, or give --data)")
    if D.world().main:  # rank 0 writes the run's files
        run.write_json("pairs.json", {"pairs": len(pairs), "source": config.data or f"sampled from {config.model}"})
    policy = train_dpo(config, run, pairs, base=base, tokenizer=tokenizer, console=console)
    return Trained(policy.lm, {"pairs": len(pairs), "loss": config.loss})


def train_dpo(config: DPOConfig, run: RunDir, pairs: Pairs, *, base, tokenizer, console=None) -> Policy:
    """Train a LoRA adapter on preference pairs; saves RUN/adapter and logs one line per optimizer step."""
    from rich.console import Console

    from hhh.models.policy import build_policy

    console = console or Console(stderr=True)
    policy = build_policy(base, config.lora(), seed=config.seed, init_adapter=config.init_adapter)
    device = next(policy.parameters()).device
    # 2. tokens, fixed minibatches
    batches = minibatches(pairs, tokenizer, prompt_sharing(config, policy, console), device)
    # 3. the frozen trunk of every minibatch and the reference log-probs, once
    t0 = time.time()
    with policy.frozen_trunk(*(mb.tokens for mb in batches if mb.tokens is not None)):
        refs = [sequence_logps(policy, mb.tokens, reference=True) if mb.tokens is not None else None
                for mb in batches]  # (sum, mean), (2b,) each
        kto_refs = [sequence_logps(policy, mb.mismatched, reference=True)[0] if mb.mismatched is not None else None
                    for mb in batches]
        console.print(f"reference log-probs of {2 * len(pairs)} completions in {time.time() - t0:.0f} s")
        _epochs(config, run, policy, batches, refs, kto_refs, console)
    if D.world().main:
        policy.save(run.path / "adapter")
    D.barrier()
    return policy


def prompt_sharing(config: DPOConfig, policy: Policy, console) -> DPOConfig:
    """`config`, or a copy with share_prompt off (and a line saying why) when the model's attention cannot read the
    4D mask that one row per pair needs (flash-attention kernels read padding only)."""
    if not config.share_prompt or policy.takes_4d_masks:
        return config
    console.print(f"{policy.lm.config._attn_implementation} attention takes no 4D mask: two rows per pair "
                  "(share_prompt needs sdpa or eager attention)")
    return config.model_copy(update={"share_prompt": False})


def _kto_reference_point(policy: Policy, mb: Minibatch, ref: Tensor | None) -> Tensor:
    """KTO's z0 of a minibatch, over its mismatched rows on every process."""
    with torch.no_grad():
        pi = sequence_logps(policy, mb.mismatched)[0] if mb.mismatched is not None and ref is not None else None
        if D.world().size == 1:
            assert pi is not None and ref is not None
            return L.kto_kl_baseline(pi, ref)
        gap = pi - ref if pi is not None and ref is not None else torch.zeros(0)
        s = D.total({"sum": float(gap.sum()), "n": float(gap.numel())})
        return torch.tensor(s["sum"] / s["n"]).clamp(min=0)


def _epochs(config: DPOConfig, run: RunDir, policy: Policy, batches: list[Minibatch], refs, kto_refs, console) -> None:
    """4.-5. Epochs over the minibatches in shuffled order: one optimizer step and one log line each."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = linear_decay(optimizer, config.epochs * len(batches))
    step = 0
    columns = (TextColumn(f"DPO ({config.loss})"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with GracefulStop(console) as stop, Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=config.epochs * len(batches))
        for epoch in range(config.epochs):
            for j in np.random.default_rng([config.seed, epoch]).permutation(len(batches)).tolist():
                t_step = time.time()
                mb = batches[j]
                kl = _kto_reference_point(policy, mb, kto_refs[j]) if config.loss == "kto" else None
                # 4. policy log-probs of chosen and rejected, the loss; micro-batches of pairs accumulate
                #    gradients weighted by their share of the minibatch's pairs, over every process (every loss is
                #    a mean over pairs or rows; gradients are averaged over the processes, hence the factor)
                optimizer.zero_grad(set_to_none=True)
                b, loss, parts = mb.pairs, 0.0, []
                for i in range(0, b, config.micro_batch_size):
                    pairs_i = slice(i, min(i + config.micro_batch_size, b))
                    idx, part = mb.rows(pairs_i)
                    s, m = sequence_logps(policy, part)
                    ref = None if config.loss in NO_REFERENCE else (refs[j][0][idx], refs[j][1][idx])
                    share = (pairs_i.stop - pairs_i.start) / mb.total
                    smoothing = None if mb.label_smoothing is None else mb.label_smoothing[pairs_i]
                    micro_loss = preference_loss(config, (s, m), ref, kl, smoothing) * share
                    (micro_loss * D.world().size).backward()
                    loss += float(micro_loss.detach())
                    parts.append(s.detach().view(2, -1))  # (2, pairs in the micro-batch): its chosen, its rejected
                grad_norm = clip_and_step(policy.trainable_parameters(), optimizer, scheduler, config.max_grad_norm)
                step += 1
                # 5. log: sums over this rank's pairs, added up over the processes
                sums = {"loss": loss, "chosen": 0.0, "rejected": 0.0, "right": 0.0, "logp_c": 0.0, "logp_r": 0.0}
                if b:
                    s = torch.cat(parts, 1).reshape(-1)  # (2b,) chosen rows, then rejected, as in the minibatch
                    chosen = config.beta * (s[:b] - refs[j][0][:b]).detach()
                    rejected = config.beta * (s[b:] - refs[j][0][b:]).detach()
                    sums.update(chosen=float(chosen.sum()), rejected=float(rejected.sum()),
                                right=float((chosen > rejected).sum()), logp_c=float(s[:b].sum()),
                                logp_r=float(s[b:].sum()))
                sums = D.total(sums)
                n = mb.total
                metrics = {"step": step, "epoch": epoch, M.LOSS_PREFERENCE: sums["loss"],
                           M.IMPLICIT_CHOSEN: sums["chosen"] / n, M.IMPLICIT_REJECTED: sums["rejected"] / n,
                           M.IMPLICIT_MARGIN: (sums["chosen"] - sums["rejected"]) / n,
                           M.IMPLICIT_ACCURACY: sums["right"] / n,
                           M.LOGPS_CHOSEN: sums["logp_c"] / n, M.LOGPS_REJECTED: sums["logp_r"] / n,
                           M.GRAD_NORM: float(grad_norm), M.LR: scheduler.get_last_lr()[0],
                           "time/step_s": time.time() - t_step}
                if kl is not None:
                    metrics[M.KTO_KL] = float(kl)
                if D.world().main:
                    run.log(metrics)
                bar.update(task, completed=step, description=f"loss {sums['loss']:.3f}  margin "
                           f"{metrics[M.IMPLICIT_MARGIN]:.3f}  acc {metrics[M.IMPLICIT_ACCURACY]:.2f}")
                if D.any_rank(stop.requested):
                    stop.requested = True
                    break
            if stop.requested:
                console.print("stopped early (Ctrl-C): saving the adapter as it is")
                break
