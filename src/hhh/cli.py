"""The `hhh` command: parse, validate, call one library function. No logic of its own."""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable

from hhh.config import ConfigError, DetoxConfig, EvalConfig, Settings, flag_fields, is_bool, load_config


def _add_settings(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (flags override it)")
    for name, annotation, description, default in flag_fields(cls):
        flag = "--" + name.replace("_", "-")
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{description} (default: {shown})"
        if is_bool(annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "LIST" if typing.get_origin(annotation) is list else name.upper()
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def _settings(args: argparse.Namespace, cls: type[Settings]):
    overrides = {name: getattr(args, name) for name, *_ in flag_fields(cls)}
    return load_config(cls, args.config, overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hhh.data import load_prompts
    from hhh.evaluate import evaluate, results_table, set_and_samples
    from hhh.runs import RunDir, seed_everything

    config = _settings(args, EvalConfig)
    for spec in config.prompts:  # fail on a bad prompt set before loading any model
        load_prompts(set_and_samples(spec, 1)[0])
    console = Console()
    run = RunDir.create("eval", config, config.out)
    seed_everything(config.seed)
    results = evaluate(config, run=run, console=console)
    console.print(results_table(results, title=f"hhh eval: {config.model}" + (f" + {config.adapter}" if config.adapter else "")))
    console.print(f"run folder: {run.path}")
    return 0


def cmd_detox(args: argparse.Namespace) -> int:
    from hhh.detox import detox

    if args.resume:
        detox(resume=args.resume)
    else:
        detox(_settings(args, DetoxConfig))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from hhh.evaluate import compare_table
    from hhh.runs import RunDir

    def results(path: str, name: str = "eval.json"):
        file = Path(path) / name
        if not file.is_file():
            raise ConfigError(f"{path}: no {name} (is it an hhh run folder?)")
        return RunDir(path).read_json(name)

    if args.run_b is None:  # one training run: its own before/after
        a, b, name_a, name_b = results(args.run_a, "eval_before.json"), results(args.run_a), "before", "after"
    else:
        a, b, name_a, name_b = results(args.run_a), results(args.run_b), args.run_a, args.run_b
    Console().print(compare_table(a, b, name_a, name_b))
    return 0


COMMANDS: dict[str, tuple[str, type[Settings] | None, Callable[[argparse.Namespace], int]]] = {
    "eval": ("evaluate a model (+ adapter) on prompt sets: toxicity, reward, KL, perplexity", EvalConfig, cmd_eval),
    "detox": ("the main job: evaluate, PPO against toxicity with a KL penalty, evaluate again, report",
              DetoxConfig, cmd_detox),
    "compare": ("print the before/after table of two runs (or of one training run)", None, cmd_compare),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hhh", description="Align language models: helpful, honest, harmless.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, cls, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if cls is not None:
            _add_settings(p, cls)
        p.set_defaults(fn=fn)
        if name == "detox":
            p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
        if name == "compare":
            p.add_argument("run_a", metavar="RUN_A", help="run folder (before)")
            p.add_argument("run_b", metavar="RUN_B", nargs="?", help="run folder (after)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # peft calls a transformers API that warns it is renamed; nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hhh {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hhh {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
