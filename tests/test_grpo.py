import contextlib
import json
import subprocess
import sys

import pytest
import torch

from hhh import metrics as M
from hhh.config import GRPOConfig, RLOOConfig
from hhh.jobs import JOBS
from hhh.runs import RunDir
from tests import toy_rewards
from tests.test_ppo import hello_model

TOY = dict(prompts="redteam:train", reward="tests.toy_rewards:hello", second_scorer="length:8", prompts_per_step=4,
           group_size=4, minibatch_size=8, micro_batch_size=8, max_new_tokens=6, lr=1e-2, lora_r=8, lora_alpha=16,
           val_prompts=4, val_every=3, checkpoint_every=2)


def run_online(cls, tokenizer, tmp_path, name, resume=False, **overrides):
    config = cls(**{**TOY, **overrides, "out": str(tmp_path / name)})
    run = RunDir(config.out) if resume else RunDir.create(name, config, config.out)
    command = "grpo" if cls is GRPOConfig else "rloo"
    trained = JOBS[command].train(config, run, base=hello_model(tokenizer), tokenizer=tokenizer, console=None,
                                  resume=resume)
    return run, (trained.model, trained.summary["steps"], trained.summary["best_step"], trained.stopped)


@pytest.mark.parametrize("cls, extra", [(GRPOConfig, {}), (GRPOConfig, {"aggregation": "token", "epochs": 2}),
                                        (RLOOConfig, {}), (RLOOConfig, {"advantage": "reinforce++"})])
def test_critic_free_rl_raises_a_simple_reward(cls, extra, tokenizer, tmp_path):
    run, (_, steps, best, stopped) = run_online(cls, tokenizer, tmp_path, "learn", steps=20, **extra)
    m = run.metrics()
    early = sum(x[M.REWARD_MEAN] for x in m[:3]) / 3
    late = sum(x[M.REWARD_MEAN] for x in m[-3:]) / 3
    assert late > early + 0.2, (early, late)
    assert steps == 20 and stopped is None and best is not None
    # The first rollout is the reference's. Old log-probs are the sampler's (KV cache), the reference's a fresh
    # pass: equal up to float rounding.
    assert abs(m[0]["kl/k1"]) < 1e-4 and m[-1]["kl/k1"] > 0.01
    for key in ("reward/mean", "reward/std", "kl/k1", "kl/k3", "kl/beta", "policy/entropy", "loss/policy",
                "length/tokens", "second/mean", "distinct_2", "repetition_3", "alarms", "time/step_s"):
        assert key in m[-1], key
    assert M.undocumented(m[-1]) == []


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_a_bf16_sampler_samples_every_rollout_and_check_and_the_update_starts_from_ratio_one(cls, tokenizer,
                                                                                            tmp_path, monkeypatch):
    """sampler_dtype = "bfloat16": every step's rollout and every held-out check decode in bf16 (a merged copy),
    the old log-probs are the fp32 training forward's, so the first step's KL to the reference is 0 to float
    rounding and its single minibatch clips nothing; the run learns as the fp32 sampler's does."""
    import hhh.engines
    import hhh.rollout

    seen = []
    original = hhh.rollout.sample

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(hhh.engines, "sample", spy)
    monkeypatch.setattr(hhh.rollout, "sample", spy)
    run, (policy, steps, _, _) = run_online(cls, tokenizer, tmp_path, "bf16", steps=12, minibatch_size=16,
                                            sampler_dtype="bfloat16")
    m = run.metrics()
    assert steps == 12 and seen == [torch.bfloat16] * (12 + 4)  # 12 rollouts, held-out checks at steps 3, 6, 9, 12
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert abs(m[0]["kl/k1"]) < 1e-5 and m[0]["policy/clipfrac"] == 0.0
    early = sum(x[M.REWARD_MEAN] for x in m[:3]) / 3
    late = sum(x[M.REWARD_MEAN] for x in m[-3:]) / 3
    assert late > early + 0.1, (early, late)
    assert "sampler_dtype = \"bfloat16\"" in (run.path / "config.toml").read_text()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("cls, extra, rows", [(GRPOConfig, {}, 8), (GRPOConfig, {"epochs": 2}, 8),
                                              (RLOOConfig, {}, 16)])
