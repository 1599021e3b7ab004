import json

import pytest
import torch

from hhh import metrics as M
from hhh.config import PPOConfig
from hhh.models import tiny_causal_lm
from hhh.runs import RunDir
from hhh.train.ppo import train as train_ppo
from tests import toy_rewards
from tests.conftest import with_eos_bias

TOY = dict(prompts="redteam:train", reward="tests.toy_rewards:hello", second_scorer="length:8",
           batch_size=16, minibatch_size=8, micro_batch_size=8, max_new_tokens=6, lr=1e-2, lora_r=8,
           lora_alpha=16, val_prompts=4, val_every=3, checkpoint_every=2, ent_coef=0.0, kl_coef=0.01)


def hello_model(tokenizer, seed=0):
    """A tiny random model that says ' hello' ~15% of the time: something PPO can reinforce."""
    return with_eos_bias(tiny_causal_lm(tokenizer, seed=seed), tokenizer.convert_tokens_to_ids("Ġhello"), 6.3)


def run_ppo(tokenizer, tmp_path, name, resume=False, **overrides):
    config = PPOConfig(**{**TOY, **overrides, "out": str(tmp_path / name)})
    run = RunDir(config.out) if resume else RunDir.create("ppo", config, config.out)
    result = train_ppo(config, run, base=hello_model(tokenizer), tokenizer=tokenizer, resume=resume)
    return run, result


@pytest.mark.parametrize("sampler_dtype", ["weights", "bfloat16"])
def test_kl_is_exactly_zero_at_the_first_step(tokenizer, tmp_path, sampler_dtype):
    """PPO's old log-probs always come from the training forward: after a bf16 sampler too (whose own log-probs
    are off by bf16 rounding), the first step's KL is exactly 0."""
    run, _ = run_ppo(tokenizer, tmp_path, "a", steps=1, sampler_dtype=sampler_dtype)
    first = run.metrics()[0]
    assert first["kl/k1"] == 0.0 and first["kl/k3"] == 0.0
    assert first["policy/approxkl"] >= 0


def test_ppo_raises_a_simple_reward_and_beta_adapts_up(tokenizer, tmp_path):
    run, result = run_ppo(tokenizer, tmp_path, "learn", steps=24, batch_size=32, minibatch_size=16,
                          micro_batch_size=16, kl_target=1.0, kl_horizon=100)
    m = run.metrics()
    early = sum(x[M.REWARD_MEAN] for x in m[:3]) / 3
    late = sum(x[M.REWARD_MEAN] for x in m[-3:]) / 3
    assert late > early + 0.2, (early, late)
    assert m[-1]["kl/k1"] > 1.0 and m[-1]["kl/beta"] > 0.01, "KL above target: beta must grow"
    assert result.summary["best_step"] is not None and (run.path / "best" / "adapter_config.json").is_file()
    # the final adapter loads with plain PEFT
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(hello_model(tokenizer), str(run.path / "adapter"))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def test_beta_adapts_down_below_target(tokenizer, tmp_path):
    run, _ = run_ppo(tokenizer, tmp_path, "down", steps=3, kl_target=50.0, kl_horizon=100)
    assert run.metrics()[-1]["kl/beta"] < 0.01


def test_every_step_logs_the_documented_metrics(tokenizer, tmp_path):
    run, _ = run_ppo(tokenizer, tmp_path, "names", steps=1)
    m = run.metrics()[0]
    for key in ("reward/mean", "reward/shaped_mean", "kl/k1", "kl/k3", "kl/beta", "policy/entropy", "policy/clipfrac",
                "policy/approxkl", "loss/policy", "loss/value", "length/tokens", "eos_rate", "time/step_s",
                "second/mean", "distinct_2", "repetition_3", "alarms"):
        assert key in m, key
    assert M.undocumented(m) == []


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tokenizer, tmp_path):
    straight, _ = run_ppo(tokenizer, tmp_path, "straight", steps=5)
    toy_rewards.CALLS.update(n=0, interrupt_at=2)  # Ctrl-C during step 2
    cut, result = run_ppo(tokenizer, tmp_path, "cut", steps=5, reward="tests.toy_rewards:hello_then_ctrl_c")
    assert result.stopped == "interrupted" and result.summary["steps"] == 2
    assert json.loads((cut.path / "checkpoints" / "last" / "state.json").read_text())["step"] == 2
    toy_rewards.CALLS.update(n=0, interrupt_at=None)
    _, resumed = run_ppo(tokenizer, tmp_path, "cut", resume=True, steps=5,
                         reward="tests.toy_rewards:hello_then_ctrl_c")
    assert resumed.summary["steps"] == 5

    def strip(ms):
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]

    assert strip(cut.metrics()) == strip(straight.metrics())


