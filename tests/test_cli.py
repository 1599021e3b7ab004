import json
import subprocess
import sys

import pytest

from hhh.cli import main
from hhh.config import EvalConfig


def test_eval_command_as_a_user_runs_it(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hhh.cli", "eval", "--model", tiny_dir, "--prompts", "redteam:eval",
         "--max-prompts", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # no library warning a user cannot act on (transformers 5.2x warned on every decoding step's past_key_values)
    assert "Warning" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr[-2000:]
    assert "toxicity mean" in proc.stdout and "fraction > 0.5" in proc.stdout
    assert json.loads((out / "eval.json").read_text())["redteam:eval"]["n"] == 4
    assert (out / "config.toml").read_text().count("max_new_tokens = 4") == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and "torch" in meta["versions"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--temperature", "hot"], "flag --temperature"),
        (["eval", "--prompts", "nope"], "prompt set 'nope'"),
        (["eval", "--model", "./missing"], "not a folder"),
        (["compare", "/no/run"], "no eval_before.json"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_compare_prints_before_and_after(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for path, tox in ((a, 0.4), (b, 0.1)):
        path.mkdir()
        (path / "eval.json").write_text(json.dumps({"redteam:eval": {"n": 4, "toxicity/mean": tox}}))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "0.400" in out and "0.100" in out and "-0.300" in out


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "--samples-per-prompt" in out and "completions sampled per prompt" in out


def test_help_and_configs_load_neither_torch_nor_transformers():
    """`hhh --help` (every command's too) and `import hhh.config` stay light: no torch, no transformers."""
    code = ("import sys, contextlib, io, hhh.config, hhh.jobs, hhh.metrics\n"
            "from hhh.cli import main\n"
            "for argv in (['--help'], ['detox', '--help'], ['rm', 'train', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "print(heavy or 'ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.stdout, proc.stderr)


def test_public_api_and_light_imports():
    """`import hhh` and `hhh.losses` must not pull in transformers (STYLE: heavy imports stay out)."""
    code = ("import sys, hhh, hhh.losses; assert 'transformers' not in sys.modules, 'heavy import';"
            "from hhh import DetoxConfig, run_job, JOBS, build_policy, evaluate, load_prompts, Store, train_rm, "
            "RMConfig;"
            "assert 'fastapi' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("command", ["detox", "eval", "dpo", "grpo", "frontier"])
@pytest.mark.parametrize("flag, spec, message", [("--reward", "0.8*", "no reward after '*'"),
                                                 ("--reward", "module:nonexistent", "cannot import module"),
                                                 ("--reward", "length:abc", "positive integer"),
                                                 ("--reward", "rm:/nonexistent", "not a reward model run folder")])
def test_a_bad_reward_spec_fails_before_any_model_loads_and_leaves_no_run_folder(command, flag, spec, message,
                                                                                capsys, tmp_path, monkeypatch):
    import hhh.models.load

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the reward spec was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hhh.models.load, "load_causal_lm", no_load)
    flag = "--scorer" if command == "frontier" and flag == "--reward" and spec.startswith("rm:") else flag
    assert main([command, flag, spec]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_job_that_fails_while_loading_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": "many"}')
    monkeypatch.chdir(tmp_path)
    assert main(["detox", "--model", str(broken), "--out", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot load it" in err and "vocab_size" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.parametrize("offline", [True, False])
def test_an_unknown_hub_id_is_one_line_at_once(offline, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["eval", "--model", "nosuch-org-hhh/nosuch-model-hhh"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("not found offline" in err or "no such model on the hub" in err), err
    assert not list(tmp_path.glob("runs/*"))


def test_directories_non_utf8_files_and_corrupt_run_files_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Each names the path it could not use, exits 2 and leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    adir = tmp_path / "adir"
    adir.mkdir()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a"}\n')
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"prompt\nfine\ncaf\xe9\n")
    toml = tmp_path / "latin.toml"
    toml.write_bytes(b'model = "caf\xe9"\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text('{"redteam:eval": {"n": 4')
    (tmp_path / "run" / "eval_before.json").write_text("{}")
    db = str(tmp_path / "fb.db")
    main(["label", "add-labeler", "ann", "--db", db])
    capsys.readouterr()
    cases = [(["eval", "--config", str(adir)], f"config file {adir}: is a directory"),
             (["eval", "--config", str(toml)], f"config file {toml}: not UTF-8"),
             (["eval", "--prompts", str(latin)], f"{latin}:2: not UTF-8"),
             (["eval", "--prompts", str(csv)], f"{csv}:3: not UTF-8"),
             (["label", "import", str(adir), "--db", db], f"{adir}: is a directory"),
             (["label", "import", str(pairs), "--db", db], f"{pairs}:2: not UTF-8"),
             (["label", "export", "--out", str(adir), "--db", db], f"{adir}: is a directory"),
             (["label", "export", "--out", "x.jsonl", "--db", str(tmp_path / "typo.db")], "no such store"),
             (["compare", str(tmp_path / "run")], "eval.json: not a valid JSON file"),
             (["label", "add-labeler", "", "--db", db], "1 to 200 printable")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "typo.db").exists() and not list(tmp_path.glob("adir*.tmp"))
    assert not (tmp_path / "runs").exists()


def test_a_failed_resume_keeps_the_folder_it_was_given(tmp_path):
    from hhh.runs import RunDir

    made = RunDir.create("x", EvalConfig(), str(tmp_path / "made"))
    with pytest.raises(RuntimeError), made.removed_on_error():
        raise RuntimeError("boom")
    assert not made.path.exists()
    kept = RunDir(tmp_path / "kept")
    kept.path.mkdir()
    (kept.path / "eval_before.json").write_text("{}")
    with pytest.raises(RuntimeError), kept.removed_on_error():
        raise RuntimeError("boom")
    assert (kept.path / "eval_before.json").is_file()


def test_two_writers_of_one_run_file_do_not_collide(tmp_path, monkeypatch):
    """Two processes of one run (accelerate launch) may write the same JSON file at once; each writes its own
    temporary file, so the second's rename does not find the first's moved away (a 2-process DPO run once failed so).
    The other writer is made to write between this one's temporary file and its rename."""
    import os

    from hhh.runs import RunDir

    run = RunDir(tmp_path)
    rename, interleaved = os.replace, []

    def other_writer_first(src, dst):
        if not interleaved:
            interleaved.append(True)
            run.write_json("pairs.json", {"writer": 2})
        rename(src, dst)

    monkeypatch.setattr("hhh.runs.os.replace", other_writer_first)
    run.write_json("pairs.json", {"writer": 1})
    assert run.read_json("pairs.json") == {"writer": 1} and [p.name for p in tmp_path.iterdir()] == ["pairs.json"]


def test_a_failed_run_file_write_leaves_no_temporary_file(tmp_path):
    """A write that fails (here the target's name is taken by a folder, so the rename fails) raises and leaves the run
    folder as it was: no hidden temporary file behind."""
    from hhh.runs import RunDir

    run = RunDir(tmp_path)
    (tmp_path / "pairs.json").mkdir()
    with pytest.raises(OSError):
        run.write_json("pairs.json", {"writer": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.json"] and (tmp_path / "pairs.json").is_dir()


def test_every_command_prints_its_help():
    """A setting's description may hold any character (a '%' once broke `hhh cai --help`: argparse formats help)."""
    from hhh.cli import COMMANDS, build_parser

    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*name.split(), "--help"])
        assert done.value.code == 0, name


@pytest.mark.parametrize("command", ["detox", "grpo", "rloo"])
def test_rollout_engine_vllm_without_vllm_or_a_gpu_is_one_line_before_any_model_loads(command, capsys, tmp_path,
                                                                                     monkeypatch):
    """This machine has neither vLLM nor a GPU: --rollout-engine vllm stops at once, says which is missing, loads
    no model and makes no run folder."""
    import hhh.models.load

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the rollout engine was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hhh.models.load, "load_causal_lm", no_load)
    assert main([command, "--rollout-engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "rollout_engine = 'vllm': the vllm package is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert main([command, "--rollout-engine", "fast"]) == 2
    assert "rollout" in capsys.readouterr().err
