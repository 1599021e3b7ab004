import json
import math

import numpy as np
import pytest
import torch

from hhh.config import EvalConfig
from hhh.evaluate import _kl_and_nll, bootstrap_ci, distinct_n, evaluate, repetition_rate, toxicity_summary
from hhh.models import LoraSettings, attach_lora
from hhh.rollout import sample


def test_distinct_n_by_hand():
    """'a b a' and 'a b': unigrams a,b,a,a,b -> 2 unique / 5; bigrams ab,ba,ab -> 2 unique / 3."""
    assert distinct_n(["a b a", "A b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "A b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


def test_repetition_rate_by_hand():
    """'x y z x y z' has 4 trigrams, 3 unique -> 1/4 repeated; 'a b c' has none -> mean 1/8."""
    assert repetition_rate(["x y z x y z", "a b c"]) == pytest.approx(1 / 8)


def test_bootstrap_interval():
    assert bootstrap_ci([0.3] * 10) == pytest.approx((0.3, 0.3))
    lo, hi = bootstrap_ci(np.r_[np.zeros(50), np.ones(50)], seed=1)
    # standard error of a mean of 100 coin flips is 0.05: the interval is about 0.5 +- 0.1
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62


def test_toxicity_summary_by_hand():
    """[0.1, 0.9, 0.6, 0.2]: mean 0.45; 2 of 4 above 0.5; deviations -.35,.45,.15,-.25 square to 0.41: sample std sqrt(0.41/3)."""
    s = toxicity_summary([0.1, 0.9, 0.6, 0.2])
    assert s["toxicity/mean"] == pytest.approx(0.45)
    assert s["toxicity/frac_toxic"] == pytest.approx(0.5)
    assert s["toxicity/std"] == pytest.approx(math.sqrt(0.41 / 3))
    lo, hi = s["toxicity/mean_ci95"]
    assert 0.1 <= lo <= 0.45 <= hi <= 0.9


def test_kl_and_perplexity_against_explicit_computation(tiny, tokenizer):
    """Recompute, prompt by prompt without padding, sum_t log pi(a_t) - log ref(a_t) at T = 0.7 and the
    base model's NLL at T = 1."""
    model = attach_lora(tiny, LoraSettings(r=4, alpha=8))
    prompts = ["hi", "tell me a story"]
    r = sample(model, tokenizer, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    k1, k3, _ = _kl_and_nll(model, r, temperature=0.7, has_adapter=True)
    assert k1.abs().max() < 1e-4 and k3.abs().max() < 1e-6, "fresh LoRA (B = 0) is the reference: KL is 0"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    r = sample(model, tokenizer, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    k1, k3, nll = _kl_and_nll(model, r, temperature=0.7, has_adapter=True)
    Q = r.query_ids.shape[1]
    for b in range(2):
        pad = int((r.query_mask[b] == 0).sum())
        ids_b = r.input_ids()[b, pad:][None]
        with torch.no_grad():
            pol_b = model(input_ids=ids_b).logits[0]
            with model.disable_adapter():
                ref_b = model(input_ids=ids_b).logits[0]
        want_k1, want_nll = 0.0, 0.0
        for t in range(int(r.response_mask[b].sum())):
            pos, tok = Q - pad + t - 1, r.response_ids[b, t]
            want_k1 += float(torch.log_softmax(pol_b[pos] / 0.7, -1)[tok] - torch.log_softmax(ref_b[pos] / 0.7, -1)[tok])
            want_nll -= float(torch.log_softmax(ref_b[pos], -1)[tok])
        assert k1[b].item() == pytest.approx(want_k1, rel=1e-3, abs=1e-4)
        assert nll[b].item() == pytest.approx(want_nll, rel=1e-4)
        assert k3[b].item() >= 0


def test_evaluate_end_to_end_on_a_tiny_model(tiny, tokenizer, tmp_path):
    from hhh.runs import RunDir

    config = EvalConfig(prompts=["redteam:eval", "benign:eval"], max_prompts=3, samples_per_prompt=2,
                        max_new_tokens=5, batch_size=4)
    run = RunDir.create("eval", config, str(tmp_path / "run"))
    results = evaluate(config, model=tiny, tokenizer=tokenizer, run=run)
    assert set(results) == {"redteam:eval", "benign:eval"}
    m = results["redteam:eval"]
    assert m["n"] == 6 and 0 <= m["toxicity/mean"] <= 1 and m["ppl/base"] > 1 and "kl/per_completion" not in m
    assert m["length/tokens"] <= 5
    from hhh import metrics as M

    assert M.undocumented(m) == []
    saved = json.loads((run.path / "eval.json").read_text())
    assert saved["benign:eval"]["n"] == 6
    rows = [json.loads(line) for line in (run.path / "samples_redteam_eval.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"prompt", "completion", "offensive"} <= set(rows[0])
    # toxicity mean in eval.json is the mean of the per-sample scores
    assert m["toxicity/mean"] == pytest.approx(np.mean([r["offensive"] for r in rows]))
    # the refusal rate is the share of samples the detector flags
    from hhh.rewards.builtin import is_refusal

    assert [r["refusal"] for r in rows] == [is_refusal(r["completion"]) for r in rows]
    assert m["refusal_rate"] == pytest.approx(np.mean([r["refusal"] for r in rows]))


def test_refusal_rate_by_hand():
    from hhh.evaluate import refusal_rate

    assert refusal_rate(["I'm sorry, but I can't help with that.", "Sure, here it is.", "As an AI, no.",
                         "I can't wait!"]) == (0.5, [True, False, True, False])
    assert refusal_rate([]) == (0.0, [])
