"""The PAL sandbox: what model-written code gets back, and the escape suite. Every case runs twice over: once as
written (the in-process layer refuses it) and, where that layer can be walked around, through the classic
walk-around (`().__class__.__base__.__subclasses__()` reaches the `os` module), so that the OS layer alone must
contain it. The host is checked after each: no file written, no secret read, no process left behind."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hhh.apps.sandbox import Limits, available, run

pytestmark = pytest.mark.skipif(available() is not None and not os.environ.get("CI"),
                                reason=available() or "")  # in CI a missing tool must fail, not skip

FAST = Limits(wall_seconds=4, cpu_seconds=1, memory_mb=256, output_chars=4096)
# the walk-around: the `os` module's namespace from an object subclass the interpreter already loaded
OS = "os = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__\n"
REAL_IMPORT = OS + "imp = os['__builtins__']['__import__']\n"
PROJECT = Path(__file__).resolve().parents[1]


def nobody_processes() -> int:
    out = subprocess.run(["pgrep", "-u", "65534", "-c"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def settled(before: int, seconds: float = 3.0) -> bool:
    """The sandbox's processes are gone (the kernel ends a PID namespace's processes as its first one exits: a
    moment after the sandbox returns)."""
    import time

    deadline = time.monotonic() + seconds
    while nobody_processes() > before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_code_runs_and_gives_back_its_answer_and_output():
    r = run("import math\nanswer = math.comb(10, 3)\nprint('working', answer)")
    assert r.ok and r.answer == "120" and r.stdout == "working 120\n" and r.error is None
    r = run("x = [1, 2]\nanswer = x[5]")
    assert not r.ok and r.error == "IndexError: list index out of range (line 2)" and r.stopped is None


# (name, code, what the result must say)
ESCAPES = [
    ("read /etc/passwd", "answer = open('/etc/passwd').read()", "NameError: name 'open' is not defined"),
    ("read /etc/passwd, walked around", OS + "answer = os['open']('/etc/passwd', 0)", "No such file or directory"),
    ("read the project", OS + f"answer = os['open']({str(PROJECT / 'README.md')!r}, 0)", "No such file or directory"),
    ("list the host's root", OS + "answer = sorted(os['listdir']('/'))", None),
    ("read /root", OS + "answer = os['listdir']('/root')", "No such file or directory"),
    ("write to /usr", OS + "os['open']('/usr/evil', os['O_CREAT'] | os['O_WRONLY'])", "Read-only file system"),
    ("write to /", OS + "os['mkdir']('/evil')", "Read-only file system"),
    ("import os", "import os", "import of 'os' is not allowed"),
    ("__import__", "__import__('os')", "import of 'os' is not allowed"),
    ("importlib", "import importlib", "import of 'importlib' is not allowed"),
    ("builtins module", "import builtins", "import of 'builtins' is not allowed"),
    ("builtins dict", "answer = __builtins__['open']", "KeyError: 'open'"),
    ("eval and exec", "eval('1 + 1')", "NameError: name 'eval' is not defined"),
    ("relative import", "from . import x", "import of '' is not allowed"),
    ("import subprocess", "import subprocess", "import of 'subprocess' is not allowed"),
    ("subprocess, walked around", REAL_IMPORT + "sp = imp('subprocess')\n"
     "answer = sp.run(['cat', '/etc/passwd'], capture_output=True).stderr", None),
    ("os.system, walked around", OS + "os['system']('cat /etc/passwd > /sandbox/leak 2>&1')\n"
     "answer = os['read'](os['open']('/sandbox/leak', 0), 1000)", None),
    ("import socket", "import socket", "import of 'socket' is not allowed"),
    ("ctypes", "import ctypes", "import of 'ctypes' is not allowed"),
    ("ctypes, walked around", REAL_IMPORT + "c = imp('ctypes')\n"
     "answer = c.CDLL(None).system(b'ls /etc > /sandbox/etc.txt 2>&1')", None),
    ("environment", OS + "answer = dict(os['environ'])", None),
    ("setuid root", OS + "os['setuid'](0)", "OSError"),
    ("kill the parent", OS + "os['kill'](os['getppid'](), 9)\nanswer = 'still here'", None),
    ("deep recursion", "def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
]


@pytest.mark.parametrize("name,code,says", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_escape_is_contained(name, code, says, monkeypatch):
    monkeypatch.setenv("HHH_TEST_SECRET", "s3cret-value")
    before = nobody_processes()
    r = run(code, FAST)
    text = f"{r.answer} {r.stdout} {r.error} {r.detail}"
    if says is not None:
        assert says in (r.error or ""), r
    assert "root:x:0:0" not in text and "s3cret-value" not in text  # no host secret came back
    assert not Path("/usr/evil").exists() and not Path("/evil").exists()
    assert settled(before)  # nothing left running
    if name == "list the host's root":
        assert r.ok and "etc" not in r.answer and "work" not in r.answer and "root" not in r.answer
    if name == "environment":  # cleared: what bwrap and Python set themselves, nothing of the host's
        assert r.ok and set(eval(r.answer)) <= {"PATH", "PYTHONHASHSEED", "PWD", "LC_CTYPE"}  # noqa: S307
    if name in ("subprocess, walked around", "os.system, walked around", "ctypes, walked around"):
        assert r.ok  # the program ran, inside, and found no /etc to read
        assert name.startswith("ctypes") or "No such file or directory" in r.answer
    if name == "kill the parent":
        assert r.answer is None or r.answer == "'still here'"  # only the sandbox's own processes can be hit


def test_network_is_cut_even_with_a_real_socket():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    code = REAL_IMPORT + ("s = imp('socket')\nout = []\n"
                          f"for host in ('127.0.0.1', '1.1.1.1'):\n"
                          "    try:\n"
                          f"        s.create_connection((host, {port} if host == '127.0.0.1' else 53), timeout=1)\n"
                          "        out.append('connected')\n"
                          "    except OSError as e:\n"
                          "        out.append(type(e).__name__)\n"
                          "answer = out")
    r = run(code, FAST)
    listener.close()
    assert r.ok and "connected" not in r.answer, r
    assert accepted == []  # the host's listener never saw the sandbox


def test_writes_stay_in_the_fresh_folder_and_vanish_with_it(tmp_path):
    r = run(OS + "fd = os['open']('/sandbox/note.txt', os['O_CREAT'] | os['O_WRONLY'])\n"
                 "os['write'](fd, b'hello')\nanswer = sorted(os['listdir']('/sandbox'))\n"
                 "os['open']('/tmp/x', os['O_CREAT'] | os['O_WRONLY'])", FAST)
    assert r.ok and r.answer == "['main.py', 'note.txt']"
    assert not Path("/tmp/x").exists()  # the sandbox's /tmp is its own


@pytest.mark.parametrize("name,code,stopped", [
    ("infinite loop", "while True:\n    pass", "cpu"),
    ("CPU limit signal ignored", REAL_IMPORT + "sig = imp('signal')\nsig.signal(sig.SIGXCPU, sig.SIG_IGN)\n"
     "while True:\n    pass", "cpu"),
    ("sleeping forever", REAL_IMPORT + "imp('time').sleep(60)", "timeout"),
    ("memory bomb", "x = ' ' * (10 ** 10)", "memory"),
    ("memory bomb in steps", "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)", "memory"),
    ("huge print", "print('x' * 10 ** 6)", "output"),
    ("huge output around print", OS + "os['write'](1, b'x' * 10 ** 7)", "output"),
    ("fork bomb", OS + "while True:\n    try:\n        os['fork']()\n    except OSError:\n        pass", None),
])
def test_resource_attacks_are_stopped_with_a_reason(name, code, stopped):
    before = nobody_processes()
    r = run(code, FAST)
    assert not r.ok and r.error and r.error.startswith("stopped:"), r
    if stopped:
        assert r.stopped == stopped, r
    assert r.seconds < FAST.wall_seconds + 2
    assert settled(before), "the sandbox left processes behind"


def test_hhh_sandbox_run_prints_the_result_or_one_line_why(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("answer = 6 * 7\nprint('thinking')\n")
    bad.write_text("while True:\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "hhh.cli", "sandbox", "run", str(good)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "thinking" in done.stdout and "answer = 42" in done.stdout
    done = subprocess.run([sys.executable, "-m", "hhh.cli", "sandbox", "run", str(bad), "--cpu-seconds", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout.strip() == "stopped: CPU time limit of 1 s"
    done = subprocess.run([sys.executable, "-m", "hhh.cli", "sandbox", "run", str(tmp_path / "nope.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "nope.py" in done.stderr


LIST_ROOT = OS + "answer = sorted(os['listdir']('/'))"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an ordinary user")
def test_an_ordinary_user_gets_the_same_walls(tmp_path):
    """Run by a user without privileges (no setpriv, no process limit: bwrap's unprivileged user namespace). The
    sandbox module needs only the standard library, so Debian's python3 runs it as `nobody` from a copy."""
    import shutil as sh

    from hhh.apps import sandbox

    folder = Path("/tmp") / f"hhh-sandbox-user-{os.getpid()}"
    folder.mkdir()
    try:
        sh.copy(sandbox.__file__, folder / "sandbox.py")
        folder.chmod(0o755)
        (folder / "sandbox.py").chmod(0o644)
        script = (f"import sys; sys.path.insert(0, {str(folder)!r}); import sandbox, json\n"
                  f"code = {LIST_ROOT!r}\n"
                  "r = sandbox.run(code)\nloop = sandbox.run('while True: pass', sandbox.Limits(cpu_seconds=1))\n"
                  "print(json.dumps([r.ok, r.answer, loop.stopped]))")
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-c", script], capture_output=True, text=True, timeout=60, cwd="/tmp")
        assert done.returncode == 0, done.stderr
        import json

        ok, answer, stopped = json.loads(done.stdout.strip().splitlines()[-1])
        assert ok and "etc" not in answer and "work" not in answer and stopped == "cpu"
    finally:
        sh.rmtree(folder, ignore_errors=True)
