import contextlib
import json
import math
import subprocess
import sys

import pytest
import torch

from hhh.config import DPOConfig
from hhh.data.pairs import Pairs
from hhh.models import LoraSettings
from hhh.models.policy import build_policy
from hhh.runs import RunDir
from hhh.train.dpo import minibatches, preference_loss, sequence_logps, train_dpo


def toy_pairs(n=8):
    """The same preference everywhere: answer 'yes thank you' over 'no go away'."""
    prompts = [f"Question {i}?" for i in range(n)]
    return Pairs(prompts, ["yes thank you"] * n, ["no go away"] * n, [False] * n, [None] * n)


@pytest.mark.parametrize("loss, at_start", [("sigmoid", math.log(2)), ("robust", math.log(2)), ("ipo", 25.0),
                                            ("hinge", 1.0), ("kto", 0.5)])
def test_losses_at_step_0_where_the_policy_is_the_reference(tiny, tokenizer, loss, at_start):
    """A fresh LoRA adapter (B = 0) is the reference: h = 0, so DPO = log 2, IPO = (0 - 1/(2*0.1))^2 = 25,
    hinge = max(0, 1 - 0) = 1, KTO = 1 - sigma(0) = 1/2 (z0 = 0)."""
    config = DPOConfig(loss=loss, batch_size=4)
    policy = build_policy(tiny, LoraSettings(top_layers=1))
    mb = minibatches(toy_pairs(4), tokenizer, config, "cpu")[0]
    pi = sequence_logps(policy, mb.tokens)[:2]
    ref = sequence_logps(policy, mb.tokens, reference=True)[:2]
    kl = torch.zeros(()) if loss == "kto" else None
    assert preference_loss(config, pi, ref, kl).item() == pytest.approx(at_start, abs=1e-5)


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_a_tiny_model_raises_its_margin_on_a_toy_preference(tiny, tokenizer, tmp_path, loss):
    config = DPOConfig(loss=loss, batch_size=4, epochs=6, lr=3e-2, lora_layers=None,
                       beta=2.0 if loss == "simpo" else 0.1)
    run = RunDir.create("dpo", config, str(tmp_path / "run"))
    policy = train_dpo(config, run, toy_pairs(), base=tiny, tokenizer=tokenizer, console=None)
    metrics = run.metrics()
    first, last = metrics[0], metrics[-1]
    assert last["loss/preference"] < first["loss/preference"]
    # the policy now prefers the chosen answer more than the reference does, on unseen prompts too
    unseen = Pairs(["Another one?", "And this?"], ["yes thank you"] * 2, ["no go away"] * 2, [False] * 2, [None] * 2)
    mb = minibatches(unseen, tokenizer, config, "cpu")[0]
    with torch.no_grad():
        pi = sequence_logps(policy, mb.tokens)[0]
        ref = sequence_logps(policy, mb.tokens, reference=True)[0]
    margin = (pi[:2] - ref[:2]) - (pi[2:] - ref[2:])
    assert (margin > 0).all() and last["rewards/accuracy"] == 1.0
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("loss", ["sigmoid", "kto", "orpo"])
def test_micro_batches_of_pairs_give_the_same_steps(tokenizer, tmp_path, loss):
    """Gradient accumulation over micro-batches of 3, 3 and 2 pairs == one pass over the 8: same loss, gradient
    norm and log-probs at both steps (completions of different lengths, so padding differs by row)."""
    from hhh.models import tiny_causal_lm

    n = 8
    pairs = Pairs([f"Question {i}?" for i in range(n)], ["yes thank you", "sure, here it is, gladly"] * 4,
                  ["no", "go away now please"] * 4, [False] * n, [None] * n)
    logs = {}
    for micro in (8, 3):
        config = DPOConfig(loss=loss, batch_size=8, micro_batch_size=micro, epochs=2, lr=1e-2)
        run = RunDir.create("dpo", config, str(tmp_path / f"m{micro}"))
        train_dpo(config, run, pairs, base=tiny_causal_lm(tokenizer, seed=0), tokenizer=tokenizer, console=None)
        logs[micro] = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in run.metrics()]
    assert len(logs[8]) == 2 and logs[8][1]["loss/preference"] != logs[8][0]["loss/preference"]
    for whole, parts in zip(logs[8], logs[3], strict=True):
        assert parts == pytest.approx(whole, rel=1e-4, abs=1e-6)


