"""Stall ticks and smoothness of the executed trajectory: our chunk executor vs a synchronous broker.

    python benchmarks/control_loop.py [--profile franka_joint] [--ticks 3000] [--seed 0]

The synchronous broker is openpi's ActionChunkBroker: it asks for a new chunk only when the current one
is used up, waits for it (the arm holds), then plays it from its first row. Our executor runs the real
`ControlLoop` (robot -> executor -> safety -> robot) with its default settings, plus variants: the other
blend modes, and pipelining (several requests in flight, for servers that run them concurrently).

Everything runs on a fake clock, so the run takes seconds and is repeatable. The simulated server
answers after `latency x U(1 - jitter, 1 + jitter)`; its chunk is a smooth function of the observation
(`TrackingPolicy`: plan from the observed state back onto a smooth reference motion) with a small random
offset per chunk, as two diffusion samples disagree, so how chunks are joined shows in the jerk.

Metrics, per run of `--ticks` control ticks:
  stalls      ticks after the first action on which no new action was available (the arm held)
  jerk        mean |d3 q / dt3| of the commanded joint positions (rad/s^3), moving joints, after warm-up
  req/s       observations sent per second (server load)
Prints a table and writes benchmarks/results/control_loop.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result

from chatvla.client.executor import ChunkExecutor, ChunkMerge, ExecutorConfig
from chatvla.client.fakes import FakeClock, FakePolicyConnection, FakeRobot, TrackingPolicy
from chatvla.client.runtime import ActionQueue, ControlLoop
from chatvla.client.safety import SafetyFilter
from chatvla.profiles import PROFILES, RobotProfile

LATENCY_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


class SynchronousBroker:
    """openpi's ActionChunkBroker semantics on our loop: one chunk at a time, played from row 0 once it
    arrives, the next one requested only when it is used up. While it waits the arm holds; on a
    blocking client those are the ticks the loop cannot run."""

    def __init__(self, profile: RobotProfile) -> None:
        self.profile = profile
        self._plan: np.ndarray | None = None
        self._row = 0
        self._waiting: int | None = None
        self._started = False
        self.stalls = 0
        self.requests = 0

    def should_request(self, tick: int, now: float) -> bool:
        return self._waiting is None and (self._plan is None or self._row >= len(self._plan))

    def on_request_sent(self, seq: int, tick: int, now: float) -> None:
        self._waiting = seq
        self.requests += 1

    def on_request_failed(self, seq: int, now: float) -> None:
        if seq == self._waiting:
            self._waiting = None

    def add_chunk(
        self, actions: np.ndarray, *, seq: int, now: float, tick: int | None = None,
        server_s: tuple[float, float] | None = None,
    ) -> ChunkMerge:
        self._plan, self._row, self._waiting = np.asarray(actions, dtype=np.float64), 0, None
        n = len(self._plan)
        return ChunkMerge(seq, tick or 0, n, 0, 0, 0, n, False)

    def pop(self, tick: int) -> np.ndarray | None:
        if self._plan is None or self._row >= len(self._plan):
            self.stalls += self._started
            return None
        self._started = True
        self._row += 1
        return self._plan[self._row - 1]


def run_one(
    profile: RobotProfile,
    mode: str,
    latency_s: float,
    *,
    ticks: int,
    seed: int,
    jitter: float,
    noise: float,
) -> dict[str, Any]:
    clock = FakeClock()
    rng = np.random.default_rng(seed)
    policy = TrackingPolicy(profile, noise=noise, seed=seed)
    conn = FakePolicyConnection(
        clock, policy, latency=lambda _seq, _req: latency_s * float(rng.uniform(1 - jitter, 1 + jitter))
    )
    robot = FakeRobot(profile, clock=clock)
    queue: ActionQueue
    if mode == "sync":
        queue = SynchronousBroker(profile)
    else:
        blend, _, pipelined = mode.partition("+")
        queue = ChunkExecutor(profile, ExecutorConfig(blend=blend, max_in_flight=4 if pipelined else 1))  # type: ignore[arg-type]
    safety = SafetyFilter(profile)
    loop = ControlLoop(robot, conn, queue, safety, clock=clock)
    loop.run(max_ticks=ticks)

    stalls = queue.stalls if isinstance(queue, SynchronousBroker) else queue.stats.stalls
    requests = queue.requests if isinstance(queue, SynchronousBroker) else queue.stats.requests_sent
    moving = np.ones(profile.action_dim, dtype=bool)
    moving[list(profile.gripper_indices)] = False
    warmup = 2 * profile.chunk_size  # skip start-up (waiting for the very first chunk)
    q = np.asarray(robot.targets)[warmup:, moving]
    jerk = np.abs(np.diff(q, n=3, axis=0)) * profile.control_rate_hz**3
    return {
        "latency_frac": latency_s / profile.chunk_duration_s,
        "latency_ms": latency_s * 1000,
        "mode": mode,
        "stall_ticks": int(stalls),
        "stall_pct": 100.0 * stalls / ticks,
        "mean_abs_jerk": float(jerk.mean()),
        "p99_abs_jerk": float(np.percentile(jerk, 99)),
        "requests_per_s": requests / (ticks * profile.dt),
        "step_limit_hits": int(safety.counts["step_limit"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="franka_joint", choices=sorted(PROFILES))
    ap.add_argument("--ticks", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jitter", type=float, default=0.2, help="latency spread, fraction of the latency")
    ap.add_argument("--noise", type=float, default=0.005, help="per-chunk offset std (rad)")
    ap.add_argument("--out", default="control_loop")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the safety filter logs every stall streak; we count them instead

    profile = PROFILES[args.profile]
    modes = ("sync", "crossfade", "replace", "weighted", "crossfade+pipelined")
    rows = [
        run_one(
            profile,
            mode,
            frac * profile.chunk_duration_s,
            ticks=args.ticks,
            seed=args.seed,
            jitter=args.jitter,
            noise=args.noise,
        )
        for frac in LATENCY_FRACTIONS
        for mode in modes
    ]

    by = {(r["latency_frac"], r["mode"]): r for r in rows}
    summary = []
    for frac in LATENCY_FRACTIONS:
        f = frac * profile.chunk_duration_s / profile.chunk_duration_s
        s, c, p = by[(f, "sync")], by[(f, "crossfade")], by[(f, "crossfade+pipelined")]
        summary.append(
            {
                "latency": f"{frac:.0%} ({frac * profile.chunk_duration_s * 1000:.0f} ms)",
                "sync stalls": s["stall_ticks"],
                "sync jerk": s["mean_abs_jerk"],
                "exec stalls": c["stall_ticks"],
                "exec jerk": c["mean_abs_jerk"],
                "replace jerk": by[(f, "replace")]["mean_abs_jerk"],
                "weighted jerk": by[(f, "weighted")]["mean_abs_jerk"],
                "pipelined stalls": p["stall_ticks"],
                "pipelined jerk": p["mean_abs_jerk"],
                "exec req/s": c["requests_per_s"],
                "pipelined req/s": p["requests_per_s"],
            }
        )
    print(
        f"{profile.name}: chunk {profile.chunk_size} at {profile.control_rate_hz:g} Hz "
        f"({profile.chunk_duration_s * 1000:.0f} ms), {args.ticks} ticks per run, latency jitter ±{args.jitter:.0%}, "
        f"chunk noise {args.noise} rad; jerk = mean |d3q/dt3| in rad/s^3"
    )
    print(table(summary))
    path = write_result(
        args.out,
        {
            "profile": profile.name,
            "chunk_size": profile.chunk_size,
            "control_rate_hz": profile.control_rate_hz,
            "ticks": args.ticks,
            "seed": args.seed,
            "jitter": args.jitter,
            "noise": args.noise,
            "executor_config": asdict(ExecutorConfig()),
            "rows": rows,
            "summary": summary,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
