"""Measure a server restart as a robot sees it: SIGKILL `chatvla serve`, start it again on the same port,
and time (a) the restart (kill -> the new process's ready line, i.e. gRPC health SERVING), (b) how long
after SERVING the policy client has a session again, with the readiness watch (`follow_health`, the
default) and with the blind backoff, and (c) the whole ride-out (kill -> session) and (d) kill -> the first
fresh chunk of the new session, against the watchdog's hold and stop times for the served profile
(client/safety.py).

Run it niced on a shared machine, e.g.

    nice -n 19 .venv/bin/python scripts/measure_restart.py --engine torch --model tiny --runs 3

The figures include the Python start-up and imports of the restarted process, the model load and warm-up.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from chatvla.client.config import ClientConfig, SessionConfig
from chatvla.client.connection import ChunkReply, ObservationRequest
from chatvla.client.policy_client import GrpcPolicyClient
from chatvla.client.safety import SafetyFilter
from chatvla.profiles import get_profile

READY = re.compile(r"chatvla-serve ready: grpc=(\S+) .*profile=(\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`chatvla serve` on a fixed gRPC port; `ready_at` is when its ready line was read."""

    def __init__(self, port: int, engine: str, model: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("CHATVLA_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatvla.cli.main", "serve", "--engine", engine, "--model", model,
             "--grpc-port", str(port), "--http-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        self.ready = threading.Event()
        self.ready_at = 0.0
        self.profile = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = READY.search(line)
            if m and not self.ready.is_set():
                self.ready_at, self.profile = time.monotonic(), m.group(2)
                self.ready.set()

    def wait_ready(self, timeout: float = 300.0) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError("the server did not become ready")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_for(cond, timeout: float) -> float:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError("timed out")
        time.sleep(0.005)
    return time.monotonic()


def one_restart(port: int, args: argparse.Namespace, follow_health: bool) -> dict[str, float]:
    server = Server(port, args.engine, args.model)
    server.wait_ready()
    profile = get_profile(server.profile)
    client = GrpcPolicyClient(ClientConfig(addresses=(f"127.0.0.1:{port}",), follow_health=follow_health),
                              SessionConfig(profile=profile, instruction="pick up the red block"))
    try:
        client.wait_connected(30.0)
        killed_at = time.monotonic()
        server.kill()
        wait_for(lambda: not client.connected, 10.0)
        server = Server(port, args.engine, args.model)
        server.wait_ready()
        connected_at = wait_for(lambda: client.connected, 120.0)
        # The first fresh chunk of the new session (fresh reasoning: the session state died with the
        # server) is what resets the watchdog.
        images = {c.name: np.full((c.height, c.width, 3), 90, np.uint8) for c in profile.cameras}
        state = np.asarray(profile.home or [0.0] * profile.state_dim, np.float32)
        client.submit(ObservationRequest(tick=1, images=images, state=state, deadline_ms=60_000))
        got: list[float] = []

        def chunk() -> bool:
            if any(isinstance(e, ChunkReply) for e in client.poll()):
                got.append(time.monotonic())
            return bool(got)

        chunk_at = wait_for(chunk, 120.0)
        return {"restart_s": server.ready_at - killed_at, "after_serving_s": connected_at - server.ready_at,
                "ride_out_s": connected_at - killed_at, "first_chunk_s": chunk_at - killed_at}
    finally:
        client.close()
        server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    probe = Server(port, args.engine, args.model)
    probe.wait_ready()
    profile = get_profile(probe.profile)
    probe.kill()
    safety = SafetyFilter(profile)
    print(f"{args.engine}/{args.model}, profile {profile.name}: watchdog hold after {safety.hold_after_s:.2f} s, "
          f"stop after {safety.stop_after_s:.2f} s without a fresh chunk")
    for follow_health in (True, False):
        rows = [one_restart(port, args, follow_health) for _ in range(args.runs)]
        label = "health watch" if follow_health else "blind backoff"
        for key in ("restart_s", "after_serving_s", "ride_out_s", "first_chunk_s"):
            vals = [r[key] for r in rows]
            print(f"{label:14s} {key:16s} median {statistics.median(vals):6.2f} s   "
                  f"[{', '.join(f'{v:.2f}' for v in vals)}]")


if __name__ == "__main__":
    main()