def test_the_first_minibatch_takes_its_old_log_probs_from_its_own_forward(cls, extra, rows, share, tokenizer,
                                                                          tmp_path, monkeypatch):
    """After a bf16 sampler the old log-probs are recomputed in fp32. The first minibatch's rows need no such pass:
    no update has happened when their training forward runs, so its detached log-probs are the old policy's (TRL
    does the same when a batch is one optimizer step). GRPO runs the pass over the other 8 of 16 rows only; RLOO
    runs it over all 16 (its advantages need every row's KL before the update). Either way, after each update the
    batch's old log-probs equal a fresh forward of the adapter that sampled. With a group per row (share_prompt)
    every minibatch and micro-batch is whole groups."""
    import hhh.train.groups as G
    from hhh.models.policy import Policy

    inside = {"old": False, "ref": False}
    rows_passed: list[int] = []
    checked: list[float] = []

    def flag(fn, key):
        def wrapper(*args, **kwargs):
            inside[key] = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside[key] = False
        return wrapper

    forward = Policy.forward

    def counting(self, tokens, **kwargs):
        if inside["old"] and not inside["ref"] and not torch.is_grad_enabled():
            rows_passed.append(len(tokens.response_ids) * tokens.completions_per_row)
        return forward(self, tokens, **kwargs)

    update = G.update

    losses: list[tuple[list[int], list[int]]] = []

    def checking(policy, optimizer, scheduler, batch, loss, *args, **kwargs):
        def seen(logp, i, minibatch, b):
            losses.append((i.tolist(), minibatch.tolist()))
            return loss(logp, i, minibatch, b)

        before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        stats = update(policy, optimizer, scheduler, batch, seen, *args, **kwargs)
        after = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in before:
                    p.copy_(before[n])
            fresh = batch.tokens.unpack(policy(batch.tokens, temperature=0.7).logprobs)  # inside the frozen_trunk
            for n, p in policy.named_parameters():
                if n in after:
                    p.copy_(after[n])
        on = batch.mask.bool()
        checked.append(float((batch.old_logp[on] - fresh[on]).abs().max()))
        return stats

    monkeypatch.setattr(G, "old_and_reference_logprobs", flag(G.old_and_reference_logprobs, "old"))
    monkeypatch.setattr(Policy, "reference_logprobs", flag(Policy.reference_logprobs, "ref"))
    monkeypatch.setattr(Policy, "forward", counting)
    monkeypatch.setattr(G, "update", checking)
    run, (_, steps, _, _) = run_online(cls, tokenizer, tmp_path, "first", steps=2, sampler_dtype="bfloat16",
                                       temperature=0.7, share_prompt=share, **extra)
    assert steps == 2 and sum(rows_passed) == 2 * rows, rows_passed
    if share:  # groups of 4 rows
        assert all(sorted(rows) == sorted({4 * (r // 4) + k for r in rows for k in range(4)})
                   for pair in losses for rows in pair)
    assert len(checked) == 2 and max(checked) < 1e-5, checked
    m = run.metrics()
    assert abs(m[0]["kl/k1"]) < 1e-5 and all(torch.isfinite(torch.tensor(x["kl/k1"])) for x in m)


def test_grpo_with_equal_rewards_does_not_move_the_policy(tokenizer, tmp_path):
    """A constant reward: every group advantage is 0, and with beta = 0 the loss has no gradient: LoRA B stays 0."""
    run, (policy, *_) = run_online(GRPOConfig, tokenizer, tmp_path, "flat", steps=2, beta=0.0,
                                   reward="tests.toy_rewards:constant", val_prompts=0)
    assert all(x["advantage/abs_mean"] == 0 for x in run.metrics())
    assert all(float(p.detach().abs().max()) == 0 for n, p in policy.named_parameters() if "lora_B" in n)


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tokenizer, tmp_path):
    straight, _ = run_online(GRPOConfig, tokenizer, tmp_path, "straight", steps=4)
    toy_rewards.CALLS.update(n=0, interrupt_at=2)
    cut, (_, steps, _, stopped) = run_online(GRPOConfig, tokenizer, tmp_path, "cut", steps=4,
                                             reward="tests.toy_rewards:hello_then_ctrl_c")
    assert stopped == "interrupted" and steps == 2
    assert json.loads((cut.path / "checkpoints" / "last" / "state.json").read_text())["step"] == 2
    toy_rewards.CALLS.update(n=0, interrupt_at=None)
    run_online(GRPOConfig, tokenizer, tmp_path, "cut", resume=True, steps=4, reward="tests.toy_rewards:hello_then_ctrl_c")

    def strip(ms):
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]

    assert strip(cut.metrics()) == strip(straight.metrics())


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_commands_as_a_user_runs_them(command, tiny_dir, tmp_path):
    out = tmp_path / command
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", command, "--model", tiny_dir, "--steps", "2",
                           "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--val-prompts", "2",
                           "--eval-max-prompts", "2", "--eval-samples", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "report.html").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    # --resume reads the kind and settings from the run folder; a finished run only evaluates again
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", command, "--resume", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"hhh {command} --resume" not in proc.stdout and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _rollout(policy, tokenizer, n=8):
    import torch

    from hhh.rollout import sample

    prompts = [f"prompt {i}" for i in range(n)]
    return sample(policy.lm, tokenizer, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))


