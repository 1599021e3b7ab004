import pytest
import torch

from hhh.models import tiny_causal_lm
from hhh.rollout import left_pad, positions, response_logprobs, sample
from tests.conftest import with_eos_bias

PROMPTS = ["Say hello.", "Write one word about the sea, please, right now.", "Hi"]


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_logprobs_equal_a_fresh_forward_pass(tiny, tokenizer):
    model = with_eos_bias(tiny, tokenizer.eos_token_id, 6.3)
    g = torch.Generator().manual_seed(0)
    r = sample(model, tokenizer, PROMPTS * 2, max_new_tokens=12, temperature=0.7, generator=g)
    fresh = response_logprobs(model, r.query_ids, r.query_mask, r.response_ids, r.response_mask, temperature=0.7)
    torch.testing.assert_close(fresh, r.logprobs, atol=1e-4, rtol=1e-4)
    at_one = response_logprobs(model, r.query_ids, r.query_mask, r.response_ids, r.response_mask, temperature=1.0)
    torch.testing.assert_close(at_one, r.logprobs_t1, atol=1e-4, rtol=1e-4)
    # sampling builds no autograd graph, whoever calls it (a graph over every decoding step took 23 GB in eval)
    assert any(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()
    assert not r.logprobs.requires_grad and not r.logprobs_t1.requires_grad


def test_masks_stop_at_eos_and_ignore_everything_after(tiny, tokenizer):
    model = with_eos_bias(tiny, tokenizer.eos_token_id, 6.3)
    r = sample(model, tokenizer, PROMPTS * 4, max_new_tokens=16, generator=torch.Generator().manual_seed(1))
    eos = tokenizer.eos_token_id
    assert r.ended.any() and not r.ended.all(), "the EOS bias should end some completions and not others"
    for ids, mask, lp, ended in zip(r.response_ids, r.response_mask, r.logprobs, r.ended, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any(), "mask is 1 then 0"
        if ended:
            assert ids[n - 1] == eos, "the mask includes the EOS token"
            assert (ids[:n - 1] != eos).all()
            assert (ids[n:] == tokenizer.pad_token_id).all()
        else:
            assert n == r.response_ids.shape[1]
        assert (lp[n:] == 0).all() and (lp[:n] < 0).all()


def test_same_seed_same_samples(tiny, tokenizer):
    a = sample(tiny, tokenizer, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    b = sample(tiny, tokenizer, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    c = sample(tiny, tokenizer, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_sampling_follows_the_tempered_distribution(tokenizer):
    """Inverse-CDF sampling: empirical frequencies of the first token match softmax(logits / T)."""
    from hhh.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, seed=2)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1] / 0.5, -1)
    top = probs.argmax()
    r = sample(model, tokenizer, ["x"] * 400, max_new_tokens=1, temperature=0.5, generator=torch.Generator().manual_seed(0))
    freq = (r.response_ids[:, 0] == top).float().mean()
    assert abs(freq - probs[top]) < 4 * (probs[top] * (1 - probs[top]) / 400) ** 0.5 + 1e-3


def test_prompt_longer_than_context_is_a_clear_error(tiny, tokenizer):
    long = "word " * 600  # tiny model context is 512
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*context of 512"):
        sample(tiny, tokenizer, ["ok", long], max_new_tokens=8)


def test_temperature_must_be_positive(tiny, tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        sample(tiny, tokenizer, ["ok"], temperature=0.0)


def test_a_group_shares_one_prefill_and_samples_what_a_full_prefill_samples(tokenizer):
    """Prompts repeated in runs of G (GRPO/RLOO groups) are prefilled once and the KV cache repeated G times: the
    same tokens for the same seed as prefilling every row, log-probs equal within float noise."""
    model = with_eos_bias(tiny_causal_lm(tokenizer, seed=0), tokenizer.eos_token_id, 3.0)
    prompts = [p for p in ("Tell me a story", "Why is the sky blue? Be brief.", "hi") for _ in range(4)]
    runs = {share: sample(model, tokenizer, prompts, max_new_tokens=12, temperature=1.0, share_prefill=share,
                          generator=torch.Generator().manual_seed(3)) for share in (True, False)}
    shared, full = runs[True], runs[False]
    assert shared.prefilled == 3 and full.prefilled == 12
    assert torch.equal(shared.response_ids, full.response_ids) and torch.equal(shared.query_ids, full.query_ids)
    assert len(set(shared.texts)) > 3  # the samples of a group differ: only the prompt was shared
    torch.testing.assert_close(shared.logprobs, full.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.logprobs_t1, full.logprobs_t1, rtol=0, atol=1e-5)
    # not in runs of equal length: every row is prefilled
    odd = sample(model, tokenizer, ["a", "a", "b"], max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert odd.prefilled == 3


@pytest.mark.parametrize("share", [True, False])
def test_the_hidden_states_entering_a_layer_while_sampling_are_the_trunk_of_the_sampled_rows(tokenizer, share):
    """sample(trunk_layer=...) keeps what entered that layer at every position (Rollout.trunk): the frozen trunk of
    one forward over prompt + response (Policy._trunk) at every real position but the last column, whose token is
    never fed back (zeros there), with a group's prefill shared or not. The model runs once for the prefill and
    once per sampled token but the last."""
    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy

    model = with_eos_bias(tiny_causal_lm(tokenizer, layers=3, seed=0), tokenizer.eos_token_id, 6.3)
    policy = build_policy(model, LoraSettings(r=4, top_layers=1))
    assert policy.split == 2
    prompts = [p for p in PROMPTS for _ in range(3)]
    calls: list[int] = []
    hook = policy.lm.get_base_model().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    r = sample(policy.lm, tokenizer, prompts, max_new_tokens=10, temperature=1.0, share_prefill=share,
               generator=torch.Generator().manual_seed(2), trunk_layer=policy.trunk_layer)
    hook.remove()
    (B, Q), R = r.query_ids.shape, r.response_ids.shape[1]
    assert r.ended.any() and not r.ended.all() and len(calls) == R  # prefill + R - 1 tokens fed
    assert r.trunk is not None and r.trunk.shape == (B, Q + R, 64) and not r.trunk.requires_grad
    real = r.tokens.mask().bool()
    real[:, -1] = False
    torch.testing.assert_close(r.trunk[real], policy._trunk(r.tokens)[real], atol=1e-5, rtol=1e-5)
    assert (r.trunk[:, -1] == 0).all()
    again = sample(policy.lm, tokenizer, prompts, max_new_tokens=10, temperature=1.0, share_prefill=share,
                   generator=torch.Generator().manual_seed(2))
    assert again.trunk is None and torch.equal(again.response_ids, r.response_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_output_layer_is_one_matmul_for_frozen_weights_too(tokenizer, dtype):
    """The prefill keeps the logits of the last position only, a training pass those of the response: that slice of
    the hidden states reaches the output layer as a contiguous copy. A strided view would make torch's matmul,
    for weights that need no gradient (a frozen base, a merged copy), run a bmm over B copies of the vocabulary
    matrix: in bf16 0.8 s per prefill at batch 16 on the bundled model (bench/sampler_dtype.py)."""
    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy

    model = tiny_causal_lm(tokenizer).to(dtype).requires_grad_(False)
    policy = build_policy(tiny_causal_lm(tokenizer).to(dtype), LoraSettings(r=4))
    with torch.profiler.profile() as prof:
        r = sample(model, tokenizer, PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
        response_logprobs(model, r.query_ids, r.query_mask, r.response_ids, r.response_mask)
        with policy.merged():
            sample(policy.lm, tokenizer, PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
        policy(r.tokens, temperature=0.7).logprobs.sum().backward()
    ops = {e.name for e in prof.events()}
    assert "aten::mm" in ops and "aten::bmm" not in ops
