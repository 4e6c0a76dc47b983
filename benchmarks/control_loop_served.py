"""Stalled ticks of a robot driven by a real `chatvla serve` process at 50% and 60% of a chunk's latency.

    python benchmarks/control_loop_served.py [--ticks 450] [--fractions 0.5,0.6]

`benchmarks/control_loop.py` measures the executor against a fake server on a fake clock. This one
runs the real stack: a `chatvla serve --engine null` process and one robot (`FakeRobot`, real clock,
15 Hz `franka_joint`) through the gRPC client, the chunk executor and the safety filter. The latency
is the given fraction of a chunk's duration, made of one of two things:

  compute   the simulated model time (reasoning 85%, expert 15%) is all of it
  network   the model takes 10% of a chunk and a delaying TCP proxy between robot and server (half
            the rest each way, as over Wi-Fi or a WAN) adds the remainder

and two set-ups per case, both on the same server code:

  one in flight  executor max_in_flight=1, server --max-in-flight 1 (the previous server's behaviour)
  pipelined      executor max_in_flight=2, server --max-in-flight 2: the next observation is sent
                 while the previous one is still being answered
  pipelined 3    the same with 3 in flight

Columns: stall ticks (after the first action, the arm held), their share of the run, requests sent,
and the p50 chunk latency the executor measured. Prints a table and writes
benchmarks/results/control_loop_served.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result

from chatvla.cli.server_process import start_server
from chatvla.client.episodes import run_episode
from chatvla.client.executor import ExecutorConfig
from chatvla.client.fakes import FakeRobot
from chatvla.profiles import FRANKA_JOINT

SETUPS = {"one in flight": 1, "pipelined": 2, "pipelined 3": 3}
COMPUTE_SHARE_OF_NETWORK_CASE = 0.10  # of a chunk's duration


class DelayProxy:
    """A loopback TCP proxy that holds every byte `one_way_s` in each direction, order kept."""

    def __init__(self, target: str, one_way_s: float) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.delay = one_way_s
        self.loop = asyncio.new_event_loop()
        self.address = ""
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await q.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                dst.write(data)
                await dst.drain()
            dst.close()

        sender = asyncio.create_task(send())
        while data := await src.read(65536):
            q.put_nowait((time.monotonic() + self.delay, data))
        q.put_nowait(None)
        await sender

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def run(fraction: float, case: str, setup: str, ticks: int) -> dict[str, Any]:
    profile = FRANKA_JOINT
    latency_ms = fraction * profile.chunk_duration_s * 1e3
    model_ms = latency_ms if case == "compute" else COMPUTE_SHARE_OF_NETWORK_CASE * profile.chunk_duration_s * 1e3
    k = SETUPS[setup]
    server = start_server([
        "--engine", "null", "--max-in-flight", str(k), "--log-level", "warning",
        "--engine-option", f"reason_ms={0.85 * model_ms:.1f}",
        "--engine-option", f"act_ms={0.15 * model_ms:.1f}",
    ])
    proxy = DelayProxy(server.grpc_address, (latency_ms - model_ms) / 2e3) if case == "network" else None
    try:
        robot = FakeRobot(profile, image_size=(profile.cameras[0].height, profile.cameras[0].width))
        result = run_episode(robot, [proxy.address if proxy else server.grpc_address], "pick up the red block",
                             max_ticks=ticks, executor_config=ExecutorConfig(max_in_flight=k))
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()
    ex = result.summary["executor"]
    return {
        "latency_frac": fraction, "latency": case, "setup": setup, "model_ms": round(model_ms, 1),
        "ticks": result.ticks,
        "stall_ticks": int(ex["stalls"]), "stall_pct": 100.0 * ex["stalls"] / max(1, result.ticks),
        "requests": int(ex["requests_sent"]), "latency_p50_ms": ex.get("latency_p50_ms"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=450, help="control ticks per run (15 Hz)")
    ap.add_argument("--fractions", default="0.5,0.6", help="latency as fractions of a chunk's duration")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the safety filter logs every stall streak; we count them instead
    rows = []
    for case in ("network", "compute"):
        for f in [float(x) for x in args.fractions.split(",")]:
            for setup in SETUPS:
                rows.append(run(f, case, setup, args.ticks))
                r = rows[-1]
                print(f"  {case} {f:.0%} {setup:14s} stalls {r['stall_ticks']} / {r['ticks']}", file=sys.stderr)
    print(table(rows))
    path = write_result("control_loop_served", {"profile": FRANKA_JOINT.name, "ticks": args.ticks, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
