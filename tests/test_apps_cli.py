"""The application commands end to end through `hhh.cli.main`: rag index / ask / eval, agent (ReAct and --pal),
reason eval, on a tiny random model (its answers are noise; the plumbing, files and errors are what is checked).
One slow test runs the bundled model."""

import json

import pytest

from hhh.apps.sandbox import available
from hhh.cli import main


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "guide.md").write_text("# Resuming\n\nAfter Ctrl-C, `hhh detox --resume RUN` continues from the last "
                                "checkpoint.\n\n# Serving\n\nhhh serve listens on port 8000.\n")
    return d


def test_rag_index_ask_and_eval(docs, tmp_path, tiny_dir, capsys):
    index = tmp_path / "idx"
    assert main(["rag", "index", str(docs), "--index", str(index)]) == 0
    assert "1 added, 0 changed, 0 removed, 0 unchanged: 2 chunks" in capsys.readouterr().out
    assert main(["rag", "index", str(docs), "--index", str(index)]) == 0
    assert "0 added, 0 changed, 0 removed, 1 unchanged" in capsys.readouterr().out

    assert main(["rag", "ask", "How do I resume a run after Ctrl-C?", "--index", str(index), "--model",
                 str(tiny_dir), "--max-new-tokens", "16", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["found"] and answer["sources"][0]["citation"].endswith("guide.md § Resuming")

    assert main(["rag", "ask", "What is the capital of Australia?", "--index", str(index), "--extractive"]) == 0
    assert capsys.readouterr().out.startswith("I don't know: nothing in the index is close enough")
    assert main(["rag", "ask", "How do I resume a run after Ctrl-C?", "--index", str(index), "--extractive"]) == 0
    out = capsys.readouterr().out
    assert "--resume RUN" in out and "*[1] " in out and "guide.md § Resuming" in out

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "How do I resume after Ctrl-C?", "source": "guide.md",
                                     "section": "Resuming", "answer": "--resume RUN"}) + "\n" +
                         json.dumps({"question": "Who painted the Mona Lisa?", "source": None}) + "\n")
    report = tmp_path / "eval.json"
    assert main(["rag", "eval", "--index", str(index), "--questions", str(questions), "--extractive",
                 "--out", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["retrieval"]["recall@1"] == 1.0 and saved["answers"]["faithful"] == 1.0
    assert saved["answers"]["idk_on_off_topic"] == 1.0 and "torch" in saved["versions"]
    assert "recall@1 1.000" in capsys.readouterr().out


def test_rag_errors_are_one_line(tmp_path, capsys):
    assert main(["rag", "ask", "q", "--index", str(tmp_path / "none"), "--extractive"]) == 2
    assert "no RAG index here (run: hhh rag index PATH... --index" in capsys.readouterr().err
    assert main(["rag", "index", str(tmp_path / "missing.md"), "--index", str(tmp_path / "i")]) == 2
    assert "missing.md: no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "q.jsonl"
    bad.write_text("{broken\n")
    assert main(["rag", "eval", "--questions", str(bad), "--extractive", "--index", str(tmp_path)]) == 2
    assert "q.jsonl:1: invalid JSON" in capsys.readouterr().err


@pytest.mark.skipif(available() is not None, reason=available() or "")
def test_agent_saves_its_trace_and_says_why_it_stopped(tiny_dir, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    code = main(["agent", "What is 2 + 2?", "--model", str(tiny_dir), "--max-steps", "2", "--max-new-tokens", "8",
                 "--trace", str(trace)])
    saved = json.loads(trace.read_text())
    assert saved["mode"] == "react" and saved["tools"] == ["calculator", "python"]
    assert saved["settings"]["max_steps"] == 2 and saved["settings"]["seed"] == 0 and "torch" in saved["versions"]
    result = saved["results"][0]
    assert code == (0 if result["answer"] is not None else 1)
    assert result["stopped"] in ("final", "step_limit", "parse_errors") and 1 <= len(result["trace"]) <= 2
    assert f"trace: {trace}" in capsys.readouterr().out
    trace_pal = tmp_path / "pal.json"
    code = main(["agent", "What is 2 + 2?", "--pal", "--model", str(tiny_dir), "--retries", "0",
                 "--max-new-tokens", "8", "--trace", str(trace_pal)])
    pal = json.loads(trace_pal.read_text())
    assert pal["mode"] == "pal" and len(pal["results"][0]["attempts"]) == 1 and code in (0, 1)
    assert pal["settings"]["pal"] is True and "torch" in pal["versions"]


def test_agent_checks_its_tools_before_loading_a_model(tmp_path, capsys):
    assert main(["agent", "q", "--tool", "nosuchmodule:f", "--model", str(tmp_path / "no-model")]) == 2
    assert "tool 'nosuchmodule:f': No module named 'nosuchmodule'" in capsys.readouterr().err
    assert main(["agent", "q", "--index", str(tmp_path / "none")]) == 2
    assert "no RAG index here" in capsys.readouterr().err


def test_reason_eval_writes_its_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["reason", "eval", "--model", str(tiny_dir), "--problems", "2", "--methods", "direct,cot,sc",
                 "--k", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    report = json.loads((out / "reasoning.json").read_text())
    assert [s["method"] for s in report["scores"]] == ["direct", "cot", "sc"] and report["n"] == 2
    assert report["settings"]["k"] == 2 and len(report["records"][0]["sc_samples"]) == 2
    assert (out / "reasoning.md").read_text().startswith("| method | accuracy (95% CI) |")
    # --seed moves the sampling only: the problems stay those of --problem-seed (default 0), so seeds compare
    other = tmp_path / "seed1"
    assert main(["reason", "eval", "--model", str(tiny_dir), "--problems", "2", "--methods", "direct",
                 "--seed", "1", "--out", str(other)]) == 0
    again = json.loads((other / "reasoning.json").read_text())
    assert [r["question"] for r in again["records"]] == [r["question"] for r in report["records"]]
    assert again["settings"]["seed"] == 1 and again["settings"]["problem_seed"] == 0
    assert main(["reason", "eval", "--model", str(tiny_dir), "--problems", "2", "--methods", "direct",
                 "--problem-seed", "1", "--out", str(tmp_path / "p1")]) == 0
    moved = json.loads((tmp_path / "p1" / "reasoning.json").read_text())
    assert [r["question"] for r in moved["records"]] != [r["question"] for r in report["records"]]
    assert main(["reason", "eval", "--model", str(tiny_dir), "--problems", "2", "--out", str(out)]) == 2
    assert "holds a reasoning.json already" in capsys.readouterr().err
    assert main(["reason", "eval", "--problems", "2", "--methods", "sc", "--k", "1", "--out", str(tmp_path / "x")]) == 2
    assert "k: self-consistency needs at least 2 samples" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_model_answers_the_resume_question_from_the_docs(tmp_path, capsys):
    """The issue's own example: index the README and docs, ask how a PPO run resumes; the sources shown are the
    sections that say it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    index = tmp_path / "idx"
    assert main(["rag", "index", str(root / "docs"), str(root / "README.md"), "--index", str(index)]) == 0
    capsys.readouterr()
    assert main(["rag", "ask", "How does hhh resume a PPO run?", "--index", str(index), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["found"] and answer["answer"].strip()
    # the sources shown say how (the README quotes this very question too, so which sections rank first moves)
    assert any("--resume" in s["text"] for s in answer["sources"])
    assert all(" § " in s["citation"] and s["citation"].split(" § ")[0].endswith(".md")
               for s in answer["sources"])


def test_reason_eval_keeps_each_finished_method_and_resumes(tiny_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C during chain-of-thought: the direct answers are on disk; --resume runs only what is missing, and the
    report equals an uninterrupted run's."""
    from hhh.apps import reasoning

    real, ran = reasoning.run_method, []

    def interrupted(model, method, *a, **kw):
        ran.append(method)
        if method == "cot" and ran.count("cot") == 1:
            raise KeyboardInterrupt
        return real(model, method, *a, **kw)

    monkeypatch.setattr(reasoning, "run_method", interrupted)
    out, argv = tmp_path / "r", ["reason", "eval", "--model", str(tiny_dir), "--problems", "2", "--methods",
                                 "direct,cot", "--max-new-tokens", "6"]
    assert main([*argv, "--out", str(out)]) == 130
    assert (out / "partial" / "direct.json").is_file() and not (out / "reasoning.json").exists()
    assert main([*argv, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err  # a folder with partial results is not overwritten silently
    assert main([*argv, "--k", "3", "--out", str(out), "--resume"]) == 2  # other settings: refused, one line
    assert "settings differ" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert ran == ["direct", "cot", "cot"]
    monkeypatch.setattr(reasoning, "run_method", real)
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    strip = lambda r: {k: v for k, v in r.items() if k not in ("settings", "versions")}  # noqa: E731
    assert strip(json.loads((out / "reasoning.json").read_text())) == \
        strip(json.loads((tmp_path / "straight" / "reasoning.json").read_text()))
