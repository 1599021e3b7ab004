"""PAL: programs taken from messy model output, run in the sandbox, and a failed program sent back with its error
for another try. The model here is scripted: the loop and the parser are checked deterministically."""

import pytest

from hhh.apps.pal import EXAMPLES, as_number, conversation, extract_code, solve
from hhh.apps.sandbox import available
from hhh.cai.critic import Generated

needs_sandbox = pytest.mark.skipif(available() is not None, reason=available() or "")


def test_code_is_taken_from_what_models_actually_write():
    assert extract_code("Sure!\n```python\nx = 2\nanswer = x * 3\n```\nThat gives 6.") == "x = 2\nanswer = x * 3"
    assert extract_code("```py\nanswer = 1\n```") == "answer = 1"
    assert extract_code("```\nanswer = 5\n```") == "answer = 5"
    assert extract_code("```python\nanswer = 7\nprint(answer") == "answer = 7\nprint(answer"  # cut at the limit
    assert extract_code("answer = 3 + 4\nprint(answer)") == "answer = 3 + 4\nprint(answer)"  # bare code
    assert extract_code("The answer is 7.") == ""
    assert extract_code("first\n```python\nanswer = 1\n```\n```python\nanswer = 2\n```") == "answer = 1"


def test_the_prompt_holds_the_worked_examples_then_the_question():
    turns = conversation("What is 6 * 7?")
    assert [t["role"] for t in turns] == ["user", "assistant"] * len(EXAMPLES) + ["user"]
    assert turns[-1]["content"].endswith("What is 6 * 7?") and "```python" in turns[1]["content"]


def test_answers_read_as_numbers():
    assert [as_number(a) for a in ("391", "12.0", "'7'", "Fraction(3, 4)", "'1,200'", "'seven'", None)] == \
        [391, 12.0, 7, 0.75, 1200, None, None]


class Scripted:
    """A 'model' that answers from a script, one reply per call per conversation, and keeps what it was shown."""

    name = "scripted"

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies, self.seen = replies, []

    def generate(self, conversations, *, max_new_tokens, temperature, generator):
        self.seen.append(conversations)
        out = []
        for conv in conversations:
            question = next(t["content"] for t in reversed(conv) if t["role"] == "user" and "?" in t["content"])
            key = next(k for k in self.replies if k in question)
            out.append(Generated(self.replies[key].pop(0), True))
        return out


@needs_sandbox
def test_a_failed_program_goes_back_with_its_error_and_the_fix_is_taken():
    model = Scripted({
        "apples": ["```python\ncount = 3 * 4\nanswer = cuont + 1\n```", "```python\ncount = 3 * 4\nanswer = count + 1\n```"],
        "pears": ["```python\nanswer = 10 // 3\n```"],
        "plums": ["I think it is 5.", "Still 5."],
    })
    got = solve(model, ["How many apples are in 3 bags of 4, plus one?", "How many pears each?",
                        "How many plums?"], retries=1)
    assert [s.answer for s in got] == ["13", "3", None]
    assert [len(s.attempts) for s in got] == [2, 1, 2]
    assert "NameError: name 'cuont' is not defined (line 2)" in got[0].attempts[0].result.error
    second_round = model.seen[1]  # only the two that failed were asked again, each shown why
    assert len(second_round) == 2
    assert "Your program failed: NameError: name 'cuont' is not defined (line 2)" in second_round[0][-1]["content"]
    assert "could not find a program" in second_round[1][-1]["content"]
    assert got[2].error == "no program in the answer"


@needs_sandbox
@pytest.mark.slow
def test_the_bundled_model_writes_programs_the_sandbox_runs():
    """SmolLM2-135M through the whole loop. It is weak (2 of 6 hand-made word problems right, measured); what is
    asserted is the plumbing: its real output yields programs, the sandbox runs them, numbers come back."""
    from hhh.cai.critic import build_critic

    got = solve(build_critic("bundled:smollm2-135m-instruct"),
                ["A shop sells 7 boxes of 12 eggs. How many eggs is that?",
                 "Tom has 45 marbles and gives away 17. How many are left?"], retries=1)
    assert all(s.attempts and s.attempts[0].code for s in got)
    assert all(a.result is not None for s in got for a in s.attempts)
    assert any(as_number(s.answer) is not None for s in got)


@needs_sandbox
def test_a_program_that_prints_its_result_instead_of_setting_answer_is_read_from_its_output():
    model = Scripted({
        "eggs": ["```python\ntotal = 7 * 12\nprint(f'There are {total:,} eggs.')\n```"],
        "geese": ["```python\nprint('geese')\n```", "```python\nanswer = 4\n```"],
    })
    eggs, geese = solve(model, ["How many eggs?", "How many geese?"], retries=1)
    assert (eggs.answer, eggs.from_stdout, len(eggs.attempts)) == ("84", True, 1)
    assert (geese.answer, geese.from_stdout, len(geese.attempts)) == ("4", False, 2)  # nothing numeric: asked again
    assert "did not set the variable answer" in model.seen[1][0][-1]["content"]