def uneven_pairs() -> Pairs:
    """Prompts and completions of different lengths, chosen longer in some pairs and shorter in others, so that
    both the left padding of the prompts and the right padding of each completion differ by row."""
    prompts = ["Hi?", "Tell me a long story about a cat who sails around the world, please.", "Why?",
               "What is two and two?"]
    chosen = ["yes thank you", "sure", "because the sky is blue and the sea is wide", "four"]
    rejected = ["no", "go away now please, I will not", "no idea", "five, or maybe six, who knows"]
    return Pairs(prompts, chosen, rejected, [False] * 4, [None] * 4)


def adapted_policy(tokenizer, attention: str, trunk: bool):
    """A tiny 3-layer policy under `attention` whose adapter is not zero (LoRA B drawn), with a frozen trunk (the
    adapter on the top 2 layers) or without one: what the layout tests compare two layouts on."""
    from hhh.models import tiny_causal_lm

    base = tiny_causal_lm(tokenizer, layers=3, seed=1)
    base.config._attn_implementation = attention
    policy = build_policy(base, LoraSettings(r=4, top_layers=2 if trunk else None))
    assert (policy.split > 0) == trunk
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return policy


@pytest.mark.parametrize("attention, trunk", [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_pairs_with_their_prompt_once_give_the_log_probs_and_gradients_of_two_rows(tokenizer, attention, trunk):
    """PairTokens (each prompt once, its two completions attending to it through a 4D mask) == the plain 2b rows
    prompt + chosen, prompt + rejected: the policy's and the reference's (sum, mean) log-probs within 1e-5, and
    the adapter's gradients from micro-batches of pairs, with and without a cached frozen trunk, under sdpa and
    eager attention; and fewer token positions go through the model."""
    from hhh.rollout import PairTokens, Tokens

    policy = adapted_policy(tokenizer, attention, trunk)
    results = {}
    for share in (True, False):
        mb = minibatches(uneven_pairs(), tokenizer, DPOConfig(batch_size=4, share_prompt=share), "cpu")[0]
        assert isinstance(mb.tokens, PairTokens if share else Tokens) and mb.pairs == 4
        policy.zero_grad(set_to_none=True)
        with policy.frozen_trunk(mb.tokens) if trunk else contextlib.nullcontext():
            with torch.no_grad():
                ref = sequence_logps(policy, mb.tokens, reference=True)
            whole = sequence_logps(policy, mb.tokens)
            for part in (slice(0, 3), slice(3, 4)):
                idx, rows = mb.rows(part)
                s, m = sequence_logps(policy, rows)
                torch.testing.assert_close(s, whole[0][idx], rtol=1e-6, atol=1e-5)
                (s * torch.arange(1.0, 1 + len(s)) - 3 * m.sum()).sum().backward()  # uneven weights per row
        grads = [p.grad.clone() for p in policy.trainable_parameters()]
        results[share] = (ref, tuple(x.detach() for x in whole), grads, mb.tokens.ids().numel())
    packed, plain = results[True], results[False]
    for a, b in zip(packed[0] + packed[1], plain[0] + plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)  # sums of ~100 nats: float noise ~1e-5
    assert all(bool(g.abs().sum() > 0) for g in packed[2])
    for a, b in zip(packed[2], plain[2], strict=True):  # sums of many terms: float noise relative to the largest
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert packed[3] < plain[3]


def test_a_dpo_run_with_shared_prompts_logs_what_two_rows_log(tokenizer, tmp_path):
    """The same two epochs with share_prompt on (the default) and off: every logged metric within float noise."""
    from hhh.models import tiny_causal_lm

    pairs = Pairs(uneven_pairs().prompts * 2, uneven_pairs().chosen * 2, uneven_pairs().rejected * 2,
                  [False] * 8, [None] * 8)
    logs = {}
    for share in (True, False):
        config = DPOConfig(batch_size=4, micro_batch_size=3, epochs=2, lr=1e-2, share_prompt=share)
        run = RunDir.create("dpo", config, str(tmp_path / f"share{share}"))
        train_dpo(config, run, pairs, base=tiny_causal_lm(tokenizer, seed=0), tokenizer=tokenizer, console=None)
        logs[share] = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in run.metrics()]
    assert len(logs[True]) == 4 and logs[True][3]["loss/preference"] < logs[True][0]["loss/preference"]
    for packed, plain in zip(logs[True], logs[False], strict=True):
        assert packed == pytest.approx(plain, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("attention, shares", [("sdpa", True), ("eager", True), ("flash_attention_2", False)])
def test_attention_without_4d_masks_gets_two_rows_per_pair_and_a_line_saying_so(tokenizer, attention, shares):
    """flash-attention kernels read padding only: under one, DPO keeps two rows per pair rather than hand the model
    a mask it would misread; sdpa and eager take the 4D mask. share_prompt off is kept off, silently."""
    from io import StringIO

    from rich.console import Console

    from hhh.models import tiny_causal_lm
    from hhh.train.dpo import prompt_sharing

    base = tiny_causal_lm(tokenizer, seed=0)
    base.config._attn_implementation = attention  # build_policy runs no forward
    policy = build_policy(base, LoraSettings(r=4))
    text = StringIO()
    console = Console(file=text, width=200)
    assert policy.takes_4d_masks == shares
    assert prompt_sharing(DPOConfig(), policy, console).share_prompt == shares
    assert ("flash_attention_2 attention takes no 4D mask: two rows per pair" in text.getvalue()) == (not shares)
    assert prompt_sharing(DPOConfig(share_prompt=False), policy, console).share_prompt is False
    assert text.getvalue().count("\n") == (0 if shares else 1)
    mb = minibatches(toy_pairs(4), tokenizer, prompt_sharing(DPOConfig(), policy, Console(quiet=True)), "cpu")[0]
    assert mb.pairs == 4 and (mb.tokens.ids().shape[0] == (4 if shares else 8))


def test_dpo_logs_both_logps_and_the_implicit_rewards(tiny, tokenizer, tmp_path):
    config = DPOConfig(batch_size=4, epochs=1)
    run = RunDir.create("dpo", config, str(tmp_path / "run"))
    train_dpo(config, run, toy_pairs(), base=tiny, tokenizer=tokenizer, console=None)
    m = run.metrics()[0]
    for key in ("loss/preference", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected", "grad_norm", "lr"):
        assert key in m
    from hhh import metrics as M

    assert M.undocumented(m) == []
    assert m["loss/preference"] == pytest.approx(math.log(2), abs=1e-5) and m["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert len(run.metrics()) == 2  # 8 pairs / 4 per step


def test_dpo_command_on_a_pairs_file_and_on_self_built_pairs(tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes please", "rejected": "no"}) + "\n"
                             for i in range(6)))
    common = ["--model", tiny_dir, "--max-new-tokens", "6", "--eval-max-prompts", "2", "--eval-samples", "2",
              "--batch-size", "4", "--epochs", "1"]
    for extra, out in ((["--data", str(pairs)], "a"), (["--pair-prompts", "6", "--pair-samples", "2",
                                                        "--reward", "length:3"], "b")):
        proc = subprocess.run([sys.executable, "-m", "hhh.cli", "dpo", *common, *extra, "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run = tmp_path / out
        assert (run / "eval_before.json").is_file() and (run / "eval.json").is_file() and (run / "report.html").is_file()
        assert json.loads((run / "summary.json").read_text())["loss"] == "sigmoid"
    assert json.loads((tmp_path / "a" / "pairs.json").read_text())["pairs"] == 6


def test_dpo_straight_from_the_preference_store(tiny_dir, tmp_path):
    """Pairs imported into a real SQLite store by two labelers; `--labelers alice` trains on alice's ordered pairs
    only (her tie is left out)."""
    db = tmp_path / "fb.db"
    labels = {"alice": [{"prompt": f"a{i}", "chosen": "thanks, gladly", "rejected": "go away"} for i in range(4)]
              + [{"prompt": "a-tie", "chosen": "maybe", "rejected": "perhaps", "tie": True}],
              "bob": [{"prompt": f"b{i}", "chosen": "go away", "rejected": "thanks"} for i in range(3)]}
    for name, rows in labels.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        proc = subprocess.run([sys.executable, "-m", "hhh.cli", "label", "import", str(path), "--db", str(db),
                               "--labeler", name], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "dpo", "--data", f"db:{db}", "--labelers", "alice",
                           "--model", tiny_dir, "--max-new-tokens", "6", "--eval-max-prompts", "2", "--eval-samples",
                           "2", "--batch-size", "2", "--epochs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "pairs.json").read_text()) == {"pairs": 4, "source": f"db:{db}"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # 4 pairs, 2 per step


@pytest.mark.parametrize("argv, message", [(["dpo", "--loss", "xpo"], "flag --loss"),
                                           (["dpo", "--data", "missing.jsonl"], "no such file"),
                                           (["dpo", "--label-smoothing", "0.7"], "flag --label-smoothing")])
def test_dpo_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from hhh.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_training_forwards_run_with_dropout_off(tokenizer):
    """A LoRA dropout of 0.5 in the adapter's config: a training pass (policy.train(), gradients on) still gives the
    same log-probs twice, equal to a no-grad pass, as the cached reference and old log-probs assume."""
    from hhh.models import tiny_causal_lm

    policy = build_policy(tiny_causal_lm(tokenizer), LoraSettings(r=4, dropout=0.5))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    policy.train()
    mb = minibatches(toy_pairs(4), tokenizer, DPOConfig(batch_size=4), "cpu")[0]
    first, second = sequence_logps(policy, mb.tokens)[0], sequence_logps(policy, mb.tokens)[0]
    assert first.requires_grad
    with torch.no_grad():
        quiet = sequence_logps(policy, mb.tokens)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first.detach(), quiet)
    assert not any(m.training for m in policy.modules())


def test_preference_losses_score_log_probs_at_temperature_1(tiny, tokenizer, tmp_path):
    """Sampling at 0.7 leaves the DPO family's log-probs at T = 1 (the DPO paper's and TRL's beta): the first step's
    logged log-probs (the policy is still the base) are the base model's own, not those of logits / 0.7."""
    config = DPOConfig(batch_size=4, epochs=1, temperature=0.7)
    run = RunDir.create("dpo", config, str(tmp_path / "run"))
    pairs = toy_pairs(4)
    mb = minibatches(pairs, tokenizer, config.model_copy(update={"share_prompt": False}), "cpu")[0]  # 2b rows
    with torch.no_grad():
        logits = tiny(input_ids=torch.cat([mb.tokens.query_ids, mb.tokens.response_ids], 1),
                      attention_mask=torch.cat([mb.tokens.query_mask, mb.tokens.response_mask], 1)).logits
    train_dpo(config, run, pairs, base=tiny, tokenizer=tokenizer, console=None)
    R = mb.tokens.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, -R - 1:-1], -1).gather(-1, mb.tokens.response_ids[..., None]).squeeze(-1)
    chosen = float((logp * mb.tokens.response_mask)[:4].sum(-1).mean())
    assert run.metrics()[0]["logps/chosen"] == pytest.approx(chosen, rel=1e-4)


def test_simpo_has_the_papers_defaults():
    """SimPO: beta 2 and gamma / beta 0.5 (Meng et al. 2024); the rest of the family keeps beta 0.1; a beta given wins,
    and the margin follows it. At step 0 with mean log-probs m_w, m_l: -log sigma(2 (m_w - m_l) - 1)."""
    simpo = DPOConfig(loss="simpo")
    assert simpo.beta == 2.0 and simpo.simpo_gamma_ratio * simpo.beta == 1.0
    assert DPOConfig().beta == 0.1 and DPOConfig(loss="ipo").beta == 0.1
    assert DPOConfig(loss="simpo", beta=2.5).beta == 2.5
    mean = torch.tensor([-1.0, -1.5])
    loss = preference_loss(simpo, (mean * 3, mean), None)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2 * 0.5 - 1)))), abs=1e-6)


