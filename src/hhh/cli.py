"""The `hhh` command: parse, validate, call one library function. No logic of its own."""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable

from hhh.config import (
    TOKEN_DAYS,
    CAIConfig,
    CompressConfig,
    ConfigError,
    EvalConfig,
    FrontierConfig,
    LabelAutoConfig,
    LabelGenerateConfig,
    LabelServeConfig,
    RMConfig,
    RMEvalConfig,
    ServeConfig,
    Settings,
    flag_fields,
    is_bool,
    load_config,
)
from hhh.jobs import JOBS


def _add_settings(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (flags override it)")
    for path, annotation, description, default in flag_fields(cls):
        dest = "__".join(path)  # eval__max_prompts: the key max_prompts of the [eval] table
        flag = "--" + "-".join(path).replace("_", "-")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{description} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        if is_bool(annotation):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "LIST" if typing.get_origin(annotation) is list else path[-1].upper()
            parser.add_argument(flag, dest=dest, default=None, metavar=metavar, help=help_text)


def _settings(args: argparse.Namespace, cls: type[Settings]):
    overrides: dict = {}
    for path, *_ in flag_fields(cls):
        value = getattr(args, "__".join(path))
        if value is not None:
            table = overrides
            for key in path[:-1]:
                table = table.setdefault(key, {})
            table[path[-1]] = value
    return load_config(cls, args.config, overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hhh import distributed as D
    from hhh.data import load_prompts
    from hhh.evaluate import evaluate, results_table, set_and_samples
    from hhh.jobs import new_run_folder
    from hhh.runs import seed_everything

    config = _settings(args, EvalConfig)
    for spec in config.prompts:  # fail on a bad prompt set before loading any model
        load_prompts(set_and_samples(spec, 1)[0])
    # under accelerate launch each process samples its share of every set (hhh.distributed); rank 0 writes and speaks
    console = Console(quiet=D.launched_rank() != 0)
    run = new_run_folder("eval", config)
    seed_everything(config.seed)
    with run.removed_on_error():
        results = evaluate(config.model_copy(update={"device": D.device(config.device)}), run=run, console=console)
    console.print(results_table(results, title=f"hhh eval: {config.model}" + (f" + {config.adapter}" if config.adapter else "")))
    console.print(f"run folder: {run.path}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """A job of hhh.jobs (detox, dpo, grpo, rloo): from its flags, or (--resume RUN) from the run folder's config."""
    from hhh.jobs import run_job

    job = JOBS[args.command_name]
    resume = getattr(args, "resume", None)
    run_job(job.command, None if resume else _settings(args, job.config), resume=resume)
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    from hhh.frontier import frontier

    frontier(resume=args.resume) if args.resume else frontier(_settings(args, FrontierConfig))
    return 0


def cmd_cai(args: argparse.Namespace) -> int:
    from hhh.cai.run import run_cai

    if args.resume:
        run_cai(stage=args.stage, resume=args.resume, allow_weak_labels=bool(args.rl__allow_weak_labels))
    else:
        run_cai(_settings(args, CAIConfig), stage=args.stage)
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


def cmd_label_generate(args: argparse.Namespace) -> int:
    from hhh.config import LabelGenerateConfig
    from hhh.feedback.jobs import generate

    config = _settings(args, LabelGenerateConfig)
    done = generate(config)
    print(f"added {done['completions']} completions for {done['prompts']} prompts to {config.db}")
    return 0


def cmd_label_add_labeler(args: argparse.Namespace) -> int:
    from hhh.feedback.store import Store

    days = None if args.days == 0 else args.days
    token = Store(args.db).add_labeler(args.name, role="admin" if args.admin else "labeler", days=days)
    valid = "no expiry" if days is None else f"valid {days:g} days"
    print(f"{'admin' if args.admin else 'labeler'} {args.name!r} added; token ({valid}; shown once, keep it secret):")
    print(token)
    return 0


def cmd_label_new_token(args: argparse.Namespace) -> int:
    from hhh.feedback.store import Store

    days = None if args.days == 0 else args.days
    token = Store(args.db, create=False).new_token(args.name, days=days)
    print(f"new token for {args.name!r} ({'no expiry' if days is None else f'valid {days:g} days'}); the old one no "
          "longer works:")
    print(token)
    return 0


def cmd_label_revoke_labeler(args: argparse.Namespace) -> int:
    from hhh.feedback.store import Store

    ended = Store(args.db, create=False).revoke_labeler(args.name)
    print(f"revoked {args.name!r}: their token no longer works; {ended} browser session(s) ended; their rankings stay")
    return 0


def cmd_label_serve(args: argparse.Namespace) -> int:
    from hhh.config import LabelServeConfig
    from hhh.feedback.app import serve

    config = _settings(args, LabelServeConfig)
    serve(config.db, host=config.host, port=config.port, guideline=config.guideline, overlap=config.overlap)
    return 0


def cmd_label_auto(args: argparse.Namespace) -> int:
    from hhh.config import LabelAutoConfig
    from hhh.feedback.jobs import auto_label

    config = _settings(args, LabelAutoConfig)
    done = auto_label(config)
    print(f"ranked {done['rankings']} prompts ({done['ordered_pairs']} ordered pairs) in {config.db}")
    return 0


def cmd_label_import(args: argparse.Namespace) -> int:
    from hhh.feedback.io import import_jsonl
    from hhh.feedback.store import Store

    done = import_jsonl(Store(args.db), args.file, fmt=args.format, labeler=args.labeler,
                        role="ai" if args.ai else "labeler")
    print(f"imported {done['rankings']} rankings from {args.file} ({done['skipped']} already there)")
    return 0


def cmd_label_export(args: argparse.Namespace) -> int:
    from hhh.feedback.io import export_jsonl
    from hhh.feedback.store import Store

    n = export_jsonl(Store(args.db, create=False), args.out, args.format, ties=args.ties, source=args.source)
    print(f"wrote {n} {args.format} to {args.out}")
    return 0


def cmd_label_stats(args: argparse.Namespace) -> int:
    import json

    from hhh.feedback.agreement import agreement
    from hhh.feedback.store import Store

    store = Store(args.db, create=False)
    print(json.dumps({"counts": store.counts(), "agreement": agreement(store.rankings())}, indent=2))
    return 0


def cmd_rm_train(args: argparse.Namespace) -> int:
    from hhh.config import RMConfig
    from hhh.train.rm import train_rm

    run = train_rm(_settings(args, RMConfig))
    report = run.read_json("eval.json")
    if "accuracy" in report:
        print(f"held-out pairwise accuracy {report['accuracy']:.3f} on {report['pairs']} pairs "
              f"(ECE {report['calibration']['ece']:.3f}); trained in {report['train_seconds']:.0f} s")
    print(f"reward model: {run.path}  (use it as reward = \"rm:{run.path}\")")
    return 0


def cmd_rm_eval(args: argparse.Namespace) -> int:
    from hhh.config import RMEvalConfig
    from hhh.train.rm import eval_rm

    run, report = eval_rm(_settings(args, RMEvalConfig))
    if not report["pairs"]:
        raise ValueError("no ordered (non-tie) pairs to evaluate")
    print(f"pairwise accuracy {report['accuracy']:.3f} on {report['pairs']} pairs, loss {report['loss']:.3f}, "
          f"ECE {report['calibration']['ece']:.3f}")
    for b in report["calibration"]["bins"]:
        print(f"  confidence {b['confidence'][0]:.2f}-{b['confidence'][1]:.2f}: n={b['n']:4d}  "
              f"mean confidence {b['mean_confidence']:.3f}  accuracy {b['accuracy']:.3f}")
    print(f"run folder: {run.path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from hhh.optimize.merge import merge

    print(f"merging the adapter of {args.run} into its base ...")
    out = merge(args.run, args.out, model=args.model)
    print(f"merged model: {out}  (transformers loads it without peft; hhh takes it as a model spec)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from hhh.optimize.export import export_gguf

    with Progress(transient=True) as bar:
        task = bar.add_task(f"writing {args.out} ({args.quant})", total=None)
        out = export_gguf(args.source, args.out, quant=args.quant, model=args.model, tokenizer_pre=args.tokenizer_pre,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant}); llama.cpp loads it, and so does any hhh "
          "command as a model spec")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from hhh.optimize.compress import compress

    if args.resume:
        run = compress(resume=args.resume)
    else:
        if args.source_arg:
            args.source = args.source_arg
        run = compress(_settings(args, CompressConfig))
    print((run.path / "table.md").read_text())
    print(f"run folder: {run.path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hhh.serve import serve

    if args.model_arg:
        args.model = args.model_arg
    serve(_settings(args, ServeConfig))
    return 0


def cmd_optimize_report(args: argparse.Namespace) -> int:
    from hhh.optimize.report import rebuild

    table = rebuild(args.run)
    print(table.read_text())
    print(f"rebuilt {table} and the plot beside it")
    return 0


def cmd_sandbox_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hhh.apps.sandbox import Limits, SandboxUnavailable, run

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    limits = Limits(wall_seconds=args.wall_seconds, cpu_seconds=args.cpu_seconds, memory_mb=args.memory_mb,
                    output_chars=args.output_chars)
    try:
        result = run(path.read_text(encoding="utf-8", errors="replace"), limits)
    except SandboxUnavailable as e:
        raise ValueError(str(e)) from None
    if result.stdout:
        print(result.stdout, end="" if result.stdout.endswith("\n") else "\n")
    if result.answer is not None:
        print(f"answer = {result.answer}")
    if not result.ok:
        print(result.error)
        return 1
    return 0


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_reason_eval(args: argparse.Namespace) -> int:
    """Each method's answers are saved in OUT/partial/ as it finishes; --resume skips the methods found there."""
    import json
    from pathlib import Path

    from hhh.apps import chat_model
    from hhh.apps.reasoning import check, evaluate, problems, table
    from hhh.runs import seed_everything, versions

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check(methods, args.k)
    probs = problems(args.problems, seed=args.problem_seed)  # bad counts and tasks fail before the model loads
    out = Path(args.out)
    if (out / "reasoning.json").exists():
        raise FileExistsError(f"{out}: holds a reasoning.json already; choose another --out")
    settings = {key: getattr(args, key) for key in ("model", "problems", "problem_seed", "seed", "k", "temperature",
                                                     "max_new_tokens")}
    partial = out / "partial"
    done = {}
    if partial.is_dir() and any(partial.glob("*.json")):
        if not args.resume:
            raise FileExistsError(f"{out}: holds partial results; --resume continues them, or choose another --out")
        for path in sorted(partial.glob("*.json")):
            saved = json.loads(path.read_text())
            if saved["settings"] != settings:
                changed = ", ".join(k for k in settings if saved["settings"].get(k) != settings[k])
                raise ValueError(f"{path}: settings differ from this command's ({changed}); resume with the same "
                                 f"flags or choose another --out")
            done[path.stem] = saved["result"]
        print(f"resuming: {', '.join(m for m in methods if m in done) or 'nothing'} already done", file=sys.stderr)

    def save(method: str, result: dict) -> None:
        partial.mkdir(parents=True, exist_ok=True)
        tmp = partial / f"{method}.json.tmp"
        tmp.write_text(json.dumps({"settings": settings, "result": result}) + "\n")
        tmp.replace(partial / f"{method}.json")

    seed_everything(args.seed)
    model = chat_model(args.model)
    report = evaluate(model, probs, methods=methods, k=args.k, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, done=done, on_method=save,
                      progress=lambda m: _progress(f"{m}: done ({len(probs)} problems)"))
    report["settings"] = {**settings, "methods": args.methods}
    report["versions"] = versions()
    out.mkdir(parents=True, exist_ok=True)
    (out / "reasoning.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "reasoning.md").write_text(table(report) + "\n")
    print(table(report))
    print(f"answers and scores: {out / 'reasoning.json'}")
    return 0


def _agent_tools(args: argparse.Namespace):
    from hhh.apps.tools import default_tools, load_tool

    index = None
    if args.index:
        from hhh.apps.rag import Index

        index = Index.load(args.index)
    return [*default_tools(index), *(load_tool(t) for t in args.tool)]


def cmd_agent(args: argparse.Namespace) -> int:
    import dataclasses
    import datetime
    import json
    from pathlib import Path

    from hhh.apps import chat_model
    from hhh.apps.react import run_agent, save_trace
    from hhh.runs import versions

    tools = _agent_tools(args)  # bad tool specs and index folders fail before the model loads
    trace = Path(args.trace) if args.trace else \
        Path("runs") / f"agent-{datetime.datetime.now():%Y%m%d-%H%M%S}" / "trace.json"
    settings = {key: getattr(args, key) for key in ("model", "seed", "pal", "index", "tool", "max_steps", "retries",
                                                     "temperature", "max_new_tokens")}
    model = chat_model(args.model)
    if args.pal:
        from hhh.apps.pal import solve

        solved = solve(model, args.question, retries=args.retries, max_new_tokens=args.max_new_tokens,
                       seed=args.seed)
        for s in solved:
            last = s.attempts[-1] if s.attempts else None
            if last is not None and last.code:
                print(f"```python\n{last.code}\n```")
            print(f"answer = {s.answer}" if s.answer is not None else f"no answer: {s.error}")
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text(json.dumps({"mode": "pal", "settings": settings, "versions": versions(),
                                     "results": [dataclasses.asdict(s) for s in solved]}, indent=1) + "\n")
        print(f"trace: {trace}")
        return 0 if all(s.answer is not None for s in solved) else 1
    results = run_agent(model, args.question, tools, max_steps=args.max_steps, parse_retries=args.retries,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    for r in results:
        for e in r.trace:
            if e.kind == "act":
                print(f"[{e.step}] {e.tool}({e.input!r}) -> {e.observation}")
            elif e.kind == "parse_error":
                print(f"[{e.step}] unreadable reply ({e.observation})")
        print(f"Final Answer: {r.answer}" if r.answer is not None else f"no answer ({r.stopped.replace('_', ' ')})")
    save_trace(results, trace, mode="react", settings=settings, versions=versions(), tools=[t.name for t in tools])
    print(f"trace: {trace}")
    return 0 if all(r.answer is not None for r in results) else 1


def cmd_rag_index(args: argparse.Namespace) -> int:
    from hhh.apps.rag import Index

    _, update = Index.build(args.paths, args.index, size=args.chunk_size, overlap=args.chunk_overlap,
                            rebuild=args.rebuild, progress=lambda n, total, f: _progress(f"[{n}/{total}] {f}"))
    print(f"{args.index}: {update}")
    return 0


def cmd_rag_ask(args: argparse.Namespace) -> int:
    import json

    from hhh.apps import chat_model
    from hhh.apps.rag import Index, ask

    index = Index.load(args.index)
    model = None if args.extractive else chat_model(args.model)
    answer = ask(model, index, args.question, k=args.k, min_score=args.min_score, mmr=args.mmr,
                 max_new_tokens=args.max_new_tokens, seed=args.seed)[0]
    if args.json:
        print(json.dumps(answer.to_dict(), indent=1))
        return 0
    print(answer.text)
    if answer.found:
        print("\nsources:")
        for h in answer.hits:
            mark = "*" if h.rank in answer.cited else " "
            print(f" {mark}[{h.rank}] {h.chunk.citation} (similarity {h.score:.2f})")
        if not answer.cited:
            print("(the answer cites none of them)")
    return 0


def cmd_rag_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hhh.apps import chat_model
    from hhh.apps.rag import Index, evaluate, read_questions
    from hhh.runs import versions

    questions = read_questions(args.questions)
    index = Index.load(args.index)
    model = None if args.extractive else chat_model(args.model)
    report = evaluate(model, index, questions, k=args.k, min_score=args.min_score, mmr=args.mmr, seed=args.seed,
                      max_new_tokens=args.max_new_tokens)
    report["settings"] = {"questions": args.questions, "index": args.index, "seed": args.seed}
    report["versions"] = versions()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    r, a = report["retrieval"], report["answers"]
    print(f"retrieval ({r['n']} questions): recall@1 {r['recall@1']:.3f}  recall@5 {r['recall@5']:.3f}  "
          f"MRR {r['mrr']:.3f}")
    print(f"answers ({a['n']}): faithful {a['faithful']:.3f}  cite a source {a['cites']:.3f}  "
          f"state the answer {a['correct']:.3f}  'I don't know' {a['idk_on_answerable']:.3f}; "
          f"off-topic ({a['off_topic_n']}): 'I don't know' {a['idk_on_off_topic']:.3f}")
    print(f"every answer: {out}")
    return 0


def _apps_args(name: str, p: argparse.ArgumentParser) -> None:
    """Flags of the application commands (no config class)."""
    from hhh.models.spec import DEFAULT_MODEL

    if name in ("reason eval", "agent", "rag ask", "rag eval"):
        p.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                       help="model spec, run or adapter folder, or openai:MODEL@URL (default: the bundled model)")
        p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    if name == "reason eval":
        p.add_argument("--problems", type=int, default=200, help="problems, half gsm_symbolic and half "
                                                                 "basic_arithmetic (default: 200)")
        p.add_argument("--problem-seed", type=int, default=0,
                       help="seed that draws the problems (default: 0); --seed moves only the sampling, so runs "
                            "with different --seed answer the same problems")
        p.add_argument("--methods", default="direct,cot,sc,pal", help="comma-separated, of direct, cot, sc, pal, react "
                                                                      "(default: direct,cot,sc,pal)")
        p.add_argument("--k", type=int, default=5, help="self-consistency samples per problem (default: 5)")
        p.add_argument("--temperature", type=float, default=0.7, help="self-consistency temperature (default: 0.7)")
        p.add_argument("--max-new-tokens", type=int, default=128, help="chain-of-thought length (default: 128)")
        p.add_argument("--out", required=True, metavar="DIR", help="folder for reasoning.json and reasoning.md")
        p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out: the "
                                                             "methods saved in OUT/partial/ are not run again")
    if name == "agent":
        p.add_argument("question", nargs="+", help="question(s); several run together")
        p.add_argument("--pal", action="store_true", help="answer with one sandboxed program (PAL) instead of "
                                                          "the ReAct tool loop")
        p.add_argument("--index", metavar="DIR", help="RAG index: adds the search tool")
        p.add_argument("--tool", action="append", default=[], metavar="MODULE:FUNCTION",
                       help="a Python function with annotated arguments as a tool (repeatable)")
        p.add_argument("--max-steps", type=int, default=8, help="model calls per question at most (default: 8)")
        p.add_argument("--retries", type=int, default=2, help="unreadable replies (PAL: failed programs) shown "
                                                              "back in a row before giving up (default: 2)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
        p.add_argument("--max-new-tokens", type=int, default=256, help="per model call (default: 256)")
        p.add_argument("--trace", metavar="FILE.json", help="where the trace goes (default: runs/agent-TIME/)")
    if name == "rag index":
        p.add_argument("paths", nargs="+", metavar="PATH", help="files and folders (.md, .txt, .rst, .pdf)")
        p.add_argument("--chunk-size", type=int, default=1000, help="characters per chunk (default: 1000)")
        p.add_argument("--chunk-overlap", type=int, default=150, help="characters shared by neighbours (default: 150)")
        p.add_argument("--rebuild", action="store_true", help="start the index over")
    if name in ("rag index", "rag ask", "rag eval"):
        p.add_argument("--index", default="rag-index", metavar="DIR", help="index folder (default: rag-index)")
    if name in ("rag ask", "rag eval"):
        from hhh.apps.rag import MIN_SCORE

        p.add_argument("--k", type=int, default=3, help="sources given to the model (default: 3)")
        p.add_argument("--min-score", type=float, default=MIN_SCORE,
                       help=f"best similarity below which the answer is I don't know (default: {MIN_SCORE})")
        p.add_argument("--mmr", action="store_true", help="re-rank by maximal marginal relevance")
        p.add_argument("--max-new-tokens", type=int, default=160, help="answer length (default: 160)")
        p.add_argument("--extractive", action="store_true", help="no language model: answer with the sources' "
                                                                 "sentence closest to the question, cited")
    if name == "rag ask":
        p.add_argument("question", help="the question")
        p.add_argument("--json", action="store_true", help="print the answer, its citations and sources as JSON")
    if name == "rag eval":
        p.add_argument("--questions", default=str(_rag_questions()), metavar="FILE.jsonl",
                       help="question set (default: hhh's own, over its README and docs)")
        p.add_argument("--out", default="rag-eval.json", metavar="FILE.json", help="report (default: rag-eval.json)")


def _rag_questions():
    from importlib.resources import files

    return files("hhh.data") / "files" / "rag_questions.jsonl"


def _sandbox_args(name: str, p: argparse.ArgumentParser) -> None:
    if name == "sandbox run":
        p.add_argument("file", metavar="FILE.py", help="Python file to run in the sandbox")
        p.add_argument("--wall-seconds", type=float, default=10.0, help="wall-clock limit (default: 10)")
        p.add_argument("--cpu-seconds", type=int, default=5, help="CPU time limit (default: 5)")
        p.add_argument("--memory-mb", type=int, default=512, help="address-space limit in MB (default: 512)")
        p.add_argument("--output-chars", type=int, default=65536, help="printed characters at most (default: 65536)")


def _optimize_args(name: str, p: argparse.ArgumentParser) -> None:
    """Flags of merge and export (no config class: a source, an output and a few switches)."""
    if name == "merge":
        p.add_argument("run", metavar="RUN", help="run folder (its final adapter) or an adapter folder")
        p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to (new)")
    if name == "export":
        p.add_argument("source", metavar="RUN|MODEL", help="run folder (merged with its adapter), adapter folder, or "
                                                           "model spec")
        p.add_argument("--format", choices=["gguf"], default="gguf", help="file format (default: gguf)")
        p.add_argument("--quant", choices=["f16", "q8_0", "q4_0"], default="f16",
                       help="weight type of the matrices (default: f16)")
        p.add_argument("--out", required=True, metavar="FILE.gguf", help="file to write (new)")
        p.add_argument("--tokenizer-pre", metavar="NAME", help="llama.cpp pre-tokenizer name (default: the one of "
                                                               "the GGUF the model came from, else 'default')")
    if name == "compress":
        p.add_argument("source_arg", nargs="?", metavar="RUN|MODEL",
                       help="run folder (adapter merged in), adapter folder or model spec (same as --source)")
    if name == "optimize report":
        p.add_argument("run", metavar="RUN", help="hhh compress run folder")
    if name in ("merge", "export"):
        p.add_argument("--model", metavar="SPEC", help="base model of the adapter (default: the run's model)")


def _label_args(name: str, p: argparse.ArgumentParser) -> None:
    """Flags of the label commands that have no config class."""
    if name in ("label add-labeler", "label new-token", "label revoke-labeler", "label import", "label export",
                "label stats"):
        p.add_argument("--db", default="feedback.db", help="preference store: SQLite file or SQLAlchemy URL")
    if name in ("label add-labeler", "label new-token", "label revoke-labeler"):
        p.add_argument("name", help="labeler name (unique)")
    if name in ("label add-labeler", "label new-token"):
        p.add_argument("--days", type=float, default=TOKEN_DAYS, help=f"days the token is valid (0: no expiry; "
                                                                        f"default {TOKEN_DAYS:g})")
    if name == "label add-labeler":
        p.add_argument("--admin", action="store_true", help="may see agreement statistics and export")
    if name == "label import":
        p.add_argument("file", help="JSONL of pairs (prompt/chosen/rejected, or HH-RLHF transcripts) or rankings")
        p.add_argument("--format", choices=["auto", "pairs", "rankings"], default="auto", help="line format")
        p.add_argument("--labeler", default="import", help="labeler of lines without a 'labeler' field")
        p.add_argument("--ai", action="store_true", help="mark the imported labels as AI labels")
    if name == "label export":
        p.add_argument("--out", required=True, help="JSONL file to write")
        p.add_argument("--format", choices=["pairs", "rankings"], default="pairs", help="line format")
        p.add_argument("--ties", action="store_true", help="include tied pairs (marked \"tie\": true)")
        p.add_argument("--source", choices=["all", "human", "ai", "served"], default="all", help="whose labels")


COMMANDS: dict[str, tuple[str, type[Settings] | None, Callable[[argparse.Namespace], int]]] = {
    "eval": ("evaluate a model (+ adapter) on prompt sets: toxicity, reward, KL, perplexity", EvalConfig, cmd_eval),
    **{name: (job.help, job.config, cmd_job) for name, job in JOBS.items()},
    "frontier": ("PPO, GRPO, RLOO and DPO at several KL strengths: held-out reward against KL, plot and table",
                 FrontierConfig, cmd_frontier),
    "cai": ("Constitutional AI: critique -> revision -> SFT (stage sl), then AI preference labels -> DPO or RM + PPO "
            "(stage rl); base, SL-CAI and RL-CAI evaluated side by side", CAIConfig, cmd_cai),
    "merge": ("fold a run's LoRA adapter into its base model: a plain Hugging Face folder", None, cmd_merge),
    "export": ("write a run (adapter merged) or a model as one GGUF file for llama.cpp (f16, q8_0, q4_0)", None,
               cmd_export),
    "compress": ("quantize (torchao int8) and prune (magnitude, Wanda) a run's model; measure size, speed, fidelity "
                 "and whether the alignment survives", CompressConfig, cmd_compress),
    "optimize report": ("rebuild the table and plot of an hhh compress run", None, cmd_optimize_report),
    "serve": ("serve a model and its adapters behind an OpenAI-compatible API (continuous batching); answers and "
              "their users' feedback go to the preference store", ServeConfig, cmd_serve),
    "sandbox run": ("run a Python file in the PAL sandbox (no network, no files but its own folder, CPU, memory, "
                    "time and output limits) and print its result, or why it was stopped", None, cmd_sandbox_run),
    "reason eval": ("accuracy of direct answers, chain-of-thought, self-consistency and PAL on arithmetic word "
                    "problems (reasoning-gym), with 95% intervals", None, cmd_reason_eval),
    "agent": ("answer questions with a ReAct tool loop (calculator, sandboxed python, RAG search, your "
              "functions), or with a sandboxed program (--pal); the trace is saved", None, cmd_agent),
    "rag index": ("index text, markdown and PDF files for retrieval (MiniLM embeddings, FAISS); only new and "
                  "changed files are embedded again", None, cmd_rag_index),
    "rag ask": ("answer a question from the index, citing file and section (or: I don't know)", None, cmd_rag_ask),
    "rag eval": ("retrieval recall@1/@5 and MRR, answer faithfulness and 'I don't know' on a question set", None,
                 cmd_rag_eval),
    "compare": ("print the before/after table of two runs (or of one training run)", None, cmd_compare),
    "label generate": ("sample K completions per prompt from a model into the preference store",
                       LabelGenerateConfig, cmd_label_generate),
    "label add-labeler": ("create a labeler (or admin) and print their login token", None, cmd_label_add_labeler),
    "label new-token": ("give a labeler a fresh token (after expiry or a leak); the old one stops working", None,
                        cmd_label_new_token),
    "label revoke-labeler": ("revoke a labeler's token and end their browser sessions (their rankings stay)", None,
                             cmd_label_revoke_labeler),
    "label serve": ("run the labeling web app", LabelServeConfig, cmd_label_serve),
    "label auto": ("rank completions with an AI judge (any reward spec), marked as AI labels",
                   LabelAutoConfig, cmd_label_auto),
    "label import": ("import pairs or rankings from JSONL", None, cmd_label_import),
    "label export": ("export pairs (prompt/chosen/rejected) or rankings as JSONL", None, cmd_label_export),
    "label stats": ("print store counts and agreement between labelers", None, cmd_label_stats),
    "rm train": ("train a Bradley-Terry reward model on preference pairs", RMConfig, cmd_rm_train),
    "rm eval": ("pairwise accuracy and calibration of a reward model on preference pairs", RMEvalConfig, cmd_rm_eval),
}


def quiet_torchao() -> None:
    """torchao (imported by peft and transformers once it is installed) warns on import that its CUDA-only kernels
    (mxfp8, cutlass) do not load, and torch that torchao registers enums: nothing a CPU user can act on."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hhh", description="Align language models: helpful, honest, harmless.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    group_help = {"label": "human and AI feedback: generate, label in the browser, import/export",
                  "rm": "reward models trained on preference pairs",
                  "optimize": "tables of compressed variants",
                  "sandbox": "the sandbox that runs model-written code (PAL)",
                  "reason": "chain-of-thought, self-consistency and PAL, measured",
                  "rag": "retrieval-augmented answers with citations"}
    for name, (help_text, cls, fn) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            gp = sub.add_parser(group, help=group_help[group], description=group_help[group])
            groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        p = (groups[group] if group else sub).add_parser(leaf, help=help_text, description=help_text)
        p.set_defaults(command_name=name)
        _label_args(name, p)
        _optimize_args(name, p)
        _sandbox_args(name, p)
        _apps_args(name, p)
        if cls is not None:
            _add_settings(p, cls)
        p.set_defaults(fn=fn)
        if name in ("frontier", "cai", "compress") or (name in JOBS and JOBS[name].resumable):
            p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
        if name == "cai":
            p.add_argument("stage", nargs="?", choices=["all", "sl", "rl"], default="all",
                           help="both stages (default), the supervised stage only, or the RL stage of a --resume'd run")
        if name == "serve":
            p.add_argument("model_arg", nargs="?", metavar="MODEL", help="base model spec (same as --model)")
        if name == "compare":
            p.add_argument("run_a", metavar="RUN_A", help="run folder (before)")
            p.add_argument("run_b", metavar="RUN_B", nargs="?", help="run folder (after)")
    return parser


def _one_process_unless_distributed(command: str) -> None:
    """Under accelerate launch / torchrun only the commands that split their work (hhh.distributed) may run: any
    other command would run once per process, each writing the same files."""
    import os

    splits = {"eval"} | {c for c, j in JOBS.items() if j.shares is not None}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command not in splits:
        raise ValueError(f"runs on one process: start it without accelerate launch or torchrun (those run "
                         f"{', '.join(sorted(splits))})")


def main(argv: list[str] | None = None) -> int:
    import warnings

    # peft calls a transformers API that warns it is renamed; nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    quiet_torchao()
    args = build_parser().parse_args(argv)
    try:
        _one_process_unless_distributed(args.command_name)
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hhh {args.command_name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a directory given as a file, no permission...: say which path, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"hhh {args.command_name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hhh {args.command_name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not type(e).__module__.startswith("sqlalchemy"):
            raise
        # a database that cannot be reached or opened: its first line says why
        print(f"hhh {args.command_name}: database error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
