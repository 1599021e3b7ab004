"""hhh sft: demonstrations, the response-only loss, length buckets, held-out loss, the command."""

import json
import subprocess
import sys

import pytest
import torch

from hhh.config import SFTConfig
from hhh.data import DataError
from hhh.data.demos import Demos, load_demos
from hhh.runs import RunDir
from hhh.train.sft import batches, split_demos, train_sft


def toy_demos(n=12) -> Demos:
    return Demos([f"Question number {i}?" for i in range(n)],
                 ["Yes, gladly." if i % 2 else "Yes, gladly, here is a longer answer for you." for i in range(n)])


def test_prompt_tokens_get_no_loss_the_same_as_hf_labels_minus_100(tiny, tokenizer):
    """The SFT loss of a batch equals transformers' own causal-LM loss over prompt + response with the prompt and
    the padding labelled -100 (ignored): only response tokens (EOS included) count, averaged over the batch."""
    from hhh.models.load import LoraSettings
    from hhh.models.policy import build_policy
    from hhh.rollout import chat_prompt_ids
    from hhh.train.sft import nll

    demos = Demos(["Hi there, how are you today?", "Ok?"], ["Fine, thanks.", "Yes, it is perfectly fine with me."])
    config = SFTConfig(batch_size=2, bucket=False)
    batch = batches(demos, tokenizer, config, "cpu")[0]
    policy = build_policy(tiny, LoraSettings(r=4, alpha=8, dropout=0.0, top_layers=None), seed=0)
    with torch.no_grad():
        ours = float(nll(policy, batch))  # a fresh adapter (B = 0) computes the base model's function
    losses, counts = [], []
    for prompt, response in zip(demos.prompts, demos.responses, strict=True):
        # one unpadded row per demonstration, as any SFT script would build it
        q = chat_prompt_ids(tokenizer, [prompt])[0]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([q + r])
        labels = torch.tensor([[-100] * len(q) + r])
        with torch.no_grad():
            losses.append(float(tiny(input_ids=ids, labels=labels).loss) * len(r))
        counts.append(len(r))
    assert ours == pytest.approx(sum(losses) / sum(counts), rel=1e-5)
    # and a change to the prompt's tokens' targets cannot matter: the prompt is context only
    assert int(batch.response_mask.sum()) == sum(counts)


def test_sft_lowers_the_held_out_loss_and_saves_an_adapter(tiny, tokenizer, tmp_path):
    config = SFTConfig(batch_size=4, epochs=3, lr=1e-2, lora_layers=None, eval_fraction=0.25)
    run = RunDir.create("sft", config, str(tmp_path / "run"))
    trained = train_sft(config, run, toy_demos(), base=tiny, tokenizer=tokenizer, console=None)
    s = trained.summary
    assert s["examples"] == 9 and s["held_out"] == 3 and s["steps"] == 9  # 9 train demos / 4 -> 3 steps x 3 epochs
    # a tiny random model's tied embeddings are small, so its logits can move by about a nat or two at most: the
    # held-out loss starts near ln(vocab) = 10.8 and falls by ~0.9 here
    assert s["eval_loss"] < s["eval_loss_before"] - 0.5
    logs = run.metrics()
    evals = [m["sft/eval_loss"] for m in logs if "sft/eval_loss" in m]
    assert len(evals) == 4 and evals[0] == s["eval_loss_before"] and evals[-1] == s["eval_loss"]
    steps = [m for m in logs if "loss/sft" in m]
    assert steps[-1]["loss/sft"] < steps[0]["loss/sft"]
    from hhh import metrics as M

    assert all(M.undocumented(m) == [] for m in logs)
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()


def test_micro_batches_give_the_same_steps(tokenizer, tmp_path):
    """Gradient accumulation over micro-batches of 3, 3 and 2 == one pass over the 8 (rows of different lengths)."""
    from hhh.models import tiny_causal_lm

    logs = {}
    for micro in (8, 3):
        config = SFTConfig(batch_size=8, micro_batch_size=micro, epochs=2, lr=1e-2, eval_fraction=0.0, bucket=False)
        run = RunDir.create("sft", config, str(tmp_path / f"m{micro}"))
        train_sft(config, run, toy_demos(8), base=tiny_causal_lm(tokenizer, seed=0), tokenizer=tokenizer, console=None)
        logs[micro] = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in run.metrics()]
    assert len(logs[8]) == 2 and logs[8][1]["loss/sft"] < logs[8][0]["loss/sft"]
    for whole, parts in zip(logs[8], logs[3], strict=True):
        assert parts == pytest.approx(whole, rel=1e-4, abs=1e-6)


def test_length_buckets_pad_less_and_keep_every_demonstration(tokenizer):
    demos = Demos([f"q{i}" + " and more" * (i % 5) for i in range(24)],
                  ["ok" + " fine" * (7 * (i % 3)) for i in range(24)])
    bucketed = batches(demos, tokenizer, SFTConfig(batch_size=4, bucket=True), "cpu")
    shuffled = batches(demos, tokenizer, SFTConfig(batch_size=4, bucket=False), "cpu")
    real = int(sum(b.mask().sum() for b in bucketed))
    assert real == int(sum(b.mask().sum() for b in shuffled))  # the same tokens, once each
    assert sum(len(b) for b in bucketed) == 24
    padded = [sum(b.ids().numel() for b in bs) for bs in (bucketed, shuffled)]
    assert padded[0] < padded[1]


