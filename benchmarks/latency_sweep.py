"""How fast must the server answer? Closed-loop success against a fixed chunk latency.

    python benchmarks/latency_sweep.py [--model chatvla-tiny-mm] [--latencies 0,1,2,3,4,6]
        [--modes train,override] [--episodes 20] [--robots 2] [--real-time] [--name latency_sweep]

`chatvla eval`'s episodes (train mode: the model's own text; override: a supplied text naming another
card) through one `chatvla serve` process, on simulated time with each chunk landing L control ticks
(L / 15 s) after its observation (chatvla.client.lockstep), for each L; "A-B" draws each answer's
latency from A to B ticks (seeded per episode), to see what jitter costs. `--real-time` adds a row on
wall time with the latency the server gives on this machine, for comparison. The same episodes at
every latency, so the rows differ only in the latency. Prints a table and writes
benchmarks/results/latency_sweep.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result

from chatvla.cli.server_process import start_server
from chatvla.training.evaluate import run_eval, summarise


def sweep(model: str, latencies: list[tuple[int, int] | None], modes: list[str], episodes: int, robots: int,
          seconds: float) -> list[dict[str, Any]]:
    server = start_server(["--model", model])
    rows: list[dict[str, Any]] = []
    try:
        for lat in latencies:
            t0 = time.monotonic()
            outcomes, _ = run_eval([server.grpc_address], modes, episodes, robots=robots, seconds=seconds,
                                   film_episodes=0, progress=False, latency_ticks=None if lat is None else lat[0],
                                   jitter_ticks=0 if lat is None else lat[1])
            s = summarise(outcomes)
            label = "wall" if lat is None else (f"{lat[0]} ticks" if not lat[1] else f"{lat[0]}-{sum(lat)} ticks")
            row: dict[str, Any] = {"latency": label,
                                   "latency_ms": None if lat is None else round(lat[0] * 1000 / 15)}
            for mode in modes:
                m = s.get(mode, {})
                flag = m.get("override_followed") if mode == "override" else m.get("success")
                row[f"{mode}_k"] = flag["k"] if flag else None
                row[f"{mode}_n"] = flag["n"] if flag else None
                row[f"{mode}_stall_ticks"] = m.get("stall_ticks_mean")
            row["wall_s"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            print(table([row]), flush=True)
    finally:
        server.stop()
    return rows


def _latency(text: str) -> tuple[int, int]:
    """"3" -> (3, 0): always 3 ticks; "2-6" -> (2, 4): 2 to 6 ticks, drawn per answer."""
    lo, _, hi = text.strip().partition("-")
    return (int(lo), int(hi) - int(lo) if hi else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="chatvla-tiny-mm")
    ap.add_argument("--latencies", default="0,1,2,3,4,6",
                    help="comma-separated chunk latencies in ticks; A-B draws each answer's from A to B (jitter)")
    ap.add_argument("--modes", default="train,override")
    ap.add_argument("--episodes", type=int, default=20, help="episodes per mode and latency (0 on)")
    ap.add_argument("--robots", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=16.0)
    ap.add_argument("--real-time", action="store_true", help="add a row on wall time")
    ap.add_argument("--name", default="latency_sweep")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chatvla.client.safety").setLevel(logging.ERROR)  # counted per episode instead
    latencies: list[tuple[int, int] | None] = [_latency(x) for x in args.latencies.split(",") if x.strip()]
    if args.real_time:
        latencies.append(None)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = sweep(args.model, latencies, modes, args.episodes, args.robots, args.seconds)
    print("\nsuccess (train) / named card placed (override) per chunk latency, same episodes in every row")
    print(table(rows))
    path = write_result(args.name, {"model": args.model, "episodes_per_mode": args.episodes, "robots": args.robots,
                                    "episode_seconds": args.seconds, "command": "python " + " ".join(sys.argv),
                                    "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
