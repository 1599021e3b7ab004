"""Run model-written Python in an OS-level sandbox (PAL's executor, `hhh sandbox run FILE.py`).

    # layer 1, the operating system (what actually contains the code):
    #   prlimit   CPU seconds, address space, file size (= the output cap), open files, processes, no core dumps
    #   setpriv   the user `nobody`, no groups, no capabilities: the process limit counts its processes only
    #   bwrap     new namespaces for everything (no network: only a loopback that nothing listens on; own PIDs,
    #             the code's Python is their PID 1, so every process it starts dies with it), a read-only root
    #             with /usr read-only and one fresh writable folder (/sandbox) and a private /tmp; no /etc, no
    #             /home, no project; environment cleared; killed when its parent dies
    #   host      a wall-clock limit (the process group is killed), the output read from a capped file
    # layer 2, the Python process (a second net, never the only one): imports limited to an allow-list of pure
    #   modules, `open`, `exec`, `eval`, `compile`, `input`, `breakpoint` removed from the code's builtins, print
    #   captured up to the output cap
    #
    # what comes back: `answer` (the repr of the code's variable of that name), what it printed, and an error as
    # text a model can read (exception, message, line), or the one-line reason it was stopped

Needs Debian's `bubblewrap`, `util-linux` (prlimit, setpriv) and `/usr/bin/python3` (the stdlib is all the code
gets); `make system` installs them.

>>> run("answer = sum(range(10))").answer   # doctest: +SKIP
'45'
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = "/usr/bin/python3"
NOBODY = 65534
ALLOWED_IMPORTS = ("math", "cmath", "statistics", "fractions", "decimal", "itertools", "functools", "collections",
                   "re", "datetime", "random", "json", "string", "operator", "heapq", "bisect", "dataclasses",
                   "typing", "enum", "numbers", "textwrap", "calendar")

RUNNER = r'''
import builtins, io, json, sys, traceback
nonce, allowed, cap = sys.argv[1], set(sys.argv[2].split(",")), int(sys.argv[3])
real_stdout = sys.stdout
source = open("/sandbox/main.py", encoding="utf-8").read()
real_import = builtins.__import__
for name in allowed:  # imported here, with the real import, so their own imports work
    try:
        real_import(name)
    except ImportError:
        pass

def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    # the code's own imports (and a bare __import__ call, which passes no globals); the stdlib's inner imports pass
    if (globals is None or globals.get("__name__") == "__sandbox__") and \
            (level or name.partition(".")[0] not in allowed):
        raise ImportError(f"import of {name!r} is not allowed in the sandbox (allowed: {', '.join(sorted(allowed))})")
    return real_import(name, globals, locals, fromlist, level)

class Capped(io.StringIO):
    def write(self, text):
        if self.tell() + len(text) > cap:
            raise OverflowError(f"output over {cap} characters")
        return super().write(text)

out = Capped()
safe = {k: v for k, v in vars(builtins).items()
        if k not in ("open", "exec", "eval", "compile", "input", "breakpoint", "__import__", "exit", "quit", "help")}
safe["__import__"] = guarded_import
namespace = {"__name__": "__sandbox__", "__builtins__": safe}
result = {"answer": None, "error": None}
sys.stdout = sys.stderr = out
try:
    exec(compile(source, "main.py", "exec"), namespace)
    if "answer" in namespace:
        result["answer"] = repr(namespace["answer"])[:cap]
except MemoryError:
    result["error"] = "MemoryError: the code ran out of memory"
except RecursionError:
    result["error"] = "RecursionError: maximum recursion depth exceeded"
except BaseException as e:
    line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == "main.py"), None)
    where = f" (line {line})" if line else ""
    result["error"] = (f"{type(e).__name__}: {e}"[:500] + where).replace("\n", " ")
sys.stdout = real_stdout
result["stdout"] = out.getvalue()
real_stdout.write("\n" + nonce + json.dumps(result) + "\n")
real_stdout.flush()
'''


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    output_chars: int = 64 * 1024
    processes: int = 16
    allowed_imports: tuple[str, ...] = ALLOWED_IMPORTS


@dataclass(frozen=True)
class Result:
    ok: bool                         # ran to its end without an exception
    answer: str | None = None        # repr of the variable `answer`, if the code set one
    stdout: str = ""
    error: str | None = None         # one line: the exception, or why the sandbox stopped the code
    stopped: str | None = None       # "timeout", "cpu", "memory", "output", "crashed" when the sandbox stopped it
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


class SandboxUnavailable(RuntimeError):
    pass


def available() -> str | None:
    """None when the sandbox can run here, else what is missing (one line)."""
    missing = [tool for tool in ("bwrap", "prlimit", "setpriv") if shutil.which(tool) is None]
    if not Path(PYTHON).is_file():
        missing.append(PYTHON)
    return f"the sandbox needs {', '.join(missing)} (apt-get install bubblewrap util-linux python3)" if missing else None


def command(work: Path, runner: Path, limits: Limits, nonce: str) -> list[str]:
    """As root: limits, then `nobody`, then the namespaces. As another user the code already runs unprivileged
    (bwrap makes an unprivileged user namespace); there the process limit is left out, since it would count
    every process of that user, not the sandbox's."""
    memory = limits.memory_mb * 1024 * 1024
    root = os.geteuid() == 0
    return [
        "prlimit", f"--cpu={limits.cpu_seconds}", f"--as={memory}", f"--fsize={_file_cap(limits)}",
        "--nofile=64", *([f"--nproc={limits.processes}"] if root else []), "--core=0", "--",
        *(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
           "--bounding-set=-all", "--no-new-privs", "--"] if root else []),
        "bwrap", "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", "/usr/bin", "--setenv", "PYTHONHASHSEED", "0",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--bind", str(work), "/sandbox", "--ro-bind", str(runner), "/runner.py", "--remount-ro", "/",
        "--chdir", "/sandbox",
        PYTHON, "-I", "-B", "/runner.py", nonce, ",".join(limits.allowed_imports), str(limits.output_chars),
    ]


