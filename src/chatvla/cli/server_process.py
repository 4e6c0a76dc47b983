"""Run `chatvla serve` in a child process and wait for its ready line (for `demo` and tests), and ask a
running one what it serves (`model_info`).

The child is the real server, exactly as a user would start it; the parent only reads the one line
it prints when ready (`chatvla-serve ready: grpc=HOST:PORT http=URL ...`) and sends SIGTERM to stop it.

A parent that dies without stopping it (SIGKILL, a crash, an operator's `kill` of `chatvla eval`) must not
leave a server behind holding its ports, its memory and, with a backlog, the CPU that the next run
needs. On Linux the child asks the kernel for SIGTERM when its parent goes (`PR_SET_PDEATHSIG`), so it
drains and exits like any stopped server; `chatvla.cli.main` turns a SIGTERM of the parent into a normal
exit, so its `finally` blocks stop the server the usual way first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_PREFIX = "chatvla-serve ready:"  # must match chatvla.server.app.READY_PREFIX (a test checks)


class ServerStartError(RuntimeError):
    """The server exited or stayed silent; the message carries the tail of its log."""


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    grpc_address: str
    http_url: str
    log_path: Path
    openpi_url: str | None = None  # with `--openpi-port`

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def ready_fields(line: str) -> dict[str, str]:
    """The `key=value` fields of the server's ready line (grpc, http, openpi when enabled, model, ...)."""
    if not line.startswith(READY_PREFIX):
        raise ValueError(f"not a ready line: {line!r}")
    return dict(part.split("=", 1) for part in line[len(READY_PREFIX):].split() if "=" in part)


def parse_ready_line(line: str) -> tuple[str, str]:
    """(grpc address, http url) from the server's ready line."""
    fields = ready_fields(line)
    return fields["grpc"], fields["http"]


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGTERM when the thread that started it ends, or
    None where that cannot be had (not Linux; not the main thread, whose end is not the process's). It
    only calls a C function resolved here, before the fork, as a preexec_fn must in a threaded parent."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return arm


def start_server(args: Sequence[str], *, timeout_s: float = 180.0, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `chatvla serve ARGS...` (ports default to 0: the OS picks free ones) and wait until ready."""
    argv = [sys.executable, "-m", "chatvla.cli.main", "serve", "--grpc-port", "0", "--http-port", "0", *args]
    log = Path(tempfile.mkstemp(prefix="chatvla-serve-", suffix=".log")[1])
    stderr = log.open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})}, preexec_fn=_exit_with_parent())
    stderr.close()
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX) and not found:
                found.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            why = "exited" if proc.returncode not in (None, -9) else f"was not ready within {timeout_s:.0f} s"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ServerStartError(f"the server {why} (log {log}):\n{tail}")
        time.sleep(0.05)
    fields = ready_fields(found[0])
    return ServerProcess(proc, fields["grpc"], fields["http"], log, fields.get("openpi"))


def model_info(address: str, token: str | None = None, timeout_s: float = 30.0) -> Any:
    """The server's `ModelInfo` (its robot profile, its default reasoning policy, ...), by one unary
    call over plaintext gRPC; raises `grpc.RpcError` if it cannot be had."""
    import grpc

    from chatvla.v1 import policy_pb2 as pb
    from chatvla.v1 import policy_pb2_grpc as pbg
    from chatvla.wire.vocabulary import AUTHORIZATION_KEY, bearer_header

    with grpc.insecure_channel(address) as ch:
        md = ((AUTHORIZATION_KEY, bearer_header(token)),) if token else None
        return pbg.PolicyStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s, metadata=md)