def test_kto_reference_point_pairs_every_example_with_the_next_ones_answer(tokenizer):
    """Examples [(x0, c0), (x1, c1), (x2, c2), (x0, r0), (x1, r1), (x2, r2)], desirable and undesirable alike; the
    mismatched set keeps the prompts and rotates the answers by one: c1, c2, r0, r1, r2, c0 (none answers its own
    prompt), as the KTO paper estimates z0 on the whole microbatch."""
    pairs = Pairs(["x0?", "x1?", "x2?"], ["c zero", "c one", "c two"], ["r zero", "r one", "r two"], [False] * 3,
                  [None] * 3)
    mb = minibatches(pairs, tokenizer, DPOConfig(loss="kto", batch_size=3, seed=0), "cpu")[0]
    order = [tokenizer.decode(mb.tokens.chosen_ids[k][mb.tokens.chosen_mask[k].bool()][:-1]) for k in range(3)]
    chosen_first = [pairs.chosen.index(c) for c in order]  # the minibatch's pair order (shuffled by the seed)
    answers = [pairs.chosen[i] for i in chosen_first] + [pairs.rejected[i] for i in chosen_first]
    mis = mb.mismatched
    assert mis.query_ids.shape[0] == 6
    got = [tokenizer.decode(mis.response_ids[k][mis.response_mask[k].bool()][:-1]) for k in range(6)]
    assert got == answers[1:] + answers[:1]
    torch.testing.assert_close(mis.query_ids, mb.tokens.query_ids.repeat(2, 1))  # each prompt, twice


