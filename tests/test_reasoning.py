"""Chain-of-thought, self-consistency and the problem set: answers taken from messy output, majority votes, the
Wilson interval worked by hand, reasoning-gym's problems and scorer, and the whole evaluation with a scripted model
(deterministic) and, once, a tiny real model (the greedy path)."""

import math

import pytest
import torch

from hhh.apps.reasoning import (
    EXAMPLES,
    canonical,
    cot_conversation,
    direct_conversation,
    evaluate,
    extract_answer,
    is_correct,
    majority,
    problems,
    table,
    wilson,
)
from hhh.cai.critic import Generated, LocalCritic


def test_answers_are_taken_from_what_models_actually_write():
    assert extract_answer("14 * 25 = 350, minus 48 is 302.\nThe answer is 302.") == "302"
    assert extract_answer("So the final answer is: **1,200**") == "1200"
    assert extract_answer("The answer is $3.50.") == "3.5"
    assert extract_answer("First 2 + 2 = 4. Then \\boxed{16}") == "16"
    assert extract_answer("steps...\n#### -7") == "-7"
    assert extract_answer("Answer: 12.0") == "12"
    assert extract_answer("She has 3 apples and buys 4 more, 7 in all") == "7"  # no marker: the last number
    assert extract_answer("The answer is 5. Wait, 2 + 4 = 6. The answer is 6.") == "6"  # the last marker wins
    assert extract_answer("The answer is 3/4.") == "0.75"
    assert extract_answer("I am not sure.") is None
    assert extract_answer("") is None


def test_canonical_numbers():
    assert [canonical(x) for x in ("1,200", "$3.50", "12.0", "-0.50", "3/4", "1/0", "abc", "7.")] == \
        ["1200", "3.5", "12", "-0.5", "0.75", None, None, "7"]


def test_majority_vote_ignores_samples_without_an_answer_and_breaks_ties_by_first_seen():
    assert majority(["4", None, "5", "4", None]) == "4"
    assert majority([None, "5", "4", "4", "5"]) == "5"  # 2 against 2: "5" came first
    assert majority([None, None]) is None


def test_wilson_interval_by_hand():
    # k = 8 of n = 10, z = 1.96: centre = (0.8 + 0.192) / 1.384 = 0.7168; half = 1.96 * sqrt(0.016 + 0.0096) / 1.384
    lo, hi = wilson(8, 10)
    z = 1.959964
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 50)[0] == 0.0 and 0.06 < wilson(0, 50)[1] < 0.08  # never below 0, wide enough at 0/n
    assert wilson(0, 0) == (0.0, 1.0)


def test_the_problem_set_is_fixed_by_its_seed_and_scored_by_reasoning_gym():
    a, b, c = problems(10, seed=3), problems(10, seed=3), problems(10, seed=4)
    assert [p.question for p in a] == [p.question for p in b] != [p.question for p in c]
    assert [p.task for p in a] == ["gsm_symbolic"] * 5 + ["basic_arithmetic"] * 5
    for p in a:
        assert is_correct(canonical(p.answer), p)
        assert is_correct(canonical(p.answer + ".0"), p)  # "44.0" is 44
        assert not is_correct(str(int(float(p.answer)) + 1), p) and not is_correct(None, p)
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        problems(4, tasks=["gsm9k"])


def test_prompts_hold_the_worked_examples():
    cot, direct = cot_conversation("What is 2 + 2?"), direct_conversation("What is 2 + 2?")
    assert len(cot) == len(direct) == 2 * len(EXAMPLES) + 1
    assert cot[1]["content"].endswith(f"The answer is {EXAMPLES[0][2]}.") and direct[1]["content"] == EXAMPLES[0][2]
    assert cot[-1]["content"].startswith("What is 2 + 2?") and "step by step" in cot[-1]["content"]


