"""Stalled ticks of a robot driven by a real `chatvla serve` process at 50% and 60% of a chunk's latency.

    python benchmarks/control_loop_served.py [--ticks 450] [--fractions 0.5,0.6]

`benchmarks/control_loop.py` measures the executor against a fake server on a fake clock. This one
runs the real stack: a `chatvla serve --engine null` process whose simulated model time makes one
observation's latency the given fraction of a chunk's duration (reasoning 85%, expert 15%), and one
robot (`FakeRobot`, real clock, 15 Hz `franka_joint`) through the gRPC client, the chunk executor and
the safety filter. Two set-ups per latency, both on the same server code:

  one in flight      server --max-in-flight 1, executor max_in_flight=1 (one observation per robot
                     computing at a time: the previous server's behaviour)
  pipelined          server --max-in-flight 2, executor max_in_flight=2 (the defaults)

Columns: stall ticks (after the first action, the arm held), their share of the run, requests sent,
and the p50 chunk latency the executor measured. Prints a table and writes
benchmarks/results/control_loop_served.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result

from chatvla.cli.server_process import start_server
from chatvla.client.episodes import run_episode
from chatvla.client.executor import ExecutorConfig
from chatvla.client.fakes import FakeRobot
from chatvla.profiles import FRANKA_JOINT

SETUPS = {"one in flight": 1, "pipelined": 2}


def run(fraction: float, setup: str, ticks: int) -> dict[str, Any]:
    profile = FRANKA_JOINT
    latency_ms = fraction * profile.chunk_duration_s * 1e3
    k = SETUPS[setup]
    server = start_server([
        "--engine", "null", "--max-in-flight", str(k), "--log-level", "warning",
        "--engine-option", f"reason_ms={0.85 * latency_ms:.1f}",
        "--engine-option", f"act_ms={0.15 * latency_ms:.1f}",
    ])
    try:
        robot = FakeRobot(profile, image_size=(profile.cameras[0].height, profile.cameras[0].width))
        result = run_episode(robot, [server.grpc_address], "pick up the red block", max_ticks=ticks,
                             executor_config=ExecutorConfig(max_in_flight=k))
    finally:
        server.stop()
    ex = result.summary["executor"]
    return {
        "latency_frac": fraction, "setup": setup, "model_ms": round(latency_ms, 1), "ticks": result.ticks,
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
    for f in [float(x) for x in args.fractions.split(",")]:
        for setup in SETUPS:
            rows.append(run(f, setup, args.ticks))
            r = rows[-1]
            print(f"  {f:.0%} {setup:14s} stalls {r['stall_ticks']} / {r['ticks']}", file=sys.stderr)
    print(table(rows))
    path = write_result("control_loop_served", {"profile": FRANKA_JOINT.name, "ticks": args.ticks, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