def test_rloo_updates_are_importance_weighted_against_the_old_policy(tokenizer):
    """RLOO takes several optimizer steps per batch: its loss must see pi / pi_old. The same batch, advantages and
    start, once with the true old log-probs and once with old log-probs 1 nat lower (every ratio e = 2.7, clipped):
    the updates differ (REINFORCE without a ratio ignores pi_old and made them equal)."""
    import torch

    from hhh import losses as L
    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy
    from hhh.train.groups import Batch, old_and_reference_logprobs, update
    from hhh.train.loop import linear_decay

    config = RLOOConfig(**{**TOY, "minibatch_size": 4, "micro_batch_size": 2, "max_grad_norm": 1e9})

    def rloo(logp, i, minibatch, b):  # the loss hhh.train.rloo gives the update
        value, clipfrac = L.rloo_loss(logp, b.old_logp[i], b.advantages[i], b.mask[i], clip=config.cliprange,
                                      n_seqs=len(minibatch))
        return value, clipfrac * (len(i) / len(minibatch))

    changes = []
    for shift in (0.0, 1.0):
        policy = build_policy(hello_model(tokenizer), LoraSettings(r=4, alpha=8))
        r = _rollout(policy, tokenizer)
        tokens = r.tokens
        with policy.frozen_trunk(tokens, micro_batch_size=config.micro_batch_size):
            old, ref = old_and_reference_logprobs(policy, r, tokens, config.micro_batch_size, config.temperature)
            adv = torch.tensor([1.0, -1.0] * 4)
            before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
            opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
            batch = Batch(tokens, r.response_mask.float(), old - shift, ref, adv, config.kl_coef)
            stats = update(policy, opt, linear_decay(opt, 10), batch, rloo, config, epochs=1,
                           generator=torch.Generator().manual_seed(0))
        changes.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in policy.named_parameters()
                                  if p.requires_grad]))
        assert (stats["policy/clipfrac"] > 0.4) == (shift > 0)
    assert changes[0].abs().max() > 0 and not torch.allclose(changes[0], changes[1])


def test_a_bf16_model_trains_with_the_merged_sampler(tokenizer, tmp_path):
    """--dtype bfloat16: PEFT keeps a bf16 base's adapter in fp32, so the adapter folded in for sampling must be cast
    back to the weights' dtype (an fp32 merged weight met bf16 activations and stopped the first rollout)."""
    config = GRPOConfig(**{**TOY, "dtype": "bfloat16", "steps": 2, "out": str(tmp_path / "bf16")})
    run = RunDir.create("grpo", config, config.out)
    trained = JOBS["grpo"].train(config, run, base=hello_model(tokenizer).to(torch.bfloat16), tokenizer=tokenizer,
                                 console=None)
    m = run.metrics()
    assert trained.summary["steps"] == 2 and len(m) == 2
    assert all(abs(x["kl/k1"]) < 1e-3 for x in m[:1]) and m[-1]["length/tokens"] > 0