def test_gradient_accumulation_equals_one_big_batch(tokenizer):
    """One minibatch of 8 as 1 micro-batch of 8 or 8 of 1: the same gradient. Plain SGD with lr 1
    turns the gradient into the weight change (Adam would amplify float noise in near-zero gradients)."""
    from hhh.losses import gae, masked_whiten
    from hhh.models import LoraSettings
    from hhh.models.critic import Critic
    from hhh.models.policy import build_policy
    from hhh.rollout import sample
    from hhh.train.loop import linear_decay
    from hhh.train.ppo import old_passes, ppo_update

    changes = []
    for micro in (8, 1):
        config = PPOConfig(**{**TOY, "batch_size": 8, "minibatch_size": 8, "micro_batch_size": micro,
                              "ppo_epochs": 1, "ent_coef": 0.01, "max_grad_norm": 1e9})
        policy = build_policy(hello_model(tokenizer), LoraSettings(r=4, alpha=8))
        critic = Critic(policy)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        r = sample(policy.lm, tokenizer, ["a", "bb", "ccc", "d d", "e", "f f f", "g", "h"], max_new_tokens=6,
                   generator=torch.Generator().manual_seed(0))
        tokens = r.tokens
        old = old_passes(policy, critic, tokens, config)
        mask = r.response_mask.float()
        adv, ret = gae(torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask, old.values, mask)
        params = dict(policy.named_parameters()) | {f"head.{n}": p for n, p in critic.named_parameters()}
        before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        opt = torch.optim.SGD(policy.trainable_parameters() + critic.trainable_parameters(), lr=1.0)
        ppo_update(policy, critic, opt, linear_decay(opt, 10), tokens, old, masked_whiten(adv, mask), ret, config,
                   torch.Generator().manual_seed(0))
        changes.append({n: params[n].detach() - before[n] for n in before})
    assert any(c.abs().max() > 1e-4 for c in changes[0].values())
    assert any(n.startswith("head.") for n in changes[0])
    for n in changes[0]:
        torch.testing.assert_close(changes[0][n], changes[1][n], atol=1e-6, rtol=1e-4)


def _perturbed(policy, critic=None):
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
        if critic is not None:
            critic.head.weight.normal_(0, 0.3)


