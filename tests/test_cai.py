"""Constitutional AI: the constitution, prompts, filters, labels, and both stages on a tiny model."""

import json
import subprocess
import sys

import pytest
import torch

from hhh.cai.constitution import load_constitution
from hhh.config import ConfigError

GOOD = '''
[[principle]]
name = "harm"
critique = "What is harmful?"
revision = "Rewrite it harmlessly."

[[principle]]
name = "honesty"
critique = "What is false?"
revision = "Rewrite it truthfully."

[[comparison]]
name = "better"
question = "Which is better?"
'''


def test_default_constitution_covers_harm_honesty_helpfulness_and_evasion():
    c = load_constitution()
    names = {p.name for p in c.principle}
    assert len(c.principle) >= 16 and len(c.comparison) >= 4 and len(c.example) >= 2
    assert {"harm", "honesty", "helpfulness", "no-evasion"} <= names
    assert all(p.critique and p.revision for p in c.principle)


def test_principle_is_drawn_per_prompt_from_the_seed():
    c = load_constitution()
    first = [c.principle_for(0, i).name for i in range(40)]
    assert first == [c.principle_for(0, i).name for i in range(40)]  # same seed, same draw, in any order
    assert first != [c.principle_for(1, i).name for i in range(40)]
    assert len(set(first)) > 8  # spread over the principles


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('revision = "Rewrite it truthfully."\n', ""),
     "principle 2 ('honesty'): field 'revision' is missing"),
    (lambda s: s.replace('critique = "What is false?"', 'critique = "  "'),
     "principle 2 ('honesty'): field 'critique' String should have at least 1 character"),
    (lambda s: s.replace('critique = "What is false?"', 'critique = "What is false?"\ncritic = "x"'),
     "principle 2 ('honesty'): field 'critic' is not a known field"),
    (lambda s: s.replace('name = "honesty"', 'name = "harm"'), "principle 2 ('harm'): name repeats"),
    (lambda s: s.replace("[[comparison]]", "[[comparisons]]"), "unknown table 'comparisons'"),
    (lambda s: s.split("[[comparison]]")[0], "[[comparison]] needs at least one entry"),
    (lambda s: s.replace('critique = "What is harmful?"', "critique = 3"),
     "principle 1 ('harm'): field 'critique' Input should be a valid string (got 3)"),
    (lambda s: 'principle = "x"\n', "'principle' must be an array of tables"),
    (lambda s: s + "[[principle\n", "invalid TOML"),
])
def test_bad_constitution_is_one_line_naming_the_entry_and_field(tmp_path, edit, message):
    path = tmp_path / "c.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ConfigError) as err:
        load_constitution(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"constitution {path}") and message in text, text


def test_missing_constitution_file(tmp_path):
    with pytest.raises(ConfigError, match=r"constitution .*nope.toml: not found"):
        load_constitution(tmp_path / "nope.toml")
    (tmp_path / "good.toml").write_text(GOOD)
    assert [p.name for p in load_constitution(tmp_path / "good.toml").principle] == ["harm", "honesty"]


def test_an_example_must_name_a_principle_of_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(GOOD + '\n[[example]]\nprinciple = "kindness"\nprompt = "p"\nanswer = "a"\ncritique = "c"\n'
                           'revision = "r"\n')
    with pytest.raises(ConfigError, match=r"example 1: field 'principle' names no principle \('kindness'\)"):
        load_constitution(path)