def test_old_log_probs_in_bf16_come_from_the_training_forward(tokenizer):
    """In bf16 the sampler's (KV-cache) log-probs are not the training forward's: the first ratio would not be 1.
    The old log-probs then come from the training forward itself, so pi / pi_old = 1 exactly before any update."""
    import torch

    from hhh.models import LoraSettings
    from hhh.models.policy import build_policy
    from hhh.train.groups import old_and_reference_logprobs

    config = GRPOConfig(**{**TOY, "dtype": "bfloat16"})
    policy = build_policy(hello_model(tokenizer).to(torch.bfloat16), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    r = _rollout(policy, tokenizer)
    tokens = r.tokens
    assert r.tokens is tokens  # one object: the trunk cached for it serves every pass
    with policy.frozen_trunk(tokens, micro_batch_size=config.micro_batch_size):
        old, _ = old_and_reference_logprobs(policy, r, tokens, config.micro_batch_size, config.temperature)
        with torch.no_grad():
            new = policy(tokens, temperature=config.temperature).logprobs
    mask = r.response_mask.bool()
    assert torch.equal(old[mask], new[mask])


def grouped_rows(tokenizer):
    """Two groups of three completions of different lengths, the second group's prompt longer: a step's rows as the
    sampler returns them (prompts left-padded, completions right-padded, each group's rows consecutive)."""
    from hhh.rollout import prompt_response_tokens

    prompts = ["Hi?", "Tell me a long story about a cat who sails around the world, please."]
    completions = ["yes", "sure thing, here you go, a poem", "no", "once upon a time", "a cat", "the end of it all"]
    return prompt_response_tokens(tokenizer, [p for p in prompts for _ in range(3)], completions, 16)


@pytest.mark.parametrize("attention, trunk", [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_a_group_in_one_row_gives_the_log_probs_entropies_and_gradients_of_its_rows(tokenizer, attention, trunk):
    """GroupTokens (each prompt once, its G completions attending to it through a 4D mask) == the plain rows prompt +
    completion: the policy's and the reference's per-token log-probs and the entropies within float noise on every
    completion token, and the adapter's gradients from micro-batches that split the batch differently (whole
    groups; rows across groups), with and without a cached frozen trunk, under sdpa and eager attention."""
    from hhh.rollout import group_tokens
    from tests.test_dpo import adapted_policy

    policy = adapted_policy(tokenizer, attention, trunk)
    rows = grouped_rows(tokenizer)
    groups = group_tokens(rows, 3)
    mask = rows.response_mask.bool()
    weights = torch.arange(1.0, 7.0)[:, None]  # uneven per row
    results = {}
    for tokens, micro in ((groups, [torch.tensor([1]), torch.tensor([0])]),
                          (rows, [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5])])):
        policy.zero_grad(set_to_none=True)
        with policy.frozen_trunk(tokens) if trunk else contextlib.nullcontext():
            ref = tokens.unpack(policy.reference_logprobs(tokens, temperature=0.7))
            logp, entropy = [], []
            for u in micro:
                out = policy(tokens[u], temperature=0.7, entropy="measure")
                i = tokens.row_indices(u)
                lp = tokens.unpack(out.logprobs)
                (lp * weights[i] * mask[i]).sum().backward()
                logp.append((i, lp.detach()))
                entropy.append(tokens.unpack(out.entropy))
        order = torch.cat([i for i, _ in logp]).argsort()
        new = torch.cat([lp for _, lp in logp])[order]
        results[tokens is groups] = (ref[mask], new[mask], torch.cat(entropy)[order][mask],
                                     [p.grad.clone() for p in policy.trainable_parameters()])
    packed, plain = results[True], results[False]
    for a, b in zip(packed[:3], plain[:3], strict=True):
        assert a.shape == b.shape == (int(mask.sum()),)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(bool(g.abs().sum() > 0) for g in packed[3])
    for a, b in zip(packed[3], plain[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert groups.ids().numel() < rows.ids().numel() and len(groups) == 2 and groups.unpack(groups.response_ids).equal(
        rows.response_ids)


def test_only_whole_groups_of_one_prompt_go_in_a_row(tokenizer):
    from hhh.rollout import group_tokens

    rows = grouped_rows(tokenizer)
    with pytest.raises(ValueError, match="6 rows are not whole groups of 4"):
        group_tokens(rows, 4)
    with pytest.raises(ValueError, match="rows in a group of 2 have different prompts"):
        group_tokens(rows, 2)  # rows 2 and 3 hold different prompts
    assert group_tokens(rows, 3).row_indices(torch.tensor([1, 0])).tolist() == [3, 4, 5, 0, 1, 2]


@pytest.mark.parametrize("cls, extra", [(GRPOConfig, {}), (GRPOConfig, {"aggregation": "token"}), (RLOOConfig, {}),
                                        (RLOOConfig, {"advantage": "reinforce++"})])
def test_a_run_with_a_group_per_row_logs_what_a_row_per_completion_logs(cls, extra, tokenizer, tmp_path):
    """The same three steps (one minibatch a step, so both layouts see the same rows in each optimizer step) with
    share_prompt on (the default) and off: every logged metric within float noise."""
    logs = {}
    for share in (True, False):
        run, _ = run_online(cls, tokenizer, tmp_path, f"share{share}", steps=3, minibatch_size=16, micro_batch_size=6,
                            share_prompt=share, **extra)
        logs[share] = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in run.metrics()]
    assert len(logs[True]) == 3 and logs[True][2]["kl/k1"] > 0
    for packed, plain in zip(logs[True], logs[False], strict=True):
        assert packed.pop("alarms") == plain.pop("alarms")
        assert packed == pytest.approx(plain, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("attention, minibatch, shares, line", [
    ("sdpa", 8, True, None), ("eager", 8, True, None),
    ("flash_attention_2", 8, False, "flash_attention_2 attention takes no 4D mask (share_prompt needs sdpa or eager)"),
    ("sdpa", 6, False, "a minibatch of 6 completions per process is not whole groups of 4")])
def test_a_group_per_row_falls_back_to_rows_with_a_line_saying_why(tokenizer, attention, minibatch, shares, line):
    from io import StringIO

    from rich.console import Console

    from hhh.models import LoraSettings, tiny_causal_lm
    from hhh.models.policy import build_policy
    from hhh.train.groups import prompt_sharing

    base = tiny_causal_lm(tokenizer, seed=0)
    base.config._attn_implementation = attention  # build_policy runs no forward
    policy = build_policy(base, LoraSettings(r=4))
    text = StringIO()
    console = Console(file=text, width=200)
    assert prompt_sharing(GRPOConfig(minibatch_size=minibatch, group_size=4), policy, console) is shares
    assert text.getvalue() == ("" if line is None else f"{line}: one row per completion\n")
    assert prompt_sharing(GRPOConfig(share_prompt=False), policy, console) is False
    assert text.getvalue().count("\n") == (0 if shares else 1)


def test_the_frozen_trunk_of_a_group_per_row_runs_in_micro_batches_of_completions(tokenizer, tmp_path, monkeypatch):
    """micro_batch_size counts completions in every pass: with a group of 4 per row, micro-batches of 8 completions
    put 2 groups through the frozen bottom layers at a time, as through the reference pass and the update."""
    from hhh.models.policy import Policy

    sizes: list[int] = []
    trunk = Policy._trunk

    def counting(self, tokens):
        sizes.append(len(tokens) * tokens.completions_per_row)
        return trunk(self, tokens)

    monkeypatch.setattr(Policy, "_trunk", counting)
    # a bf16 sampler computes no fp32 trunk on the way, so the step computes it (on any CPU: a tiny model)
    _, (policy, steps, _, _) = run_online(GRPOConfig, tokenizer, tmp_path, "trunk", steps=1, lora_layers=1,
                                          micro_batch_size=8, val_prompts=0, sampler_dtype="bfloat16")
    assert steps == 1 and sizes == [8, 8]


@pytest.mark.parametrize("cls, share_prompt", [(GRPOConfig, True), (GRPOConfig, False), (RLOOConfig, True)])
def test_a_step_takes_the_frozen_trunk_the_sampler_computed(tokenizer, tmp_path, monkeypatch, cls, share_prompt):
    """Sampling with the training weights runs the frozen bottom layers anyway: a step keeps what entered the first
    adapted layer (Rollout.trunk, put into the group-per-row layout when groups share a row) and runs no trunk pass
    of its own. Its metrics equal those of the same steps computing the trunk again, within float rounding."""
    from hhh.models.policy import Policy

    calls: list[int] = []
    trunk = Policy._trunk

    def counting(self, tokens):
        calls.append(len(tokens))
        return trunk(self, tokens)

    monkeypatch.setattr(Policy, "_trunk", counting)
    runs = {}
    for kept in (True, False):
        if not kept:  # the sampler keeps nothing: every step computes its trunk
            monkeypatch.setattr(Policy, "trunk_layer", property(lambda self: None))
        calls.clear()
        run, (_, steps, _, _) = run_online(cls, tokenizer, tmp_path, f"kept-{kept}", steps=2, lora_layers=1,
                                           val_prompts=0, share_prompt=share_prompt)
        assert steps == 2 and (calls == [] if kept else len(calls) > 0)
        runs[kept] = run.metrics()
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in ("reward/mean", "kl/k1", "loss/policy", "policy/entropy", "policy/clipfrac"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-4), key
