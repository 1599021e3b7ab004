"""Tools an agent can call (hhh.apps.react): a name, a description, typed arguments, a function.

    calculator   arithmetic on numbers (+ - * / // % **, parentheses, sqrt, log, ...), evaluated from its syntax
                 tree: no names, no calls but the listed functions, exponents and results bounded
    python       a program run in the PAL sandbox (hhh.apps.sandbox): its `answer` and what it printed
    search       the RAG index (hhh.apps.rag): the best chunks, numbered, with file and section
    yours        any Python function with annotated arguments: `tool(fn)`; arguments are checked against the
                 annotations (pydantic) before the function runs, and a wrong one comes back as text

>>> def to_celsius(fahrenheit: float) -> float:
...     "Convert a temperature from Fahrenheit to Celsius."
...     return (fahrenheit - 32) * 5 / 9
>>> tool(to_celsius).call('{"fahrenheit": 212}')
'100.0'
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OBSERVATION_CHARS = 2000  # what an observation may hold; longer ones are cut (a small model's context is short)


class ToolError(Exception):
    """A call the tool could not make; its message goes back to the model."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]

    @property
    def parameters(self) -> list[inspect.Parameter]:
        return list(inspect.signature(self.fn).parameters.values())

    def signature(self) -> str:
        """`name(arg: type, ...)`, as the prompt shows it."""
        def shown(p: inspect.Parameter) -> str:
            kind = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            return f"{p.name}: {kind}" if kind and p.annotation is not inspect.Parameter.empty else p.name
        return f"{self.name}({', '.join(shown(p) for p in self.parameters)})"

    def arguments(self, raw: str) -> dict[str, Any]:
        """The model's Action Input as keyword arguments: a JSON object of them, or, for a tool with one argument,
        the bare value (quoted or not)."""
        raw = raw.strip()
        names = [p.name for p in self.parameters]
        if raw.startswith("{"):
            try:
                args = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ToolError(f"Action Input is not valid JSON: {e.msg} (column {e.colno})") from None
            unknown = sorted(set(args) - set(names))
            if unknown:
                raise ToolError(f"{self.name} has no argument {unknown[0]!r} (its arguments: {', '.join(names)})")
            return args
        if len(names) == 1:
            if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'`":
                raw = raw[1:-1]
            return {names[0]: raw}
        raise ToolError(f"{self.name} takes {len(names)} arguments: give them as a JSON object, "
                        f"e.g. {{{', '.join(f'{n!r}: ...' for n in names)}}}".replace("'", '"'))

    def call(self, raw: str) -> str:
        """Run the tool on the model's Action Input; the observation as text (errors too, for the model to read)."""
        from pydantic import ValidationError, validate_call

        args = self.arguments(raw)
        try:
            result = validate_call(self.fn)(**args)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "arguments"
            raise ToolError(f"argument {where}: {first['msg']}") from None
        except TypeError as e:  # a missing argument
            raise ToolError(str(e).replace(f"{self.fn.__name__}()", self.name)) from None
        except ToolError:
            raise
        except Exception as e:  # the tool's own failure is an observation, not the agent's end
            raise ToolError(f"{self.name} failed: {type(e).__name__}: {e}") from None
        text = result if isinstance(result, str) else json.dumps(result) if isinstance(result, dict | list) \
            else str(result)
        return text if len(text) <= OBSERVATION_CHARS else text[:OBSERVATION_CHARS] + " [cut]"


def tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool:
    """A Python function as a tool: its name, its docstring's first line as the description, its annotations as
    the argument types."""
    doc = (description or inspect.getdoc(fn) or "").strip().splitlines()
    unannotated = [p.name for p in inspect.signature(fn).parameters.values() if p.annotation is inspect.Parameter.empty]
    if unannotated:
        raise ValueError(f"tool {fn.__name__}: argument {unannotated[0]!r} has no type annotation")
    return Tool(name or fn.__name__, doc[0] if doc else fn.__name__, fn)


def load_tool(spec: str) -> Tool:
    """'package.module:function' (importable from the current directory too) as a tool."""
    import importlib
    import sys

    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"tool {spec!r}: expected MODULE:FUNCTION, e.g. mytools:lookup_price")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"tool {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"tool {spec!r}: {attr} is not a function")
    return tool(fn)


# calculator: binary and unary operators, a few functions and constants; nothing else in the tree is allowed
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "min": min, "max": max}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_EXPONENT = 1000
_MAX_MAGNITUDE = 10 ** 100


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {_MAX_EXPONENT})")
        value = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
          and not node.keywords):
        value = _FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args])
    else:
        shown = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
        raise ToolError(f"the calculator cannot evaluate {shown!r} (numbers, + - * / // % **, parentheses and "
                        f"{', '.join(_FUNCTIONS)} only)")
    if isinstance(value, complex) or (isinstance(value, int | float) and abs(value) > _MAX_MAGNITUDE):
        raise ToolError("the result is too large or not a real number")
    return value


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. 12 * (3 + 4) / 5 or sqrt(2)."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,200 -> 1200; max(1, 2) keeps its comma
    if len(text) > 500:
        raise ToolError("the expression is longer than 500 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (ValueError, OverflowError, TypeError) as e:
        raise ToolError(f"cannot evaluate: {e}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a sandbox; it should store its result in a variable named answer."""
    from hhh.apps.sandbox import run

    result = run(code)
    if not result.ok:
        raise ToolError(result.error or "the program failed")
    parts = [result.stdout.strip()] if result.stdout.strip() else []
    parts.append(f"answer = {result.answer}" if result.answer is not None else "(no variable answer was set)")
    return "\n".join(parts)


def search_tool(index, *, k: int = 3) -> Tool:
    """The RAG index as a tool: the best `k` chunks for a query, each with its file and section."""

    def search(query: str) -> str:
        """Search the documents for passages about the query."""
        hits = index.search(query, k=k)
        if not hits:
            raise ToolError("nothing relevant found")
        return "\n\n".join(f"[{i}] {h.chunk.citation}\n{h.chunk.text}" for i, h in enumerate(hits, 1))

    return tool(search)


def default_tools(index=None) -> list[Tool]:
    tools = [tool(calculator), tool(python)]
    return tools + ([search_tool(index)] if index is not None else [])
