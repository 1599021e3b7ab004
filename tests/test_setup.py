"""The Makefile's set-up of Debian packages (`make system`), run for real with a PATH of stand-in commands: which
packages it asks apt-get for is what is checked (apt-get itself is the one stand-in that only records)."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("chromium", "node", "npm", "bwrap", "prlimit", "setpriv", "initdb")


def _bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _system(tmp_path: Path, present: tuple[str, ...]) -> list[list[str]]:
    """Run `make system` where only `present` (of TOOLS) are on the PATH; the apt-get calls it made."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    folder = tmp_path / "bin"
    folder.mkdir()
    calls = tmp_path / "apt-calls"
    for name in present:
        _bin(folder, name, "exit 0")
    _bin(folder, "id", "echo 0")  # root: no sudo
    _bin(folder, "ls", "exit 1")  # no /usr/lib/postgresql/*/bin/initdb
    _bin(folder, "apt-get", f'echo "$*" >> {calls}')
    env = {**os.environ, "PATH": str(folder)}
    done = subprocess.run([make, "-s", "system"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []


def test_system_asks_apt_for_nothing_when_every_tool_is_there(tmp_path):
    assert _system(tmp_path, TOOLS) == []


def test_system_installs_only_the_missing_packages(tmp_path):
    """A machine with Node.js from NodeSource (whose nodejs package conflicts with Debian's npm: `apt-get install
    npm` cannot be satisfied there) lacking only bubblewrap and Chromium: apt-get is asked for those two alone."""
    calls = _system(tmp_path, tuple(t for t in TOOLS if t not in ("bwrap", "chromium")))
    assert calls[0][0] == "update"
    installed = [w for w in calls[1] if not w.startswith("-")]
    assert installed[0] == "install" and sorted(installed[1:]) == ["bubblewrap", "chromium"]