def test_frozen_trunk_gives_the_full_forward_exactly(tokenizer):
    """Inside frozen_trunk, passes over the batch or rows of it run only the adapted top layers on the cached
    trunk: log-probs, entropy, values and reference log-probs equal those of full passes."""
    from hhh.models import LoraSettings
    from hhh.models.critic import Critic
    from hhh.models.policy import build_policy
    from hhh.rollout import Tokens

    policy = build_policy(tiny_causal_lm(tokenizer, layers=4), LoraSettings(r=4, top_layers=2))
    critic = Critic(policy)
    assert policy.split == 2
    _perturbed(policy, critic)
    q, r = torch.randint(5, 500, (3, 6)), torch.randint(5, 500, (3, 5))
    qm, rm = torch.ones_like(q), torch.ones_like(r)
    qm[0, :2], rm[1, 3:] = 0, 0
    batch = Tokens(q, qm, r, rm)
    full = policy(batch, temperature=0.7, entropy="train", hidden=True)
    full_ref = policy.reference_logprobs(batch, temperature=0.7)
    calls = []
    hook = policy.lm.get_base_model().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with policy.frozen_trunk(batch, micro_batch_size=2):
        assert len(calls) == 2  # the trunk: once per micro-batch of the batch, at entry
        top = policy(batch, temperature=0.7, entropy="train", hidden=True)
        rows = policy(batch[torch.tensor([2, 0])], temperature=0.7)
        ref = policy.reference_logprobs(batch[1:], temperature=0.7)
        assert len(calls) == 2  # nothing after it ran the frozen layers
    hook.remove()
    for a, b in ((full.logprobs, top.logprobs), (full.entropy, top.entropy), (full.hidden, top.hidden)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(critic.values(batch, full), critic.values(batch, top))
    torch.testing.assert_close(rows.logprobs, full.logprobs[[2, 0]])
    torch.testing.assert_close(ref, full_ref[1:])
    with policy.lm.disable_adapter(), torch.no_grad():
        plain = policy(batch, temperature=0.7).logprobs
    torch.testing.assert_close(full_ref, plain)
    assert policy._trunks == {}  # the cache ends with the block


def test_a_known_trunk_serves_the_passes_and_must_fit_the_batch(tokenizer, tmp_path, monkeypatch):
    """frozen_trunk(batch, known=...) caches a trunk computed elsewhere (the sampler's): the passes read it and no
    bottom layer runs; one that does not fit the batch is refused. A PPO step with fp32 sampling computes no trunk
    of its own; with a bf16 sampler it does."""
    from hhh.models import LoraSettings
    from hhh.models.policy import Policy, build_policy
    from hhh.rollout import Tokens

    policy = build_policy(tiny_causal_lm(tokenizer, layers=4), LoraSettings(r=4, top_layers=2))
    _perturbed(policy, None)
    q, r = torch.randint(5, 500, (3, 6)), torch.randint(5, 500, (3, 5))
    batch = Tokens(q, torch.ones_like(q), r, torch.ones_like(r))
    with policy.frozen_trunk(batch):
        computed = policy(batch, temperature=0.7).logprobs
    calls: list[int] = []
    hook = policy.lm.get_base_model().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with policy.frozen_trunk(batch, known=policy._trunk(batch)):
        calls.clear()
        known = policy(batch, temperature=0.7).logprobs
    hook.remove()
    assert calls == [] and torch.equal(known, computed)
    for bad in ((batch,), (batch, batch[:1])):
        with pytest.raises(ValueError, match="known trunk"), policy.frozen_trunk(*bad, known=torch.zeros(3, 10, 64)):
            pass

    trunks: list[int] = []
    trunk = Policy._trunk
    monkeypatch.setattr(Policy, "_trunk", lambda self, tokens: trunks.append(len(tokens)) or trunk(self, tokens))
    run_ppo(tokenizer, tmp_path, "fp32", steps=1, lora_layers=1, val_prompts=0)
    assert trunks == []
    run_ppo(tokenizer, tmp_path, "bf16", steps=1, lora_layers=1, val_prompts=0, sampler_dtype="bfloat16")
    assert trunks == [8, 8]


@pytest.mark.parametrize("trunk", [False, True])
def test_log_probs_from_the_hidden_states_equal_those_from_the_logits(tokenizer, trunk):
    """Policy.forward takes the log-probs and entropies from the last hidden states through the frozen output
    layer a chunk at a time (losses.output_logprobs); with `head` None it runs the model's own logits and
    log-softmax. Both give the same log-probs, entropies ("train" and "measure"), hidden states, values and
    gradients of a PPO-style loss (log-probs + entropy bonus + value loss) in every adapter, reference included."""
    from hhh.models import LoraSettings
    from hhh.models.critic import Critic
    from hhh.models.policy import build_policy
    from hhh.rollout import Tokens

    policy = build_policy(tiny_causal_lm(tokenizer, layers=3), LoraSettings(r=4, top_layers=2 if trunk else None))
    critic = Critic(policy)
    _perturbed(policy, critic)
    assert policy.head is policy.lm.get_base_model().lm_head
    q, r = torch.randint(5, 500, (3, 6)), torch.randint(5, 500, (3, 5))
    qm, rm = torch.ones_like(q), torch.ones_like(r)
    qm[0, :2], rm[1, 3:] = 0, 0
    batch = Tokens(q, qm, r, rm)
    head, got = policy.head, {}
    for fused in (True, False):
        policy.head = head if fused else None
        policy.zero_grad()
        with policy.frozen_trunk(batch):
            f = policy(batch, temperature=0.7, entropy="train", hidden=True)
            measured = policy(batch, temperature=0.7, entropy="measure")
            ref = policy.reference_logprobs(batch, temperature=0.7)
        values = critic.values(batch, f)
        (f.logprobs.sum() + 0.1 * f.entropy.sum() + values.pow(2).sum()).backward()
        assert not measured.entropy.requires_grad and f.entropy.requires_grad
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        got[fused] = (f.logprobs, f.entropy, f.hidden, values, measured.logprobs, measured.entropy, ref, grads)
    assert len(got[True][-1]) > 4
    for a, b in zip(got[True][:-1], got[False][:-1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[True][-1].keys() == got[False][-1].keys()
    for n in got[True][-1]:
        a, b = got[True][-1][n], got[False][-1][n]  # float32 rounding, relative to each gradient's scale
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)


def _trained_policy(tokenizer, tmp_path, from_adapter: bool):
    """A 4-layer policy with LoRA on its top 2 layers and a non-zero adapter; `from_adapter`: started from a saved
    adapter (a frozen "reference" copy beside it) and trained away from it."""
    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy

    lora = LoraSettings(r=4, top_layers=2)
    policy = build_policy(with_eos_bias(tiny_causal_lm(tokenizer, layers=4), tokenizer.eos_token_id, 2.0), lora)
    _perturbed(policy)
    if from_adapter:
        policy.save(tmp_path / "a")
        policy = build_policy(with_eos_bias(tiny_causal_lm(tokenizer, layers=4), tokenizer.eos_token_id, 2.0), lora,
                              init_adapter=str(tmp_path / "a"))
        _perturbed(policy)  # the trained adapter now differs from the reference one
    return policy

@pytest.mark.parametrize("from_adapter", [False, True])
def test_merged_adapter_samples_the_same_tokens_and_puts_the_base_back(tokenizer, tmp_path, from_adapter):
    """Policy.merged(): sampling runs no adapter matmul, draws the same tokens for the same seed as the unmerged
    policy (log-probs within float noise), and leaves every parameter as it was: same objects, same values, same
    trainable set, also after an error inside and with a frozen reference adapter beside the trained one."""
    from hhh.rollout import sample

    policy = _trained_policy(tokenizer, tmp_path, from_adapter)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in policy.named_parameters()}
    prompts = ["Tell me a story", "hi", "Why is the sky blue?"] * 2
    plain = sample(policy.lm, tokenizer, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(4))
    adapter_calls = []
    hooks = [m.register_forward_hook(lambda *a: adapter_calls.append(1))
             for n, m in policy.lm.named_modules() if n.endswith("lora_A.default")]
    with policy.merged():
        merged = sample(policy.lm, tokenizer, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(4))
    assert adapter_calls == []
    for h in hooks:
        h.remove()
    assert torch.equal(plain.response_ids, merged.response_ids) and int(plain.response_mask.sum()) > 12
    torch.testing.assert_close(plain.logprobs, merged.logprobs, rtol=0, atol=1e-5)
    assert plain.logprobs.abs().sum() != policy.reference_logprobs(plain.tokens, temperature=0.7).abs().sum()
    with pytest.raises(RuntimeError, match="inside"), policy.merged():
        raise RuntimeError("inside")
    after = dict(policy.named_parameters())
    assert after.keys() == before.keys()
    for n, (p, value, grad) in before.items():
        assert after[n] is p and torch.equal(p, value) and p.requires_grad == grad, n
    again = sample(policy.lm, tokenizer, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again.logprobs, plain.logprobs)  # the adapter is active again, bit for bit


@pytest.mark.parametrize("from_adapter", [False, True])
def test_bf16_sampler_is_a_merged_copy_refreshed_at_every_entry(tokenizer, tmp_path, from_adapter):
    """Policy.sampler(torch.bfloat16): a plain model (no adapter layers) whose weights are the policy's with the
    active adapter folded in, then cast: it samples exactly what PEFT's own merge_and_unload cast to bf16 samples
    for the same seed, keeps tied embeddings tied, follows the adapter after every update, records its dtype in
    the rollout, and leaves the policy's parameters as they were."""
    import copy

    from hhh.rollout import sample

    policy = _trained_policy(tokenizer, tmp_path, from_adapter)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in policy.named_parameters()}
    prompts = ["Tell me a story", "hi", "Why is the sky blue?"] * 2

    def peft_merged_bf16():  # PEFT's merge on a copy, then every parameter cast (buffers keep their precision)
        lm = copy.deepcopy(policy.lm)
        if from_adapter:
            lm.delete_adapter("reference")
        merged = lm.merge_and_unload()
        for p in merged.parameters():
            p.data = p.data.to(torch.bfloat16)
        return merged

    for _ in range(2):  # before and after an update of the adapter
        expected = sample(peft_merged_bf16(), tokenizer, prompts, max_new_tokens=10,
                          generator=torch.Generator().manual_seed(4))
        with policy.sampler(torch.bfloat16) as model:
            assert model is not policy.lm and not any("lora_" in n for n, _ in model.named_parameters())
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            assert {b.dtype for b in model.buffers()} == {torch.float32}  # rotary frequencies stay exact
            assert not any(p is q for p in model.parameters() for q in policy.parameters())
            assert not any(p.requires_grad for p in model.parameters())
            assert model.lm_head.bias is not None  # with_eos_bias's untied head, copied as it is
            got = sample(model, tokenizer, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(4))
        assert torch.equal(got.response_ids, expected.response_ids) and int(got.response_mask.sum()) > 12
        assert torch.equal(got.logprobs, expected.logprobs)
        assert got.sampler_dtype == torch.bfloat16 and expected.sampler_dtype == torch.bfloat16
        after = dict(policy.named_parameters())
        for n, (p, value, grad) in before.items():
            assert after[n] is p and torch.equal(p, value) and p.requires_grad == grad, n
        _perturbed(policy)  # an update: the next entry must sample from the new adapter
        before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in policy.named_parameters()}
    with policy.sampler(None) as model, policy.sampler(torch.float32) as same:
        assert model is policy.lm and same is policy.lm  # the weights' own dtype: merged() in place
        assert sample(model, tokenizer, prompts, max_new_tokens=4).sampler_dtype == torch.float32