def test_held_out_split_is_by_prompt_and_seeded():
    demos = Demos(["a", "a", "b", "c", "d", "e", "f", "g", "h", "i"], [str(i) for i in range(10)])
    train, held = split_demos(demos, 0.2, seed=0)
    assert len(train) + len(held) == 10 and not set(train.prompts) & set(held.prompts)
    assert len(set(held.prompts)) == 2  # 20% of the 9 distinct prompts, rounded
    assert split_demos(demos, 0.2, seed=0) == (train, held) and split_demos(demos, 0.2, seed=1) != (train, held)
    assert len(split_demos(Demos(["x"], ["y"]), 0.5, seed=0)[0]) == 1  # never an empty training set


def test_demonstrations_from_jsonl_messages_and_store(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "more?"}, {"role": "assistant", "content": "r2"}]}) + "\n")
    d = load_demos(str(path))
    assert d.prompts[0] == "p1" and d.responses == ["r1", "r2"]
    assert d.prompts[1] == [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "a"},
                            {"role": "user", "content": "more?"}]
    # the store: each prompt's completions that were preferred and never ranked below another
    from hhh.feedback.store import Store

    store = Store(str(tmp_path / "fb.db"))
    pid = store.add_prompt("How do I ask my neighbour to be quieter?")
    ids = [store.add_completion(pid, t, model="m") for t in ("Ask kindly.", "Shout at them.", "Knock and ask.")]
    lab = store.labeler_id(store.add_labeler("ann") and "ann")
    store.submit(lab, pid, [[ids[0], ids[2]], [ids[1]]], submission_id="s1")
    d = load_demos(f"db:{tmp_path / 'fb.db'}")
    assert sorted(d.responses) == ["Ask kindly.", "Knock and ask."] and set(d.prompts) == {
        "How do I ask my neighbour to be quieter?"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p"}', "d.jsonl:1: missing field 'response'"),
    ('{"prompt": "p", "response": ""}', "d.jsonl:1: field 'response' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "p"}]}', "must list at least a user and an assistant"),
    ('{"messages": [{"role": "bot", "content": "p"}, {"role": "assistant", "content": "r"}]}', "messages[0] needs a role"),
    ('{"messages": [{"role": "assistant", "content": "p"}, {"role": "user", "content": "r"}]}', "last message must be"),
    ('{"prompt": "p", "response": "r"', "d.jsonl:1: invalid JSON"),
])
def test_bad_demonstrations_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError) as err:
        load_demos(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sft_command_runs_as_a_user_would(tiny_dir, tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "gladly, here you go"}) + "\n"
                            for i in range(10)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "sft", "--data", str(data), "--model", tiny_dir,
                           "--max-new-tokens", "6", "--eval-max-prompts", "2", "--eval-samples", "2", "--batch-size",
                           "4", "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "eval_before.json").is_file() and (out / "eval.json").is_file() and (out / "report.html").is_file()
    assert json.loads((out / "sft_data.json").read_text())["train"] == 9
    assert json.loads((out / "summary.json").read_text())["held_out"] == 1


@pytest.mark.parametrize("argv, message", [(["sft"], "hhh sft needs demonstrations"),
                                           (["sft", "--data", "missing.jsonl"], "no such file"),
                                           (["sft", "--data", "x.jsonl", "--eval-fraction", "1.5"],
                                            "flag --eval-fraction")])
def test_sft_errors_are_one_line_and_leave_no_run_folder(argv, message, capsys, tmp_path, monkeypatch):
    from hhh.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_demonstration_that_did_not_end_gets_no_eos(tokenizer):
    """A truncated answer (cut at the token limit) trains its tokens but not a stop where it was cut: its row has
    no EOS, a finished one ends with EOS."""
    demos = Demos(["q1", "q2"], ["a finished answer.", "an answer that was cut"], ended=[True, False])
    batch = batches(demos, tokenizer, SFTConfig(batch_size=2, bucket=False, seed=0), "cpu")[0]
    rows = {tokenizer.decode(r[m.bool()]): bool((r[m.bool()] == tokenizer.eos_token_id).any())
            for r, m in zip(batch.response_ids, batch.response_mask, strict=True)}
    assert rows == {"a finished answer.<|im_end|>": True, "an answer that was cut": False}
    assert demos.take([1]).ended == [False] and (demos + demos).ended == [True, False, True, False]


def test_jsonl_demonstrations_may_say_they_did_not_end(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b", "ended": False}) + "\n"
                    + json.dumps({"prompt": "c", "response": "d"}) + "\n")
    assert load_demos(str(path)).ended == [False, True]
    path.write_text(json.dumps({"prompt": "a", "response": "b", "ended": "no"}) + "\n")
    with pytest.raises(DataError, match="d.jsonl:1: field 'ended' must be true or false"):
        load_demos(str(path))