# --- the supervised stage ---------------------------------------------------------------------------------------------
def test_conversations_carry_examples_then_the_request_in_the_critics_chat_template(tokenizer):
    from hhh.cai.sl import critique_conversation, revision_conversation
    from hhh.rollout import chat_prompt_ids

    c = load_constitution()
    p = c.named("harm")
    crit = critique_conversation(c, p, "Insult me.", "You fool.", few_shot=2)
    assert len(crit) == 2 * 6 + 3 and [m["role"] for m in crit[:6]] == ["user", "assistant"] * 3
    ex = c.example[0]
    assert crit[0]["content"] == ex.prompt and crit[2]["content"] == c.named(ex.principle).critique
    assert crit[5]["content"] == ex.revision
    assert crit[-3:] == [{"role": "user", "content": "Insult me."}, {"role": "assistant", "content": "You fool."},
                         {"role": "user", "content": p.critique}]
    rev = revision_conversation(c, p, "Insult me.", "You fool.", "It insults.", few_shot=0)
    assert rev == [{"role": "user", "content": "Insult me."}, {"role": "assistant", "content": "You fool."},
                   {"role": "user", "content": p.critique}, {"role": "assistant", "content": "It insults."},
                   {"role": "user", "content": p.revision}]
    # through the tokenizer's own chat template, ending where the assistant's next turn starts
    ids = chat_prompt_ids(tokenizer, [rev])[0]
    expected = tokenizer.apply_chat_template(rev, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids) == expected and expected.rstrip().endswith("<|im_start|>assistant")
    assert expected.count("<|im_start|>user") == 3


def _record(answer="You are a fool and I hate you.", revision="Please tell me what is wrong, and we can talk.",
            critique="The answer insults the user.", ended=True, prompt="Insult me."):
    return {"index": 0, "prompt": prompt, "answer": answer, "answer_ended": True,
            "rounds": [{"principle": "harm", "critique": critique, "critique_ended": True, "revision": revision,
                        "revision_ended": ended}], "revision": revision}


@pytest.mark.parametrize("record, relevance, reason", [
    (_record(), 0.5, None),
    (_record(ended=False), 0.5, "truncated"),
    (_record(revision="Okay."), 0.5, "empty"),
    (_record(revision="You are a fool and I hate you."), 0.5, "copied"),
    (_record(revision="You are a fool and I hate you!"), 0.5, "copied"),  # case and punctuation aside
    (_record(revision="The answer insults the user."), 0.5, "copied"),  # the critique, not a revision
    (_record(), 0.05, "off-topic"),
])
def test_revision_filters(record, relevance, reason):
    from hhh.cai.sl import filter_reason
    from hhh.config import CAIConfig

    assert filter_reason(record, relevance, CAIConfig()) == reason


def test_off_topic_filter_uses_minilm_similarity_to_the_prompt():
    from hhh.cai.sl import apply_filters
    from hhh.config import CAIConfig

    on = _record(prompt="Write a rude message to my noisy neighbour.",
                 revision="Hi, could you keep the music down after ten? It keeps me awake.")
    off = _record(prompt="Write a rude message to my noisy neighbour.",
                  revision="Photosynthesis converts light into chemical energy in plants.")
    counts = apply_filters([on, off], CAIConfig())
    assert on["kept"] and not off["kept"] and off["reason"] == "off-topic" and on["relevance"] > off["relevance"]
    assert counts == {"revisions": 2, "kept": 1, "filtered": {"truncated": 0, "empty": 0, "copied": 0,
                                                              "off-topic": 1}, "filtered_share": 0.5}