def test_soft_labels_weight_each_pair_and_init_adapter_is_the_reference(tiny, tokenizer, tmp_path):
    """Pairs with P(chosen better) = 0.5 carry no signal: with every pair at 0.5 the gradient is exactly zero at
    the start (the policy equals the reference, h = 0, and 0.5 * sigma'(0) - 0.5 * sigma'(0) = 0); hard labels
    (probability None) move it. Starting from an adapter makes that adapter the reference: the first step's
    margin is 0 though the adapter is not the base."""
    pairs = toy_pairs()
    n = len(pairs)
    soft = Pairs(pairs.prompts, pairs.chosen, pairs.rejected, pairs.tie, pairs.margin, probability=[0.5] * n)
    config = DPOConfig(batch_size=4, epochs=1)
    run = RunDir.create("dpo", config, str(tmp_path / "soft"))
    train_dpo(config, run, soft, base=tiny, tokenizer=tokenizer, console=None)
    assert all(m["grad_norm"] == 0.0 for m in run.metrics())
    from hhh.models import tiny_causal_lm
    from hhh.models.load import remove_adapters

    base = tiny_causal_lm(tokenizer, seed=0)
    hard = RunDir.create("dpo", config, str(tmp_path / "hard"))
    first = train_dpo(DPOConfig(batch_size=4, epochs=2, lr=3e-2), hard, pairs, base=base, tokenizer=tokenizer,
                      console=None)
    assert hard.metrics()[0]["grad_norm"] > 0
    remove_adapters(first.lm)
    start = DPOConfig(batch_size=4, epochs=1, init_adapter=str(hard.path / "adapter"))
    again = RunDir.create("dpo", start, str(tmp_path / "again"))
    train_dpo(start, again, pairs, base=base, tokenizer=tokenizer, console=None)
    m = again.metrics()[0]
    assert m["rewards/margin"] == pytest.approx(0, abs=1e-5) and m["logps/chosen"] != pytest.approx(
        hard.metrics()[0]["logps/chosen"], abs=1e-3)
