"""Rewards used by the training tests (importable as tests.toy_rewards:NAME)."""

import signal

CALLS = {"n": 0, "interrupt_at": None}


def hello(prompts, completions):
    """Fraction of words that are 'hello'."""
    return [c.split().count("hello") / max(len(c.split()), 1) for c in completions]


def _count_call_and_maybe_ctrl_c():
    """Count calls; send this process SIGINT (Ctrl-C) on call number CALLS['interrupt_at']."""
    CALLS["n"] += 1
    if CALLS["n"] == CALLS["interrupt_at"]:
        signal.raise_signal(signal.SIGINT)


def hello_then_ctrl_c(prompts, completions):
    """As `hello`, with a Ctrl-C on call number CALLS['interrupt_at']."""
    _count_call_and_maybe_ctrl_c()
    return hello(prompts, completions)


def short_then_ctrl_c(prompts, completions):
    """Minus the number of words (every batch of a random model varies in it), with a Ctrl-C on call number
    CALLS['interrupt_at']."""
    _count_call_and_maybe_ctrl_c()
    return [-len(c.split()) for c in completions]


def constant(prompts, completions):
    """The same score for everything."""
    return [0.5 for _ in completions]