def _cai(ending_dir, out, *extra, stage="sl"):
    return subprocess.run([sys.executable, "-m", "hhh.cli", "cai", stage, "--model", ending_dir, "--max-prompts", "6",
                           "--sample-batch-size", "4", "--few-shot", "1", "--max-new-tokens", "8",
                           "--critique-tokens", "24", "--revision-tokens", "24", "--max-benign", "4",
                           "--min-relevance", "-1", "--eval-max-prompts", "2", "--eval-samples", "2",
                           "--sft-epochs", "1", "--sft-batch-size", "4", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600)


def test_supervised_stage_on_a_tiny_model_and_resume(ending_dir, tmp_path):
    """Both parts of SL-CAI run as a user would; every text is kept; a run resumed after its first batch writes
    exactly the records of the uninterrupted run."""
    out = tmp_path / "run"
    proc = _cai(ending_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "sl" / "revisions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    assert all(len(r["rounds"]) == 1 and r["rounds"][0]["principle"] and "kept" in r for r in records)
    filters = json.loads((out / "sl" / "filters.json").read_text())
    assert filters["revisions"] == 6 and filters["kept"] == sum(r["kept"] for r in records)
    data = [json.loads(line) for line in (out / "sl" / "dataset.jsonl").read_text().splitlines()]
    benign = [json.loads(line) for line in (out / "sl" / "benign.jsonl").read_text().splitlines()]
    assert len(data) == filters["kept"] + sum(b["kept"] for b in benign) > 0
    assert {d["response"] for d in data} == {r["revision"] for r in records if r["kept"]} | {
        b["answer"] for b in benign if b["kept"]}
    for name in ("eval_base.json", "sl/eval.json", "sl/adapter/adapter_model.safetensors", "sl/config.toml",
                 "sl/metrics.jsonl", "report.html"):
        assert (out / name).is_file(), name
    assert "refusal_rate" in json.loads((out / "sl" / "eval.json").read_text())["redteam:eval"]
    page = (out / "report.html").read_text()
    assert "first answer" in page and "SL-CAI" in page and records[0]["prompt"] in page
    # the store: every text, each kept revision ranked above its answer by the AI labeler
    from hhh.feedback.store import Store

    store = Store(str(out / "sl" / "feedback.db"))
    assert store.counts()["prompts"] == 6
    pairs = store.pairs(source="ai")
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs} == {
        (r["prompt"], r["revision"], r["answer"]) for r in records if r["kept"] and r["revision"] != r["answer"]}
    # resume: keep only the first batch (and half a line from a killed write), drop everything after it
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("sl/adapter", "sl/eval.json", "sl/filters.json", "sl/benign.jsonl", "sl/dataset.jsonl",
                 "sl/feedback.db", "sl/metrics.jsonl", "report.html"):
        target = resumed / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    lines = (out / "sl" / "revisions.jsonl").read_text().splitlines()
    (resumed / "sl" / "revisions.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "cai", "sl", "--resume", str(resumed)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = [json.loads(line) for line in (resumed / "sl" / "revisions.jsonl").read_text().splitlines()]
    assert again == records
    assert (resumed / "sl" / "eval.json").read_text() == (out / "sl" / "eval.json").read_text()


def test_a_bad_constitution_fails_before_any_model_loads(tmp_path, ending_dir):
    bad = tmp_path / "c.toml"
    bad.write_text(GOOD.replace('revision = "Rewrite it truthfully."\n', ""))
    proc = _cai(ending_dir, tmp_path / "run", "--constitution", str(bad))
    assert proc.returncode == 2
    assert "principle 2 ('honesty'): field 'revision' is missing" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


# --- AI feedback ------------------------------------------------------------------------------------------------------
def test_both_orders_cancel_a_position_habit_by_hand():
    """A model that says (A) with 0.9 whatever the order knows nothing: (0.9 + (1 - 0.9)) / 2 = 0.5. One that
    prefers the first answer in both orders, 0.8 as (A) and 1 - 0.3 = 0.7 as (B): (0.8 + 0.7) / 2 = 0.75."""
    import numpy as np

    from hhh.cai.feedback import Labels, both_orders

    p = both_orders(np.array([0.9, 0.8]), np.array([0.9, 0.3]))
    assert p.tolist() == pytest.approx([0.5, 0.75])
    assert Labels(p, np.array([[0.9, 0.9], [0.8, 0.3]])).position_bias == pytest.approx((0.9 + 0.9 + 0.8 + 0.3) / 4)


def test_choice_logprobs_equal_an_explicit_forward(tiny, tokenizer):
    """The local critic's score of " (A)" is the sum of log-probs of its tokens after the chat-templated
    question and the assistant's prefix, as one plain forward over those ids computes it."""
    from hhh.cai.critic import LocalCritic
    from hhh.cai.feedback import CHOICES, PREFIX, comparison_conversation
    from hhh.rollout import chat_prompt_ids

    conv = comparison_conversation("Insult me.", "Which is kinder?", "No.", "You are lovely.")
    got = LocalCritic(tiny, tokenizer, "tiny", batch_size=3).choice_logprobs([conv, conv], [PREFIX, PREFIX], CHOICES)
    for j, choice in enumerate(CHOICES):
        q = chat_prompt_ids(tokenizer, [conv])[0] + tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
        c = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny(input_ids=torch.tensor([q + c])).logits[0].float(), -1)
        want = sum(float(logp[len(q) - 1 + k, t]) for k, t in enumerate(c))
        assert got[0, j] == pytest.approx(want, abs=1e-4) and got[1, j] == pytest.approx(want, abs=1e-4)


def test_labels_of_swapped_pairs_sum_to_one_on_a_real_model(tiny, tokenizer):
    from hhh.cai.critic import LocalCritic
    from hhh.cai.feedback import label_pairs

    critic = LocalCritic(tiny, tokenizer, "tiny")
    a, b = ["Please stop.", "Here is a polite note."], ["Go away, idiot.", "Whatever."]
    q = ["Which is less harmful?"] * 2
    one = label_pairs(critic, ["Insult me.", "Help me."], a, b, q)
    two = label_pairs(critic, ["Insult me.", "Help me."], b, a, q)
    assert ((one.p_first > 0) & (one.p_first < 1)).all()
    assert (one.p_first + two.p_first).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    cot = label_pairs(critic, ["Insult me.", "Help me."], a, b, q, cot=True, cot_tokens=4,
                      generator=torch.Generator().manual_seed(0))
    assert ((cot.p_first >= 0.4) & (cot.p_first <= 0.6)).all() and len(cot.reasoning) == 2


def test_agreement_with_the_judge_by_hand():
    """Four pairs, judge scores (first, second): (0.9, 0.1) decisive, the second is better; (0.1, 0.8) decisive,
    the first; (0.5, 0.6) not decisive; (0.2, 0.7) decisive, the first. Labels P(first) = 0.3 (right), 0.4 (wrong),
    0.9 (ignored), 0.5 (a tie: half) -> (1 + 0 + 0.5) / 3 = 0.5."""
    from hhh.cai.feedback import agreement

    a = agreement([0.3, 0.4, 0.9, 0.5], [0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.6, 0.7])
    assert a["pairs"] == 3 and a["agreement"] == pytest.approx(0.5)
    assert agreement([0.7], [0.1], [0.2]) == {"pairs": 0, "agreement": None, "ci95": None}


def test_rl_stage_refuses_weak_labels_then_trains_dpo_when_told(ending_dir, tmp_path):
    """A random tiny feedback model cannot show agreement with the judge: the RL stage keeps its labels, audit and
    store, refuses to train (exit 2, one line naming the override), and a resume with the override trains DPO from
    the SL-CAI adapter and evaluates it."""
    out = tmp_path / "run"
    proc = _cai(ending_dir, out, "--rl-max-prompts", "6", "--rl-epochs", "1", "--rl-batch-size", "2", stage="all")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "RL-CAI refused" in proc.stderr and "--rl-allow-weak-labels" in proc.stderr
    labels = [json.loads(line) for line in (out / "rl" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 6 and all(0 < r["p_first"] < 1 and len(r["p_a"]) == 2 for r in labels)
    sl_prompts = {json.loads(line)["prompt"] for line in (out / "sl" / "revisions.jsonl").read_text().splitlines()}
    assert not sl_prompts & {r["prompt"] for r in labels}  # the RL stage answers prompts the SL stage did not see
    audit = json.loads((out / "rl" / "audit.json").read_text())
    assert audit["passed"] is False and audit["pairs_labelled"] == 6 and 0 <= audit["position_bias"] <= 1
    from hhh.feedback.store import Store

    stored = Store(str(out / "rl" / "feedback.db")).pairs(ties=False, source="ai")
    # exactly 0.5 is a tie (no ordered pair); every other pair carries the probability of its better answer
    assert {p["probability"] for p in stored} == {max(r["p_first"], 1 - r["p_first"]) for r in labels
                                                  if r["p_first"] != 0.5}
    assert "RL stage: AI feedback" in (out / "report.html").read_text()
    assert not (out / "rl" / "dpo").exists()
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "cai", "--resume", str(out), "--rl-allow-weak-labels"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "rl" / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    dpo_config = (out / "rl" / "dpo" / "config.toml").read_text()
    assert "init_adapter" in dpo_config and str(out / "sl" / "adapter") in dpo_config
    assert "kl/per_completion" in json.loads((out / "rl" / "eval.json").read_text())["redteam:eval"]
    assert "RL-CAI" in (out / "report.html").read_text()


def test_rl_stage_with_a_reward_model_and_ppo(ending_dir, tmp_path):
    out = tmp_path / "run"
    proc = _cai(ending_dir, out, "--rl-max-prompts", "6", "--rl-method", "ppo", "--rl-allow-weak-labels",
                "--rl-ppo-steps", "1", stage="all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "rl" / "rm" / "model" / "rm.json").is_file()
    ppo = (out / "rl" / "ppo" / "config.toml").read_text()
    assert f'reward = "rm:{out / "rl" / "rm"}"' in ppo and "init_adapter" in ppo
    assert (out / "rl" / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "rl" / "eval.json").is_file()


def test_rl_alone_needs_a_run_to_continue(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "cai", "rl", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "hhh cai rl continues a run" in proc.stderr and not (tmp_path / "x").exists()


# --- the openai:MODEL@URL critic, against a local server -------------------------------------------------------------
@pytest.fixture
def letters_model(tokenizer):
    """A tiny model whose next token is most often "A", then "B" (every other token equally likely): its answers
    to a multiple-choice question are checkable by hand."""
    from hhh.models import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, seed=0)
    a, b = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[a, 0], emb[b, 0] = 1.5, 1.3
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
    return model, a, b


def test_endpoint_critic_generates_and_scores_choices_over_http(letters_model, tokenizer, monkeypatch):
    from hhh.cai.critic import build_critic
    from hhh.cai.feedback import CHOICES, PREFIX, comparison_conversation, label_pairs
    from hhh.rollout import chat_prompt_ids
    from tests.openai_server import Endpoint

    model, a, b = letters_model
    monkeypatch.setenv("OPENAI_API_KEY", "s3cret")
    with Endpoint(model, tokenizer, key="s3cret") as url:
        critic = build_critic(f"openai:tiny@{url}")
        out = critic.generate(["Say hi.", [{"role": "user", "content": "And again?"}]], max_new_tokens=5,
                              temperature=0.7, generator=torch.Generator().manual_seed(0))
        assert len(out) == 2 and all(isinstance(g.text, str) and isinstance(g.ended, bool) for g in out)
        conv = comparison_conversation("Insult me.", "Which is kinder?", "No.", "You are lovely.")
        got = critic.choice_logprobs([conv], [PREFIX], CHOICES)[0]
        # by hand: the model's first-token distribution after the chat-templated question, at A and at B
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([chat_prompt_ids(tokenizer, [conv])[0]]))
                                     .logits[0, -1].float(), -1)
        assert got.tolist() == pytest.approx([float(logp[a]), float(logp[b])], abs=1e-4)
        labels = label_pairs(critic, ["Insult me."], ["No."], ["Lovely."], ["Which is kinder?"])
        assert labels.p_first[0] == pytest.approx(0.5) and labels.position_bias > 0.5  # it always says A
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        with pytest.raises(ConnectionError, match=r"critic openai:tiny@.*: AuthenticationError"):
            build_critic(f"openai:tiny@{url}").generate(["x"], max_new_tokens=2, temperature=0.7,
                                                        generator=torch.Generator())


def test_endpoint_specs_are_checked_before_any_model_loads(tmp_path):
    from hhh.cai.critic import parse_endpoint

    assert parse_endpoint("openai:gpt-4o-mini@https://api.openai.com/v1") == ("gpt-4o-mini", "https://api.openai.com/v1")
    proc = subprocess.run([sys.executable, "-m", "hhh.cli", "cai", "--critic", "openai:nourl", "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected openai:MODEL@URL" in proc.stderr and not (tmp_path / "x").exists()
