"""A server started by `chatvla eval`/`demo` (`start_server`) goes away with the process that started it.

Each test runs a parent process that starts a real `chatvla serve` (the null engine: no model to load)
and prints the server's pid, then ends that parent the way an operator or a crash would, and waits
for the server to exit. Before the fix both servers were left running, reparented to init.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

PARENT = """
import sys, time
from chatvla.cli.server_process import start_server
server = start_server(["--engine", "null"], timeout_s=120)
print(server.proc.pid, flush=True)
try:
    time.sleep(600)
finally:
    server.stop()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose: it holds no ports or memory
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _start_parent(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """The parent process and the server pid it printed."""
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.strip().isdigit(), f"parent printed {line!r}"
    return parent, int(line)


def _wait_gone(pid: int, within_s: float = 60.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_server_exits_when_its_parent_is_killed() -> None:
    parent, server = _start_parent([sys.executable, "-c", PARENT])
    try:
        parent.kill()  # SIGKILL: no finally block runs in the parent
        parent.wait(10)
        assert _wait_gone(server), "the server outlived a SIGKILLed parent"
    finally:
        if _alive(server):
            os.kill(server, signal.SIGKILL)


COMMAND = """
import time
from chatvla.cli.server_process import start_server

def register(sub):
    return sub.add_parser("hold-server")

def run(args):
    server = start_server(["--engine", "null"], timeout_s=120)
    try:  # the pid is printed inside: once the test has it (and signals), this finally runs
        print(server.proc.pid, flush=True)
        time.sleep(600)
    finally:
        print("stopped", server.stop(), flush=True)
"""

MAIN = """
import sys
from chatvla.cli import main
main.COMMANDS["hold-server"] = ("hold_server", "a command that starts a server and waits")
sys.argv = ["chatvla", "hold-server"]
sys.exit(main.main())
"""


def test_a_terminated_chatvla_command_stops_its_server(tmp_path: Path) -> None:
    """`kill` (SIGTERM) of a `chatvla` program unwinds it, so its own `finally` stops the server."""
    (tmp_path / "hold_server.py").write_text(COMMAND)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    parent, server = _start_parent([sys.executable, "-c", MAIN], env)
    assert parent.stdout is not None
    try:
        parent.send_signal(signal.SIGTERM)
        rest = parent.stdout.read()
        assert parent.wait(60) == 128 + signal.SIGTERM
        assert rest.startswith("stopped 0"), rest  # stopped by the parent: drained, exit code 0
        assert not _alive(server)
    finally:
        if _alive(server):
            os.kill(server, signal.SIGKILL)