def test_a_bf16_rollout_gets_its_old_logprobs_from_the_fp32_training_forward(tokenizer):
    """GRPO/RLOO take the sampler's log-probs as the old policy's only when the sampler computed in the training
    weights' dtype: a bf16 sampler's are recomputed (on the cached trunk), so the first ratio is exactly 1."""
    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy
    from hhh.rollout import sample
    from hhh.train.groups import old_and_reference_logprobs

    policy = build_policy(tiny_causal_lm(tokenizer, layers=4), LoraSettings(r=4, top_layers=2))
    _perturbed(policy)
    prompts = ["Tell me a story", "hi", "Why is the sky blue?"] * 2
    for dtype in (torch.bfloat16, torch.float32):
        with policy.sampler(dtype) as model:
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
            r = sample(model, tokenizer, prompts, max_new_tokens=10, generator=torch.Generator().manual_seed(4))
        with policy.frozen_trunk(r.tokens, micro_batch_size=4):
            old, ref = old_and_reference_logprobs(policy, r, r.tokens, 4, 0.7)
        with torch.no_grad():
            fresh = policy(r.tokens, temperature=0.7).logprobs * r.response_mask
        torch.testing.assert_close(old * r.response_mask, fresh, rtol=0, atol=1e-5)
        if dtype == torch.bfloat16:
            assert (r.logprobs - fresh).abs().max() > 1e-3  # the sampler's own would have been off
            assert (r.logprobs - fresh).abs().max() < 0.2
        else:
            assert torch.equal(old, r.logprobs)  # fp32: the sampler's own, no second pass


