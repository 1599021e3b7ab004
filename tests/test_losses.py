import math

import pytest
import torch

from hhh.losses import (
    AdaptiveKL,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logprobs,
    gae,
    global_whiten,
    grpo_advantages,
    grpo_loss,
    hinge_loss,
    ipo_loss,
    kl_per_token,
    kto_kl_baseline,
    kto_loss,
    log1mexp,
    masked_mean,
    masked_whiten,
    orpo_loss,
    output_logprobs,
    ppo_policy_loss,
    reinforce_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    rloo_loss,
    robust_dpo_loss,
    shaped_rewards,
    simpo_loss,
    token_mean,
    value_loss,
)

t = torch.tensor


def test_masked_mean_and_whiten_ignore_masked_entries():
    """x = [1, 2, 3, | 100] with the last masked: mean 2, sample var 1 -> whitened [-1, 0, 1, 0]."""
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_whiten(x, m), t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_kl_estimators_by_hand():
    """log pi = -1, log ref = -2: k1 = 1; k3 = e^(ref - pi) - 1 - (ref - pi) = e^-1 - 1 + 1 = 0.3679."""
    assert kl_per_token(t([-1.0]), t([-2.0]), "k1").item() == pytest.approx(1.0)
    assert kl_per_token(t([-1.0]), t([-2.0]), "k3").item() == pytest.approx(math.exp(-1))
    assert kl_per_token(t([-0.5]), t([-0.5]), "k3").item() == 0.0
    # k3 >= 0 even where k1 < 0
    assert kl_per_token(t([-2.0]), t([-1.0]), "k1").item() == -1.0
    assert kl_per_token(t([-2.0]), t([-1.0]), "k3").item() == pytest.approx(math.e - 2)
    with pytest.raises(ValueError):
        kl_per_token(t([0.0]), t([0.0]), "k2")


def test_shaped_rewards_put_the_score_on_the_last_real_token():
    """beta 0.1. Row 0 (3 tokens): [-0.01, -0.02, -0.03 + 1]. Row 1 (2 tokens, then pad): [-0.05, -0.05 + 2, 0]."""
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = shaped_rewards(t([1.0, 2.0]), kl, mask, beta=0.1)
    torch.testing.assert_close(out, t([[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]]))


def test_gae_by_hand():
    """gamma 1, lambda 0.5, r = [0, 0, 1], V = [0.5, 0.2, 0.4]:
    d2 = 1 - 0.4 = 0.6 -> A2 = 0.6;  d1 = 0.4 - 0.2 = 0.2 -> A1 = 0.2 + 0.5*0.6 = 0.5;
    d0 = 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.5*0.5 = -0.05;  returns = A + V = [0.45, 0.7, 1.0]."""
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]]), torch.ones(1, 3), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([[-0.05, 0.5, 0.6]]))
    torch.testing.assert_close(ret, t([[0.45, 0.7, 1.0]]))