class Scripted:
    """Replies by the prompt kind (direct / chain-of-thought) and question; samples in turn from a list."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, conversations, *, max_new_tokens, temperature, generator):
        self.calls.append((len(conversations), temperature))
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            kind = "cot" if "step by step" in last else "direct" if "number only" in last else "pal"
            key = next(k for k in self.replies if k in last)
            script = self.replies[key][kind]
            out.append(Generated(script.pop(0) if isinstance(script, list) else script, True))
        return out


def test_evaluation_scores_each_method_with_intervals_and_extraction_failures():
    probs = problems(2, seed=0)  # one gsm_symbolic, one basic_arithmetic
    g0, g1 = probs[0].answer, probs[1].answer
    model = Scripted({
        probs[0].question[:40]: {"direct": "I cannot say", "cot": f"... The answer is {g0}.",
                                 "sc": None, "pal": None},
        probs[1].question[:40]: {"direct": g1, "cot": "The answer is 99999.", "pal": None},
    })
    model.replies[probs[0].question[:40]]["cot"] = [f"... The answer is {g0}."] + \
        [f"The answer is {g0}.", "no idea", f"The answer is {g0}."]
    model.replies[probs[1].question[:40]]["cot"] = ["The answer is 99999.", f"The answer is {g1}.",
                                                    "The answer is 1.", f"The answer is {g1}."]
    report = evaluate(model, probs, methods=("direct", "cot", "sc"), k=3, seed=0)
    rows = {s["method"]: s for s in report["scores"]}
    assert (rows["direct"]["correct"], rows["direct"]["failed_extraction"]) == (1, 1)
    assert (rows["cot"]["correct"], rows["cot"]["failed_extraction"]) == (1, 0)
    assert (rows["sc"]["correct"], rows["sc"]["failed_extraction"]) == (2, 0)  # majorities: g0 (2 of 3), g1 (2 of 3)
    assert report["records"][0]["sc_samples"] == [g0, None, g0]
    assert rows["sc"]["ci95"] == pytest.approx(list(wilson(2, 2)))
    assert [t for _, t in model.calls] == [0.0, 0.0, 0.7]  # direct and CoT greedy, SC sampled
    assert model.calls[2][0] == 6  # k samples of each problem in one call
    assert report["by_task"]["gsm_symbolic"][0]["correct"] == 0 and report["by_task"]["basic_arithmetic"][0]["correct"] == 1
    assert "| CoT + self-consistency (k=3) | 2/2 = 100.0% (34.2%-100.0%) | 0.0% |" in table(report)
    with pytest.raises(ValueError, match="k: self-consistency needs at least 2"):
        evaluate(model, probs, methods=("sc",), k=1)
    with pytest.raises(ValueError, match="methods: unknown tot"):
        evaluate(model, probs, methods=("tot",))


def test_greedy_generation_is_the_argmax_path(tiny, tokenizer):
    model = tiny.eval()
    critic = LocalCritic(model, tokenizer, "tiny")
    convs = ["What is 2 + 2?", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "and 3 + 3?"}]]
    a = critic.generate(convs, max_new_tokens=6, temperature=0.0, generator=torch.Generator().manual_seed(0))
    b = critic.generate(convs, max_new_tokens=6, temperature=0.0, generator=torch.Generator().manual_seed(1))
    assert a == b
    # the same tokens as an argmax loop over full forward passes, one conversation at a time (no padding)
    from hhh.rollout import chat_prompt_ids

    for conv, got in zip(convs, a, strict=True):
        ids = chat_prompt_ids(tokenizer, [conv])[0]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                new.append(nxt)
        assert got.text == tokenizer.decode(new, skip_special_tokens=True).strip()
        assert got.ended == (len(new) < 6)


def test_react_is_a_method_too():
    """The ReAct loop on the same problems: its final answer is read like any other answer."""
    probs = problems(2, seed=0)

    class Agent:
        name = "agent"

        def generate(self, conversations, *, max_new_tokens, temperature, generator):
            out = []
            for conv in conversations:
                if conv[-1]["content"].startswith("Observation:"):
                    out.append(Generated(f"Thought: done\nFinal Answer: {conv[-1]['content'].split(': ')[1]}", True))
                elif probs[0].question in conv[-1]["content"]:
                    out.append(Generated(f"Thought: I know it\nAction: calculator\nAction Input: {probs[0].answer} "
                                         "+ 0", True))
                else:
                    out.append(Generated("I give up", True))
            return out

    report = evaluate(Agent(), probs, methods=("react",))
    row = report["scores"][0]
    assert (row["method"], row["correct"], row["failed_extraction"]) == ("react", 1, 1)
    assert report["records"][0]["react"]["trace"][0]["observation"] == probs[0].answer
    assert report["records"][1]["react"]["stopped"] == "parse_errors"
    assert "| ReAct (calculator, python) | 1/2 = 50.0%" in table(report)
