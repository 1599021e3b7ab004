"""ReAct: the parser on what models actually write, the loop with a scripted model (tool calls, observations,
parse errors shown back, the step limit, the trace), and the tools (calculator, sandboxed python, user functions
with typed arguments)."""

import json

import pytest

from hhh.apps.react import EXAMPLE, Act, Finish, ParseError, conversation, parse, run_agent, save_trace
from hhh.apps.sandbox import available
from hhh.apps.tools import ToolError, calculator, default_tools, load_tool, python, tool
from hhh.cai.critic import Generated

TOOLS = ["calculator", "python", "search"]


def test_parser_reads_actions_and_final_answers():
    assert parse("Thought: multiply\nAction: calculator\nAction Input: 17 * 23", TOOLS) == \
        Act("multiply", "calculator", "17 * 23")
    assert parse("Thought: done\nFinal Answer: 391", TOOLS) == Finish("done", "391")
    # markdown bold, backticks, lower case, and the model inventing its own observation afterwards
    assert parse("**Thought:** go\n**Action:** `calculator`\naction input: `2+2`\nObservation: 5\nThought: so 5\n"
                 "Final Answer: 5", TOOLS) == Act("go", "calculator", "2+2")
    # the inline forms some models use
    assert parse("Thought: x\nAction: calculator[3 * 3]", TOOLS) == Act("x", "calculator", "3 * 3")
    assert parse("Action: python(answer = 1)", TOOLS) == Act("", "python", "answer = 1")
    # a multi-line input (a program) is kept whole
    assert parse("Action: python\nAction Input: a = 2\nanswer = a * 3", TOOLS).input == "a = 2\nanswer = a * 3"
    # an invented observation before the first field is skipped; the reply's own fields are read after it
    assert parse("Observation: 2 * 6 = 12\nThought: go\nAction: calculator\nAction Input: 2 * 6\nObservation: 99",
                 TOOLS) == Act("go", "calculator", "2 * 6")
    # an arithmetic expression where the tool's name should be: the calculator on it (what small models write)
    assert parse("Thought: I need 72 + 36 - 17.\nAction: 72 + 36 - 17 = 128\nFinal Answer: 128", TOOLS) == \
        Act("I need 72 + 36 - 17.", "calculator", "72 + 36 - 17")
    assert parse("Action: 12 * 6 = 64 days", TOOLS) == Act("", "calculator", "12 * 6")
    with pytest.raises(ParseError, match="unknown tool '2 \\+ 2'"):
        parse("Action: 2 + 2", ["python"])  # no calculator: nothing to read it as
    # the first of Action / Final Answer wins
    assert isinstance(parse("Final Answer: 4\nAction: calculator\nAction Input: 1", TOOLS), Finish)
    assert isinstance(parse("Action: calculator\nAction Input: 1\nFinal Answer: 4", TOOLS), Act)