def test_sampler_dtype_auto_is_bf16_only_for_fp32_weights_on_native_bf16_hardware(tokenizer, capsys):
    """"auto" follows oneDNN's check on this CPU (whichever kind runs the tests), never touches bf16 weights;
    "bfloat16" asked for on a CPU without native kernels is kept but said in one line; a typo is a one-line error
    naming the field."""
    from hhh.cli import main
    from hhh.config import GRPOConfig
    from hhh.engines import sampler_dtype
    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    fp32 = build_policy(tiny_causal_lm(tokenizer), LoraSettings(r=4))
    bf16 = build_policy(tiny_causal_lm(tokenizer).to(torch.bfloat16), LoraSettings(r=4))
    assert sampler_dtype(GRPOConfig(), fp32) is None
    assert sampler_dtype(GRPOConfig(sampler_dtype="auto"), fp32) == (torch.bfloat16 if native else None)
    assert sampler_dtype(GRPOConfig(sampler_dtype="auto"), bf16) is None
    capsys.readouterr()
    assert sampler_dtype(GRPOConfig(sampler_dtype="bfloat16"), fp32, warn=True) == torch.bfloat16
    err = capsys.readouterr().err
    assert ("sampler_dtype = 'bfloat16' on this cpu runs slower than float32" in err) == (not native)
    assert err.count("\n") == (0 if native else 1)
    assert main(["grpo", "--sampler-dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "sampler" in err and "fp8" in err and err.strip().count("\n") == 0


def test_bad_val_split_is_a_clear_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="val_prompts=999"):
        run_ppo(tokenizer, tmp_path, "bad", steps=1, val_prompts=999)


def test_separate_critic_keeps_the_value_loss_out_of_the_policy(tokenizer):
    from hhh.losses import value_loss
    from hhh.models import LoraSettings
    from hhh.models.critic import Critic
    from hhh.models.policy import build_policy
    from hhh.rollout import Tokens

    policy = build_policy(tiny_causal_lm(tokenizer, layers=4), LoraSettings(r=4, top_layers=2))
    critic = Critic(policy, separate=True, lora=LoraSettings(r=4, top_layers=2))
    _perturbed(policy, critic)
    for n, p in policy.named_parameters():
        if ".critic." in n and "lora_B" in n:
            p.data.normal_(0, 0.3)
    q, r = torch.randint(5, 500, (2, 5)), torch.randint(5, 500, (2, 4))
    batch = Tokens(q, torch.ones_like(q), r, torch.ones_like(r))
    full = critic.values(batch, policy(batch, temperature=0.7))
    with policy.frozen_trunk(batch):
        top = critic.values(batch, policy(batch, temperature=0.7))
    torch.testing.assert_close(full, top)  # the critic reuses the frozen trunk too
    loss, _ = value_loss(top, torch.zeros_like(top), torch.ones_like(top), torch.ones_like(top))
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".default." in n)
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if ".critic." in n)
    assert critic.head.weight.grad.abs().max() > 0


