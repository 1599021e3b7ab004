"""The names of everything hhh logs, one vocabulary for training (RUN/metrics.jsonl) and evaluation (RUN/eval.json).

A name means the same thing wherever it appears; code uses these constants, never the strings, and
`docs/metrics.md` is generated from `TABLE` (a test checks it is current: `python -m hhh.metrics > docs/metrics.md`).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- what the samples look like (training: this step's rollout; evaluation: the eval set's samples) ---
REWARD_MEAN = "reward/mean"
REWARD_STD = "reward/std"
SECOND_MEAN = "second/mean"
LENGTH = "length/tokens"
LENGTH_WORDS = "length/words"
EOS_RATE = "eos_rate"
DISTINCT_1 = "distinct_1"
DISTINCT_2 = "distinct_2"
REPETITION_3 = "repetition_3"
# --- training: PPO's shaped score ---
SHAPED_MEAN = "reward/shaped_mean"
SHAPED_STD = "reward/shaped_std"
SHAPED_TOTAL = "reward/total"
# --- training: KL to the reference (this step's rollout, old policy) ---
KL = "kl/k1"
KL_K3 = "kl/k3"
KL_PER_TOKEN = "kl/k1_per_token"
KL_BETA = "kl/beta"
# --- training: the update ---
ENTROPY = "policy/entropy"
CLIPFRAC = "policy/clipfrac"
APPROX_KL = "policy/approxkl"
ADVANTAGE_ABS = "advantage/abs_mean"
VALUE_MEAN = "value/mean"
VALUE_CLIPFRAC = "value/clipfrac"
LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
LOSS_ENTROPY = "loss/entropy"
LOSS_PREFERENCE = "loss/preference"
GRAD_NORM = "grad_norm"
LR = "lr"
# --- training: preference tuning (DPO family; implicit reward = beta * (log pi - log ref)) ---
IMPLICIT_CHOSEN = "rewards/chosen"
IMPLICIT_REJECTED = "rewards/rejected"
IMPLICIT_MARGIN = "rewards/margin"
IMPLICIT_ACCURACY = "rewards/accuracy"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
KTO_KL = "kto/kl"
# --- Constitutional AI (hhh cai): generation progress ---
CAI_REVISED = "cai/revised"
# --- training: supervised fine-tuning (hhh sft) ---
LOSS_SFT = "loss/sft"
SFT_EVAL_LOSS = "sft/eval_loss"
# --- training: reward models (hhh rm train) ---
LOSS_RM = "loss/rm"
RM_TRAIN_ACCURACY = "rm/train_accuracy"
RM_CHOSEN = "rm/chosen"
RM_REJECTED = "rm/rejected"
RM_EVAL = "rm/eval_"  # + accuracy, loss, mean_margin, pairs: hhh.train.rm.evaluate_pairs on the held-out pairs
# --- training: held-out prompts (every val_every steps) ---
VAL_REWARD = "val/reward"
VAL_SECOND = "val/second"
# --- evaluation ---
TOXICITY = "toxicity/mean"
TOXICITY_STD = "toxicity/std"
TOXIC_FRACTION = "toxicity/frac_toxic"
VADER_NEG = "vader/neg_mean"
VADER_NEGATIVE = "vader/frac_negative"
REFUSAL_RATE = "refusal_rate"
PPL_BASE = "ppl/base"
KL_EVAL = "kl/per_completion"
KL_EVAL_K3 = "kl/k3_per_completion"
KL_EVAL_PER_TOKEN = "kl/per_token"


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    better: str  # "higher", "lower", "" (neither: a diagnostic)
    where: str   # which logs carry it


T, E, TE = "training", "evaluation", "training, evaluation"
TABLE = [
    Metric(REWARD_MEAN, "mean raw reward of the samples (the reward spec, before any normalisation)", "higher", TE),
    Metric(REWARD_STD, "std of the raw reward over the step's samples (GRPO, RLOO)", "", T),
    Metric(SECOND_MEAN, "mean score of the second judge (`second_scorer`, never trained on)", "higher", T),
    Metric(LENGTH, "mean completion length in tokens (EOS included)", "", TE),
    Metric(LENGTH_WORDS, "mean completion length in words", "", E),
    Metric(EOS_RATE, "share of completions that ended with EOS within max_new_tokens", "", TE),
    Metric(DISTINCT_1, "unique words / all words over the set", "higher", E),
    Metric(DISTINCT_2, "unique word bigrams / all bigrams over the set (diversity)", "higher", TE),
    Metric(REPETITION_3, "mean share of a completion's word trigrams that repeat an earlier one", "lower", TE),
    Metric(SHAPED_MEAN, "PPO: mean score after normalisation (and clipping, minus the no-EOS penalty)", "", T),
    Metric(SHAPED_STD, "PPO: std of that score", "", T),
    Metric(SHAPED_TOTAL, "PPO: per-completion sum of the shaped per-token rewards (score - beta * KL)", "higher", T),
    Metric(KL, "KL(policy || reference) per completion, k1 estimator sum_t log pi/ref, on the step's samples",
           "lower", T),
    Metric(KL_K3, "the same KL, k3 estimator (non-negative per token)", "lower", T),
    Metric(KL_PER_TOKEN, "PPO: k1 KL per completion token", "lower", T),
    Metric(KL_BETA, "KL coefficient used this step (adaptive for PPO with kl_target; raised x1.5 by the KL budget "
           "guard)", "", T),
    Metric(ENTROPY, "mean per-token entropy of the policy at the temperature (nats)", "", T),
    Metric(CLIPFRAC, "share of completion tokens whose ratio was clipped", "", T),
    Metric(APPROX_KL, "PPO: mean (ratio - 1) - log ratio over the update, how far the policy moved", "", T),
    Metric(ADVANTAGE_ABS, "GRPO/RLOO: mean |advantage|", "", T),
    Metric(VALUE_MEAN, "PPO: mean value estimate", "", T),
    Metric(VALUE_CLIPFRAC, "PPO: share of value predictions clipped", "", T),
    Metric(LOSS_POLICY, "policy loss of the update (mean over optimizer steps)", "", T),
    Metric(LOSS_VALUE, "PPO: value loss", "lower", T),
    Metric(LOSS_ENTROPY, "PPO: mean entropy in the loss' bonus term", "", T),
    Metric(LOSS_PREFERENCE, "DPO family: the configured preference loss (sigmoid, ipo, simpo, kto...)", "lower", T),
    Metric(GRAD_NORM, "global gradient norm before clipping", "", T),
    Metric(LR, "learning rate after the step", "", T),
    Metric(IMPLICIT_CHOSEN, "DPO family: mean beta * (log pi - log ref) of the chosen completions", "", T),
    Metric(IMPLICIT_REJECTED, "DPO family: the same for the rejected ones", "", T),
    Metric(IMPLICIT_MARGIN, "DPO family: mean chosen - rejected implicit reward", "higher", T),
    Metric(IMPLICIT_ACCURACY, "DPO family: share of pairs whose chosen implicit reward is the larger", "higher", T),
    Metric(LOGPS_CHOSEN, "DPO family: mean summed log-prob of the chosen completions (usually falls)", "", T),
    Metric(CAI_REVISED, "hhh cai: red-team prompts answered, critiqued and revised so far", "", T),
    Metric(LOSS_SFT, "SFT: mean negative log-likelihood per response token of the step's demonstrations (T = 1)",
           "lower", T),
    Metric(SFT_EVAL_LOSS, "SFT: the same on the held-out demonstrations (before training, after each epoch)", "lower",
           T),
    Metric(LOGPS_REJECTED, "DPO family: the same for the rejected ones", "", T),
    Metric(KTO_KL, "KTO: the batch's reference point, an estimate of KL(pi || ref)", "", T),
    Metric(LOSS_RM, "reward model: Bradley-Terry loss of the step's pairs", "lower", T),
    Metric(RM_TRAIN_ACCURACY, "reward model: share of the step's ordered pairs scored in the right order", "higher", T),
    Metric(RM_CHOSEN, "reward model: mean reward of the chosen completions", "", T),
    Metric(RM_REJECTED, "reward model: mean reward of the rejected completions", "", T),
    Metric(RM_EVAL + "accuracy", "reward model, held-out pairs after each epoch: pairwise accuracy", "higher", T),
    Metric(RM_EVAL + "loss", "the same pairs' Bradley-Terry loss", "lower", T),
    Metric(RM_EVAL + "mean_margin", "their mean r_chosen - r_rejected", "higher", T),
    Metric(RM_EVAL + "pairs", "how many held-out ordered pairs", "", T),
    Metric(VAL_REWARD, "mean raw reward on the held-out training prompts (picks the best checkpoint)", "higher", T),
    Metric(VAL_SECOND, "the second judge on the same held-out samples", "higher", T),
    Metric(TOXICITY, "mean P(offensive) of the offensive-language classifier (with a bootstrap 95% interval)",
           "lower", E),
    Metric(TOXICITY_STD, "its std over completions", "", E),
    Metric(TOXIC_FRACTION, "share of completions with P(offensive) > 0.5 (with a 95% interval)", "lower", E),
    Metric(VADER_NEG, "mean VADER negativity: an independent lexicon judge, never in the reward", "lower", E),
    Metric(VADER_NEGATIVE, "share of completions with VADER compound < -0.5", "lower", E),
    Metric(REFUSAL_RATE, "share of completions that decline or apologise instead of answering (hhh.rewards.builtin."
           "is_refusal); on benign prompts, lost helpfulness", "lower", E),
    Metric(PPL_BASE, "perplexity of the completions under the base model (fluency; T = 1)", "lower", E),
    Metric(KL_EVAL, "KL(policy || reference) per completion (k1) on the eval samples; only with an adapter", "lower",
           E),
    Metric(KL_EVAL_K3, "the same, k3 estimator", "lower", E),
    Metric(KL_EVAL_PER_TOKEN, "the same per completion token", "lower", E),
]


BOOKKEEPING = ("step", "epoch", "alarms")  # and time/* (seconds, never compared between runs)


def undocumented(keys) -> list[str]:
    """The keys of a log line or an eval table that TABLE does not describe (a *_ci95 belongs to its metric)."""
    known = {m.name for m in TABLE}
    return sorted(k for k in keys if k not in known and k.removesuffix("_ci95") not in known
                  and k not in BOOKKEEPING and not k.startswith("time/") and k != "n")


def markdown() -> str:
    rows = ["# Metrics", "",
            "Every name hhh logs, generated from `hhh.metrics.TABLE` (`python -m hhh.metrics > docs/metrics.md`). "
            "Training logs one line per step to `RUN/metrics.jsonl`; evaluation writes one table per prompt set to "
            "`RUN/eval.json` (`eval_before.json` before training). A name means the same thing in both.", "",
            "| name | meaning | better | logged in |", "|---|---|---|---|"]
    rows += [f"| `{m.name}` | {m.meaning} | {m.better or '-'} | {m.where} |" for m in TABLE]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