@pytest.mark.parametrize("reply, message", [
    ("I think the answer is 4.", "no 'Action:' line and no 'Final Answer:' line"),
    ("Thought: x\nAction: browser\nAction Input: q", "unknown tool 'browser'; the tools are: calculator, python"),
    ("Thought: x\nAction: calculator", "'Action: calculator' has no 'Action Input:' line"),
    ("Thought: x\nAction: calculator\nAction Input:   ", "'Action: calculator' has no 'Action Input:' line"),
    ("Final Answer:", "the Final Answer is empty"),
    ("", "no 'Action:' line"),
])
def test_parser_says_what_is_wrong(reply, message):
    with pytest.raises(ParseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(reply, TOOLS)


def test_calculator():
    assert calculator("17 * 23") == "391"
    assert calculator("(1,200 - 200) / 8") == "125"
    assert calculator("max(1, 2) + min(3,4)") == "5" and calculator("2,340 * 0.17") == "397.8"
    assert calculator("2^10") == "1024"
    assert calculator("sqrt(16) + pi * 0") == "4"
    assert calculator("7 / 2") == "3.5"
    assert calculator("-(3 - 5) % 3") == "2"
    for bad, message in [("__import__('os').system('id')", "cannot evaluate"), ("x + 1", "cannot evaluate 'x'"),
                         ("2 ** 99999", "exponent 99999 is too large"), ("1 / 0", "division by zero"),
                         ("10 ** 500 * 10 ** 500", "too large"), ("(-8) ** 0.5", "not a real number"),
                         ("open('f')", "cannot evaluate"), ("2 +", "not an arithmetic expression"),
                         ("1" * 600, "longer than 500")]:
        with pytest.raises(ToolError, match=message):
            calculator(bad)


def test_user_functions_are_tools_with_checked_arguments():
    def price(item: str, quantity: int = 1) -> float:
        """Price of a quantity of an item in euros."""
        if item not in ("apple", "pear"):
            raise KeyError(item)
        return {"apple": 0.5, "pear": 0.75}[item] * quantity

    t = tool(price)
    assert (t.name, t.description, t.signature()) == ("price", "Price of a quantity of an item in euros.",
                                                      "price(item: str, quantity: int)")
    assert t.call('{"item": "pear", "quantity": 4}') == "3.0"
    assert t.call('{"item": "apple"}') == "0.5"
    for raw, message in [('{"item": "pear", "quantity": "many"}', "argument quantity: Input should be a valid integer"),
                         ('{"item": "pear", "colour": "red"}', "price has no argument 'colour'"),
                         ('{"quantity": 2}', "argument item: Missing required argument"),
                         ('{"item": "pear"', "not valid JSON"), ("[1, 2]", "give them as a JSON object"),
                         ("pear", 'price takes 2 arguments: give them as a JSON object'),
                         ('{"item": "plum"}', "price failed: KeyError: 'plum'")]:
        with pytest.raises(ToolError, match=message):
            t.call(raw)

    def shout(text: str) -> str:
        return text.upper()

    assert tool(shout).call('"hello"') == "HELLO" and tool(shout).call("hello there") == "HELLO THERE"

    def untyped(x):
        return x

    with pytest.raises(ValueError, match="argument 'x' has no type annotation"):
        tool(untyped)


def test_tools_load_from_module_paths(tmp_path, monkeypatch):
    (tmp_path / "mytools.py").write_text("def double(n: int) -> int:\n    'Twice n.'\n    return 2 * n\nX = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_tool("mytools:double").call("21") == "42"
    for spec, message in [("mytools", "expected MODULE:FUNCTION"), ("mytools:triple", "has no attribute 'triple'"),
                          ("nosuchmodule:f", "No module named 'nosuchmodule'"), ("mytools:X", "X is not a function")]:
        with pytest.raises(ValueError, match=message):
            load_tool(spec)


class Scripted:
    """Replies in turn from a list per question; keeps every conversation it was shown."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.seen = {k: list(v) for k, v in replies.items()}, []

    def generate(self, conversations, *, max_new_tokens, temperature, generator):
        self.seen.append([list(c) for c in conversations])
        out = []
        for conv in conversations:
            question = next(t["content"] for t in conv if t["role"] == "user" and t["content"].startswith("Question:")
                            and t is not conv[0])
            key = next(k for k in self.replies if k in question)
            out.append(Generated(self.replies[key].pop(0), True))
        return out


def test_the_loop_calls_tools_shows_errors_and_stops(tmp_path):
    def lookup(city: str) -> int:
        """Population of a city."""
        return {"Lyon": 522000}[city]

    model = Scripted({
        "seats": ["Thought: multiply\nAction: calculator\nAction Input: 12 * 64 - 517\nObservation: 300",
                  "Thought: I know the answer\nFinal Answer: 251"],
        "Lyon": ["I would look it up.",                                            # parse error -> shown back
                 "Thought: look up\nAction: lookup\nAction Input: {\"city\": \"Lyon\"}",
                 "Thought: halve\nAction: calculator\nAction Input: 522000 / 0",     # tool error -> observation
                 "Thought: oops\nAction: calculator\nAction Input: 522000 / 2",
                 "Final Answer: 261000"],
        "forever": ["Thought: again\nAction: calculator\nAction Input: 1 + 1"] * 10,
        "babble": ["hmm"] * 10,
    })
    tools = [*default_tools(), tool(lookup)]
    results = run_agent(model, ["Question about seats?", "Half of Lyon?", "Loop forever?", "Only babble?"], tools,
                        max_steps=5, parse_retries=2)
    seats, lyon, forever, babble = results
    assert (seats.answer, seats.stopped, len(seats.trace)) == ("251", "final", 2)
    assert seats.trace[0].observation == "251"  # the real result, not the model's invented 300
    assert (lyon.answer, lyon.stopped) == ("261000", "final")
    assert [e.kind for e in lyon.trace] == ["parse_error", "act", "act", "act", "final"]
    assert lyon.trace[2].observation == "Error: division by zero" and lyon.trace[2].tool_error
    assert lyon.trace[1].observation == "522000"
    assert (forever.answer, forever.stopped, len(forever.trace)) == (None, "step_limit", 5)
    assert (babble.answer, babble.stopped, len(babble.trace)) == (None, "parse_errors", 3)  # 1 try + 2 retries
    # what the model was shown: its own reply without the invented observation, then the real one; the parse
    # error in words
    second_call = {c[-1]["content"]: c for c in model.seen[1]}
    seat_conv = next(c for c in model.seen[1] if "seats" in c[-3]["content"])
    assert seat_conv[-2] == {"role": "assistant", "content": "Thought: multiply\nAction: calculator\n"
                                                            "Action Input: 12 * 64 - 517"}
    assert seat_conv[-1] == {"role": "user", "content": "Observation: 251"}
    assert any("I could not read that: no 'Action:' line" in k for k in second_call)
    # one model call per step for all questions still going, in lockstep
    assert [len(call) for call in model.seen] == [4, 4, 3, 2, 2]
    path = save_trace(results, tmp_path / "trace.json", model="scripted")
    saved = json.loads(path.read_text())
    assert saved["model"] == "scripted" and saved["results"][1]["trace"][2]["observation"] == "Error: division by zero"


def test_the_prompt_lists_the_tools_and_holds_the_worked_example():
    turns = conversation("What is 2 + 2?", default_tools())
    assert turns[0]["content"].startswith("Answer the question. You can use these tools:\n- calculator(expression: str)")
    assert "- python(code: str): Run a Python program in a sandbox" in turns[0]["content"]
    assert turns[1:4] == EXAMPLE[1:4] and turns[-1] == {"role": "user", "content": "Question: What is 2 + 2?"}
    with pytest.raises(ValueError, match="two tools are named 'calculator'"):
        run_agent(Scripted({}), ["q"], [tool(calculator), tool(calculator)])


@pytest.mark.skipif(available() is not None, reason=available() or "")
def test_the_python_tool_runs_in_the_sandbox():
    assert python("x = 6\nprint('six')\nanswer = x * 7") == "six\nanswer = 42"
    with pytest.raises(ToolError, match="NameError: name 'open' is not defined"):
        python("answer = open('/etc/passwd').read()")
    with pytest.raises(ToolError, match="import of .socket. is not allowed"):
        python("import socket")