def test_gae_stops_at_eos():
    """mask [1, 1, 0], r = [0, 1, junk], V = [0.5, 0.2, 9]: V after EOS counts as 0.
    d1 = 1 - 0.2 = 0.8 -> A1 = 0.8;  d0 = 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.5*0.8 = 0.1;  A2 = 0."""
    adv, ret = gae(t([[0.0, 1.0, 5.0]]), t([[0.5, 0.2, 9.0]]), t([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, t([[0.1, 0.8, 0.0]]))
    torch.testing.assert_close(ret, t([[0.6, 1.0, 0.0]]))


def slow_gae(rewards, values, mask, gamma, lam):
    """Obviously correct: per row, per timestep, in plain Python."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        for s in range(n):
            total = 0.0
            for k in range(s, n):
                v_next = float(values[b, k + 1]) if k + 1 < n else 0.0
                delta = float(rewards[b, k]) + gamma * v_next - float(values[b, k])
                total += (gamma * lam) ** (k - s) * delta
            adv[b][s] = total
    return torch.tensor(adv)


def test_batched_gae_equals_the_slow_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    lengths = torch.tensor([9, 1, 4, 0, 7])
    mask = (torch.arange(9)[None] < lengths[:, None]).float()
    adv, _ = gae(rewards * mask, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, slow_gae(rewards * mask, values, mask, 0.9, 0.8), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "adv, ratio, loss, clipfrac",
    [
        (1.0, 1.5, -1.2, 1.0),  # good action pushed too far up: clipped at 1 + eps, no gradient
        (1.0, 0.5, -0.5, 0.0),  # good action made less likely: unclipped, pulled back up
        (-1.0, 0.5, 0.8, 1.0),  # bad action pushed too far down: clipped at 1 - eps
        (-1.0, 1.1, 1.1, 0.0),  # bad action inside the trust region: unclipped
    ],
)
def test_ppo_clip_regimes_by_hand(adv, ratio, loss, clipfrac):
    """L = max(-A r, -A clip(r, 0.8, 1.2)); e.g. A = 1, r = 1.5: max(-1.5, -1.2) = -1.2."""
    old = t([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    out, cf, approx_kl = ppo_policy_loss(logp, old, t([[adv]]), torch.ones(1, 1), clip=0.2)
    assert out.item() == pytest.approx(loss)
    assert cf.item() == clipfrac
    assert approx_kl.item() == pytest.approx(0.5 * math.log(ratio) ** 2)
    out.backward()
    assert (logp.grad.abs().item() == 0.0) == (clipfrac == 1.0)


def test_ppo_loss_ignores_tokens_after_eos():
    old, adv = t([[-1.0, -1.0, -1.0]]), t([[1.0, -1.0, 50.0]])
    a, _, _ = ppo_policy_loss(t([[-1.0, -1.0, 3.0]]), old, adv, t([[1.0, 1.0, 0.0]]))
    b, _, _ = ppo_policy_loss(t([[-1.0, -1.0, -9.0]]), old, adv, t([[1.0, 1.0, 0.0]]))
    assert a.item() == b.item() == pytest.approx(0.0)


def test_value_loss_by_hand():
    """V = 1, V_old = 0.5, R = 2, eps 0.2: clip(V) = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69 -> 0.845, clipped.
    V = 0.6, V_old = 0.5, R = 0: inside the clip, 0.5 * 0.36 = 0.18."""
    loss, frac = value_loss(t([[1.0]]), t([[0.5]]), t([[2.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.845) and frac.item() == 1.0
    loss, frac = value_loss(t([[0.6]]), t([[0.5]]), t([[0.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.18) and frac.item() == 0.0


def test_token_mean_over_micro_batches_equals_the_whole_batch():
    x, m = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
    n = m.sum()
    parts = token_mean(x[:1], m[:1], n) + token_mean(x[1:], m[1:], n)
    assert parts.item() == pytest.approx(masked_mean(x, m).item(), abs=1e-6)


def test_entropy_by_hand():
    """logits [0, ln 3] -> p = [1/4, 3/4] -> H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623; uniform over 4 -> ln 4."""
    logp = torch.log_softmax(t([0.0, math.log(3)]), -1)
    assert entropy_from_logprobs(logp).item() == pytest.approx(0.5623, abs=1e-4)
    assert entropy_from_logprobs(torch.log_softmax(torch.zeros(4), -1)).item() == pytest.approx(math.log(4))


def test_output_logprobs_by_hand():
    """W = I (V = H = 3), h = [0, ln 2, ln 3], T 1: p = [1/6, 2/6, 3/6]; target 2 -> log p = ln 1/2;
    H = 1/6 ln 6 + 1/3 ln 3 + 1/2 ln 2 = 1.01140; d log p_2 / dh = (onehot - p) W = [-1/6, -1/3, 1/2];
    at T 2, z = h / 2 and the gradient gains the factor 1/2."""
    h = t([[0.0, math.log(2), math.log(3)]], requires_grad=True)
    logp, ent = output_logprobs(h, torch.eye(3), t([2]), entropy=True)
    assert logp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert ent.item() == pytest.approx(1.01140, abs=1e-5)
    logp.sum().backward()
    assert h.grad.tolist()[0] == pytest.approx([-1 / 6, -1 / 3, 1 / 2], abs=1e-6)
    h.grad = None
    logp2, _ = output_logprobs(h, torch.eye(3), t([2]), temperature=2.0)
    p = torch.softmax(h.detach()[0] / 2, -1)
    assert logp2.item() == pytest.approx(math.log(p[2]), abs=1e-6)
    logp2.sum().backward()
    assert h.grad.tolist()[0] == pytest.approx(((torch.eye(3)[2] - p) / 2).tolist(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_logprobs_equal_the_plain_log_softmax(monkeypatch, dtype):
    """Chunks of 3 rows over 11 positions (a remainder chunk): log-probs, entropies and the gradient of a loss
    that mixes both equal log_softmax(F.linear(h, W).float() / T) and entropy_from_logprobs of it."""
    import hhh.losses

    monkeypatch.setattr(hhh.losses, "_CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g).to(dtype)
    h0 = torch.randn(1, 11, 8, generator=g).to(dtype)
    y = torch.randint(0, 50, (1, 11), generator=g)
    a, b = torch.randn(1, 11, generator=g), torch.randn(1, 11, generator=g)
    h1, h2 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    plain_all = torch.log_softmax(torch.nn.functional.linear(h1, w).float() / 0.7, -1)
    plain, plain_ent = plain_all.gather(-1, y[..., None]).squeeze(-1), entropy_from_logprobs(plain_all)
    fused, fused_ent = output_logprobs(h2, w, y, 0.7, entropy=True)
    assert fused.dtype == fused_ent.dtype == torch.float32
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_ent, plain_ent, atol=1e-5, rtol=1e-5)
    ((a * plain).sum() + (b * plain_ent).sum()).backward()
    ((a * fused).sum() + (b * fused_ent).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), atol=tol, rtol=tol)
    h1.grad = h2.grad = None  # the log-probs alone (the entropy's gradient absent, as under entropy="measure")
    plain = torch.log_softmax(torch.nn.functional.linear(h1, w).float() / 0.7, -1).gather(-1, y[..., None])
    (a * plain.squeeze(-1)).sum().backward()
    fused, ent = output_logprobs(h2, w, y, 0.7, entropy=True)
    (a * fused).sum().backward()
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), atol=tol, rtol=tol)


def test_output_logprobs_refuses_a_trainable_output_layer():
    with pytest.raises(ValueError, match="output layer must be frozen"):
        output_logprobs(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))


def test_adaptive_kl_by_hand():
    """beta 0.1, target 6, horizon 10000, 100 samples: KL 12 -> e = clip(1, 0.2) = 0.2 -> 0.1 * 1.002;
    KL 3 -> e = clip(-0.5) = -0.2 -> 0.1 * 0.998."""
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1002)
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    assert ctl.update(3.0, 100) == pytest.approx(0.0998)
    fixed = AdaptiveKL(0.1)
    assert fixed.update(100.0, 100) == 0.1


def test_bradley_terry_by_hand():
    """d = r_c - r_r = 1: -log sigma(1) = log(1 + e^-1) = 0.31326; d = -2: log(1 + e^2) = 2.12693. Mean 1.22010."""
    loss = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 2.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2, abs=1e-6)


def test_bradley_terry_margin_tie_and_centring_by_hand():
    """Margin 1 on d = 1: -log sigma(0) = log 2. A tie at d = 1: (log(1+e^-1) + log(1+e)) / 2 = (0.31326 + 1.31326)/2
    = 0.81326; a tie is least at d = 0 (log 2), and its margin is ignored.
    Centring 0.1 with r_c + r_r = 3: + 0.1 * 9 = 0.9."""
    assert bradley_terry_loss(t([2.0]), t([1.0]), margin=t([1.0])).item() == pytest.approx(math.log(2))
    tied = bradley_terry_loss(t([2.0]), t([1.0]), margin=t([5.0]), tie=t([True]))
    assert tied.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    assert bradley_terry_loss(t([1.0]), t([1.0]), tie=t([True])).item() == pytest.approx(math.log(2))
    centred = bradley_terry_loss(t([2.0]), t([1.0]), center_coef=0.1)
    assert centred.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.9)


def test_bradley_terry_gradient_pushes_chosen_up():
    r_c, r_r = t([0.0], requires_grad=True), t([0.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    assert r_c.grad.item() == pytest.approx(-0.5) and r_r.grad.item() == pytest.approx(0.5)  # -(1 - sigma(0))


# pi_c = -1, pi_r = -2, ref_c = ref_r = -1.5: h = (-1 + 1.5) - (-2 + 1.5) = 1; beta = 0.1 -> z = 0.1
PREF = (t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]))


def test_dpo_by_hand_and_log_2_when_the_policy_is_the_reference():
    """-log sigma(0.1) = log(1 + e^-0.1) = 0.644397; at step 0 pi = ref, h = 0: log 2."""
    assert dpo_loss(*PREF, beta=0.1).item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)
    same = t([-3.0, -7.0])
    assert dpo_loss(same, t([-4.0, -1.0]), same, t([-4.0, -1.0])).item() == pytest.approx(math.log(2))


def test_cdpo_and_robust_dpo_by_hand():
    """-log sigma(-z) = -log sigma(z) + z = 0.744397.
    cDPO eps 0.1: 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397.
    robust eps 0.1: (0.9 * 0.644397 - 0.1 * 0.744397) / 0.8 = 0.631897."""
    a, b = math.log1p(math.exp(-0.1)), math.log1p(math.exp(0.1))
    assert dpo_loss(*PREF, beta=0.1, label_smoothing=0.1).item() == pytest.approx(0.9 * a + 0.1 * b, abs=1e-6)
    assert robust_dpo_loss(*PREF, beta=0.1, eps=0.1).item() == pytest.approx((0.9 * a - 0.1 * b) / 0.8, abs=1e-6)
    assert robust_dpo_loss(*PREF, beta=0.1, eps=0.0).item() == pytest.approx(a, abs=1e-6)
    with pytest.raises(ValueError):
        robust_dpo_loss(*PREF, eps=0.5)


def test_ipo_and_hinge_by_hand():
    """IPO: (h - 1/(2 beta))^2 = (1 - 5)^2 = 16. Hinge: max(0, 1 - 0.1 * 1) = 0.9; with beta 2: max(0, -1) = 0."""
    assert ipo_loss(*PREF, beta=0.1).item() == pytest.approx(16.0)
    assert hinge_loss(*PREF, beta=0.1).item() == pytest.approx(0.9)
    assert hinge_loss(*PREF, beta=2.0).item() == 0.0


def test_simpo_and_orpo_by_hand():
    """SimPO: mean log-probs -0.5 and -1, beta 2, gamma 1: -log sigma(2 * 0.5 - 1) = log 2.
    ORPO: P_w = 0.5 (odds 1, log odds 0), P_l = 0.25 (odds 1/3): -log sigma(log 3) = log(4/3) = 0.287682;
    NLL 2 + 0.1 * 0.287682 = 2.0287682."""
    assert simpo_loss(t([-0.5]), t([-1.0]), beta=2.0, gamma=1.0).item() == pytest.approx(math.log(2))
    orpo = orpo_loss(t([math.log(0.5)]), t([math.log(0.25)]), t([2.0]), lam=0.1)
    assert orpo.item() == pytest.approx(2.0 + 0.1 * math.log(4 / 3), abs=1e-6)


def test_orpo_keeps_its_gradient_when_the_chosen_answer_is_near_certain():
    """Mean log-prob m_w = -1e-7 (P_w ~ 1): log odds(m) = m - log(1 - e^m), d/dm = 1 / (1 - e^m) ~ 1e7.
    With m_l = -1: lo_w = -1e-7 - log(1e-7) = 16.118096, lo_l = -1 - log(1 - e^-1) = -0.541325, d = 16.659421;
    dL/dm_w = -lam * (1 - sigma(d)) / (1 - e^m_w) = -0.1 * 5.8217e-8 * 1e7 = -0.058217 (a clamp at -1e-6 gave 0)."""
    m_w = t([-1e-7], requires_grad=True)
    orpo_loss(m_w, t([-1.0]), t([0.0]), lam=0.1).backward()
    d = (-1e-7 - math.log(-math.expm1(-1e-7))) - (-1 - math.log(1 - math.exp(-1)))
    expected = -0.1 * (1 - 1 / (1 + math.exp(-d))) / -math.expm1(-1e-7)
    assert m_w.grad.item() == pytest.approx(expected, rel=1e-3) and expected == pytest.approx(-0.058217, rel=1e-3)


def test_log1mexp_matches_float64_on_both_branches():
    """log(1 - e^x) at x = -1e-6 (log(9.999995e-7) = -13.815511), -0.5, -log 2 (log 1/2) and -30 (-e^-30)."""
    x = t([-1e-6, -0.5, -math.log(2), -30.0])
    expected = t([math.log(-math.expm1(v)) for v in (-1e-6, -0.5, -math.log(2))] + [-math.exp(-30.0)])
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-6, atol=1e-12)
    assert torch.isfinite(log1mexp(t([0.0]))).all()


def test_kto_by_hand():
    """r = pi - ref = [1, 0.5]; first desirable, second not; z0 = 0.2, beta 1:
    1 - sigma(0.8) = 0.310026 ; 1 - sigma(0.2 - 0.5) = 1 - sigma(-0.3) = 0.574443 ; mean 0.442234."""
    loss = kto_loss(t([-1.0, -1.0]), t([-2.0, -1.5]), t([True, False]), t(0.2), beta=1.0)
    expected = ((1 - 1 / (1 + math.exp(-0.8))) + (1 - 1 / (1 + math.exp(0.3)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert kto_kl_baseline(t([-1.0, -2.0]), t([-1.3, -1.9])).item() == pytest.approx(0.1)  # mean(0.3, -0.1)
    assert kto_kl_baseline(t([-2.0]), t([-1.0])).item() == 0.0  # clamped at 0
    pi = t([-1.0], requires_grad=True)
    assert not kto_kl_baseline(pi, t([-2.0])).requires_grad  # detached


def test_grpo_advantages_are_zero_when_a_group_agrees():
    """Groups [1, 2, 3] (mean 2, sample std 1) and [5, 5, 5]: [-1, 0, 1] / (1 + 1e-4) and zeros."""
    adv = grpo_advantages(t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    torch.testing.assert_close(adv, t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-4))
    torch.testing.assert_close(grpo_advantages(t([1.0, 2.0, 3.0]), 3, scale=False), t([-1.0, 0.0, 1.0]))


def test_rloo_and_reinforce_pp_advantages_by_hand():
    """RLOO on [1, 2, 3]: baselines 2.5, 2, 1.5 -> [-1.5, 0, 1.5] = 3/2 * (r - mean). Global whitening: [-1, 0, 1]."""
    torch.testing.assert_close(rloo_advantages(t([1.0, 2.0, 3.0]), 3), t([-1.5, 0.0, 1.5]))
    torch.testing.assert_close(rloo_advantages(t([4.0, 4.0]), 2), t([0.0, 0.0]))
    torch.testing.assert_close(global_whiten(t([1.0, 2.0, 3.0])), t([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        rloo_advantages(t([1.0]), 1)


def test_grpo_loss_clipping_kl_and_aggregation_by_hand():
    """One token with ratio 1.5 and A = 1: max(-1.5, -1.2) = -1.2. k3 with ref/pi = 0.5: 0.5 - 1 + log 2 = 0.193147,
    times beta 0.1. Aggregation: sequences of 1 and 3 tokens with A = 1 and -1 (ratio 1): per-token -1 and +1;
    token mean (-1 + 3) / 4 = 0.5, sequence mean (-1 + 1) / 2 = 0."""
    one = t([[0.0]])
    loss, clipfrac, _ = grpo_loss(t([[math.log(1.5)]]), one, t([[math.log(1.5)]]), t([1.0]), t([[1.0]]), beta=0.0)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0
    loss, _, kl = grpo_loss(one, one, t([[math.log(0.5)]]), t([0.0]), t([[1.0]]), beta=0.1)
    assert kl.item() == pytest.approx(0.5 - 1 + math.log(2)) and loss.item() == pytest.approx(0.1 * kl.item())
    logp = torch.zeros(2, 3)
    mask = t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    tok, _, _ = grpo_loss(logp, logp, logp, t([1.0, -1.0]), mask, beta=0.0, aggregation="token")
    seq, _, _ = grpo_loss(logp, logp, logp, t([1.0, -1.0]), mask, beta=0.0, aggregation="sequence")
    assert tok.item() == pytest.approx(0.5) and seq.item() == pytest.approx(0.0)


def test_reinforce_loss_by_hand():
    """Sequence log-probs -1 + -2 = -3 and -0.5 (second token masked); A = [1, -2]: -(1 * -3 + -2 * -0.5) / 2 = 1."""
    loss = reinforce_loss(t([[-1.0, -2.0], [-0.5, -9.0]]), t([1.0, -2.0]), t([[1.0, 1.0], [1.0, 0.0]]))
    assert loss.item() == pytest.approx(1.0)


def test_reinforce_pp_advantages_by_hand():
    """Two completions, 3 and 2 tokens; scores 1 and 0; per-token k1 KL [0.1, 0.2, 0.3] and [0.5, 0.5]; beta 1.
    Return from token t = score - sum of the KL still to come:  [1 - 0.6, 1 - 0.5, 1 - 0.3] = [0.4, 0.5, 0.7] and
    [0 - 1.0, 0 - 0.5] = [-1.0, -0.5]. Whitened over the 5 tokens: mean 0.02, squared deviations
    0.1444 + 0.2304 + 0.4624 + 1.0404 + 0.2704 = 2.148, sample std sqrt(2.148 / 4) = 0.732803:
    [0.518557, 0.655019, 0.927944, -1.391916, -0.709604] (and 0 on the padding)."""
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    adv = reinforce_pp_advantages(t([1.0, 0.0]), kl, mask, beta=1.0)
    returns = [0.4, 0.5, 0.7, -1.0, -0.5]
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 4)
    expected = [(x - mean) / std for x in returns]
    torch.testing.assert_close(adv, t([expected[:3], expected[3:] + [0.0]]), atol=1e-5, rtol=0)
    assert expected[0] == pytest.approx(0.518557, abs=1e-5)
    # beta = 0: every token of a completion carries its score; whitening is across tokens, so the 3-token
    # completion weighs 3/5: returns [1, 1, 1, 0, 0], mean 0.6, std sqrt(0.3) -> 0.730297 and -1.095445
    flat = reinforce_pp_advantages(t([1.0, 0.0]), kl, mask, beta=0.0)
    torch.testing.assert_close(flat[0], t([0.730297] * 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat[1, :2], t([-1.095445] * 2), atol=1e-5, rtol=0)


def test_rloo_loss_clips_and_matches_reinforce_on_policy():
    """On-policy (ratio 1): loss -sum_i A_i * len_i / B, and the same gradient as REINFORCE's -A_i sum_t log pi.
    Off-policy, A = 1 and ratio 1.5 on one token: clipped at 1.2 -> loss -1.2, clip fraction 1;
    A = -1 and ratio 0.5: max(0.5, 0.8) = 0.8 (the clipped, pessimistic term)."""
    logp = t([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    adv, mask = t([1.0, -2.0]), t([[1.0, 1.0], [1.0, 0.0]])
    loss, clipfrac = rloo_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(1 * 2 + -2 * 1) / 2) and clipfrac.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    (expected,) = torch.autograd.grad(reinforce_loss(logp, adv, mask), logp)
    torch.testing.assert_close(grad, expected)
    loss, clipfrac = rloo_loss(t([[math.log(1.5)]]), t([[0.0]]), t([1.0]), t([[1.0]]), clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0
    loss, _ = rloo_loss(t([[math.log(0.5)]]), t([[0.0]]), t([-1.0]), t([[1.0]]), clip=0.2)
    assert loss.item() == pytest.approx(0.8)
    half, _ = rloo_loss(logp[:1], logp[:1].detach(), adv[:1], mask[:1], n_seqs=2)
    assert half.item() == pytest.approx(-1.0)  # a micro-batch's share of a 2-sequence minibatch


def test_sft_loss_is_the_token_mean_nll_of_the_response_by_hand():
    """logp = [[-1, -2, -9], [-3, -9, -9]], mask = [[1, 1, 0], [1, 0, 0]]: NLL of the 3 response tokens is
    1 + 2 + 3 = 6, mean 2; masked positions (the -9s: padding, or prompt tokens) add nothing. As two micro-batches
    with n_tokens = 3: 3/3 + 3/3 = 2, the same."""
    from hhh.losses import sft_loss

    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = sft_loss(logp, mask)
    assert float(loss.detach()) == pytest.approx(2.0)
    loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, -mask.float() / 3)  # no gradient reaches a masked token
    parts = sft_loss(logp[:1], mask[:1], n_tokens=3) + sft_loss(logp[1:], mask[1:], n_tokens=3)
    assert float(parts.detach()) == pytest.approx(2.0)


def test_dpo_loss_with_per_pair_soft_labels_by_hand():
    """Margins h = [1, -1] at beta 1 and soft labels P(chosen better) = [1.0, 0.75], i.e. eps = [0, 0.25]:
    pair 1: -log sigma(1) = 0.31326; pair 2: 0.75 * -log sigma(-1) + 0.25 * -log sigma(1) = 0.75 * 1.31326 +
    0.25 * 0.31326 = 1.06326; mean 0.68826. A scalar eps applies to every pair as before."""
    from hhh.losses import dpo_loss

    pc, pr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    zero = torch.zeros(2)
    loss = dpo_loss(pc, pr, zero, zero, beta=1.0, label_smoothing=torch.tensor([0.0, 0.25]))
    assert float(loss) == pytest.approx((0.313262 + 1.063262) / 2, abs=1e-5)
    same = dpo_loss(pc, pr, zero, zero, beta=1.0, label_smoothing=torch.tensor([0.25, 0.25]))
    assert float(same) == pytest.approx(float(dpo_loss(pc, pr, zero, zero, beta=1.0, label_smoothing=0.25)))


def test_distill_loss_by_hand():
    """One answer token, V = 2, target token 0; teacher logits [0, 0] -> p_T = [0.5, 0.5] at any temperature;
    student logits [ln 3, 0] -> p_S = [0.75, 0.25] at tau = 1.
      tau = 1: KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841; CE = -ln 0.75 = 0.287682;
               alpha = 0.5: 0.5 * 0.143841 + 0.5 * 0.287682 = 0.215762
      tau = 2: p_S = softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1) = [0.633975, 0.366025];
               KL = 0.5 ln(0.5/0.633975) + 0.5 ln(0.5/0.366025) = 0.037252, times tau^2 = 0.149009;
               CE is taken at tau = 1: 0.287682; alpha = 0.5: 0.218346
    A second, masked token (any values) changes nothing."""
    from hhh.losses import distill_loss

    student = torch.tensor([[[math.log(3.0), 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-9.0, 9.0]]])
    targets, mask = torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]])
    assert float(distill_loss(student, teacher, targets, mask, temperature=1.0, alpha=0.5)) == pytest.approx(0.215762,
                                                                                                             abs=1e-6)
    assert float(distill_loss(student, teacher, targets, mask, temperature=2.0, alpha=0.5)) == pytest.approx(0.218346,
                                                                                                             abs=1e-6)
    assert float(distill_loss(student, teacher, targets, mask, temperature=1.0, alpha=1.0)) == pytest.approx(0.143841,
                                                                                                             abs=1e-6)
    assert float(distill_loss(teacher, teacher, targets, mask, alpha=1.0)) == pytest.approx(0.0, abs=1e-7)