def test_separate_critic_checkpoints_and_resumes(tokenizer, tmp_path):
    run, result = run_ppo(tokenizer, tmp_path, "critic", steps=2, critic="separate")
    assert (run.path / "checkpoints" / "last" / "critic" / "adapter_model.safetensors").is_file()
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()
    config = PPOConfig(**{**TOY, "steps": 3, "critic": "separate", "out": str(run.path)})
    resumed = train_ppo(config, run, base=hello_model(tokenizer), tokenizer=tokenizer, resume=True)
    assert resumed.summary["steps"] == 3 and [m["step"] for m in run.metrics()] == [1, 2, 3]


def test_starting_adapter_is_the_reference(tokenizer, tmp_path):
    """From an existing adapter: the reference is a frozen copy of it (KL 0 at start), not the bare base."""
    from hhh.models import LoraSettings, attach_lora
    from hhh.models.policy import build_policy
    from hhh.rollout import Tokens

    start = attach_lora(hello_model(tokenizer), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in start.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    start.save_pretrained(tmp_path / "start")
    policy = build_policy(hello_model(tokenizer), LoraSettings(r=4, alpha=8), init_adapter=str(tmp_path / "start"))
    q, r = torch.randint(5, 500, (2, 5)), torch.randint(5, 500, (2, 4))
    batch = Tokens(q, torch.ones_like(q), r, torch.ones_like(r))
    with torch.no_grad():
        pol = policy(batch, temperature=0.7).logprobs
        ref = policy.reference_logprobs(batch, temperature=0.7)
        with policy.lm.disable_adapter():
            bare = policy(batch, temperature=0.7).logprobs
    torch.testing.assert_close(pol, ref)
    assert not torch.allclose(ref, bare, atol=1e-3)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and not any(".reference." in n for n in trainable)


def test_separate_critic_adapter_still_trains_after_a_reference_pass(tokenizer):
    """PEFT re-runs set_adapter when disable_adapter() exits, which freezes every adapter but the active one: the
    critic's LoRA must keep its gradient after the reference pass that every PPO step makes first."""
    from hhh.losses import value_loss
    from hhh.models import LoraSettings
    from hhh.models.critic import Critic
    from hhh.models.policy import build_policy
    from hhh.rollout import Tokens

    policy = build_policy(tiny_causal_lm(tokenizer, layers=4), LoraSettings(r=4, top_layers=2))
    critic = Critic(policy, separate=True, lora=LoraSettings(r=4, top_layers=2))
    n_trainable = len(policy.trainable_parameters())
    q, r = torch.randint(5, 500, (2, 5)), torch.randint(5, 500, (2, 4))
    batch = Tokens(q, torch.ones_like(q), r, torch.ones_like(r))
    for _ in range(2):
        policy.reference_logprobs(batch, temperature=0.7)
    with torch.no_grad():
        critic.head.weight.normal_(0, 0.3)  # lora_B starts at 0: the critic's A gets a gradient only via the head
    values = critic.values(batch, policy(batch, temperature=0.7))
    loss, _ = value_loss(values, torch.zeros_like(values), torch.ones_like(values), torch.ones_like(values))
    loss.backward()
    lora = {n: p for n, p in policy.named_parameters() if ".critic." in n and "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora.values())
    assert len(policy.trainable_parameters()) == n_trainable


def test_separate_critic_adapter_moves_in_a_real_ppo_step(tokenizer, tmp_path):
    _, result = run_ppo(tokenizer, tmp_path, "critic-moves", steps=1, critic="separate")
    critic_b = [p for n, p in result.model.named_parameters() if ".critic." in n and "lora_B" in n]
    policy_b = [p for n, p in result.model.named_parameters() if ".default." in n and "lora_B" in n]
    assert critic_b and max(float(p.detach().abs().max()) for p in critic_b) > 0, "the critic's LoRA never left its init"
    assert max(float(p.detach().abs().max()) for p in policy_b) > 0


def test_random_numbers_drawn_before_training_do_not_change_it(tokenizer, tmp_path):
    """The first run after install converted the GGUF in-process, drawing from the global RNG, and then diverged from
    every later run at step 2 (LoRA A came from that RNG). Now every initialisation has its own seeded stream:
    training after unrelated random draws equals training without them, and another seed gives another init."""
    def run(name, disturb, seed=0):
        config = PPOConfig(**{**TOY, "steps": 2, "seed": seed, "out": str(tmp_path / name)})
        base = hello_model(tokenizer)
        if disturb:
            torch.rand(12345)
        train_ppo(config, RunDir.create("ppo", config, config.out), base=base, tokenizer=tokenizer)
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in RunDir(config.out).metrics()]

    assert run("quiet", False) == run("disturbed", True)
    assert run("seed1", False, seed=1) != run("quiet2", False)