def run(code: str, limits: Limits | None = None) -> Result:
    """Run `code` in the sandbox; never raises for anything the code does."""
    limits = limits or Limits()
    if (why := available()) is not None:
        raise SandboxUnavailable(why)
    nonce = "HHH-RESULT-" + secrets.token_hex(8) + " "
    with tempfile.TemporaryDirectory(prefix="hhh-sandbox-") as tmp:
        root = Path(tmp)
        work, runner, out_path = root / "work", root / "runner.py", root / "out.txt"
        work.mkdir()
        (work / "main.py").write_text(code, encoding="utf-8")
        runner.write_text(RUNNER, encoding="utf-8")
        if os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)  # the code runs as nobody: its folder must be its own
        for path in (root, runner, work / "main.py"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        start = time.monotonic()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(command(work, runner, limits, nonce), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code_rc = proc.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code_rc = proc.wait()
                timed_out = True
        seconds = time.monotonic() - start
        data = out_path.read_bytes()
        raw = data[:_file_cap(limits)].decode("utf-8", "replace")
    if len(data) >= _file_cap(limits) and raw.rfind(nonce) < 0:  # it wrote around print until the file was full
        return Result(False, error=f"stopped: output limit of {limits.output_chars} characters", stopped="output",
                      seconds=seconds)
    return _result(raw, nonce, code_rc, timed_out, seconds, limits)


def _file_cap(limits: Limits) -> int:
    """Bytes the output file may grow to (RLIMIT_FSIZE): the capped print output as JSON, with room to spare."""
    return limits.output_chars * 4 + 65536


def _result(raw: str, nonce: str, rc: int, timed_out: bool, seconds: float, limits: Limits) -> Result:
    if timed_out:
        return Result(False, error=f"stopped: wall-clock limit of {limits.wall_seconds:g} s", stopped="timeout",
                      seconds=seconds)
    at = raw.rfind(nonce)
    if at >= 0:
        try:
            found = json.loads(raw[at + len(nonce):].strip().splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            found = None
        if isinstance(found, dict):
            error = found.get("error")
            stopped = None
            if error and error.startswith("MemoryError"):
                stopped, error = "memory", f"stopped: memory limit of {limits.memory_mb} MB ({error})"
            elif error and error.startswith("OverflowError: output over"):
                stopped, error = "output", f"stopped: output limit of {limits.output_chars} characters"
            return Result(error is None, answer=found.get("answer"), stdout=found.get("stdout") or "", error=error,
                          stopped=stopped, seconds=seconds)
    signals = {-signal.SIGXCPU: ("cpu", f"CPU time limit of {limits.cpu_seconds} s"),
               -signal.SIGKILL: ("cpu", f"CPU time limit of {limits.cpu_seconds} s"),
               -signal.SIGXFSZ: ("output", f"output limit of {limits.output_chars} characters"),
               -signal.SIGSEGV: ("memory", f"memory limit of {limits.memory_mb} MB")}
    # bwrap passes its child's death on as an exit status 128 + signal
    kind, text = signals.get(rc if rc < 0 else -(rc - 128) if rc > 128 else rc,
                             ("crashed", f"the process ended with status {rc}"))
    if "MemoryError" in raw or "Cannot allocate memory" in raw:
        kind, text = "memory", f"memory limit of {limits.memory_mb} MB"
    return Result(False, error=f"stopped: {text}", stopped=kind, seconds=seconds, detail={"tail": raw[-300:]})
