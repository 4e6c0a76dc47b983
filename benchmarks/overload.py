"""Goodput under overload: open-loop Infer calls at 1x, 2x and 3x the server's measured capacity.

    python benchmarks/overload.py [--seconds 8] [--deadline-ms 1000]

A `chatvla serve --engine null` process with simulated model time (reasoning 40 ms + 2 ms per item,
expert 10 ms + 2 ms per item, batches of up to 8: about 100 observations/s on one compute thread).
Capacity is measured first, in the same run: 32 closed-loop callers for `--seconds`. Then callers
arrive open-loop (Poisson) at 1x, 2x and 3x that rate, each Infer with a `--deadline-ms` gRPC deadline.

Columns per load: offered and goodput (answered in time) per second, goodput / capacity, the p99
latency of admitted calls, the p99 time to a refusal, and how calls ended (ok, refused at admission,
deadline exceeded). Prints a table and writes benchmarks/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, table, write_result

from chatvla.cli.server_process import start_server
from chatvla.profiles import FRANKA_JOINT
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import encode_image, tensor_to_proto

ENGINE = ("reason_ms=40", "act_ms=10", "per_item_ms=2")


def request() -> pb.InferRequest:
    p = FRANKA_JOINT
    images = [encode_image(np.zeros((c.height, c.width, 3), np.uint8), c.name) for c in p.cameras]
    return pb.InferRequest(images=images, state=tensor_to_proto(np.asarray(p.home, np.float32)),
                           instruction="pick up the red block", seed=1)


async def capacity(address: str, seconds: float) -> float:
    req, done = request(), 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PolicyStub(ch)
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.Infer(req, timeout=30)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(32)))
        return done / (time.perf_counter() - t0)


async def offered_load(address: str, rate: float, seconds: float, deadline_s: float) -> dict[str, Any]:
    req, rng = request(), np.random.default_rng(0)
    ok_lat, refused_lat, outcomes = [], [], {"ok": 0, "refused": 0, "deadline": 0, "other": 0}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PolicyStub(ch)

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                await stub.Infer(req, timeout=deadline_s)
                ok_lat.append((time.perf_counter() - t0) * 1e3)
                outcomes["ok"] += 1
            except grpc.aio.AioRpcError as e:
                dt = (time.perf_counter() - t0) * 1e3
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused_lat.append(dt)
                    outcomes["refused"] += 1
                elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    outcomes["deadline"] += 1
                else:
                    outcomes["other"] += 1

        tasks, t, start = [], 0.0, time.perf_counter()
        while t < seconds:
            t += float(rng.exponential(1.0 / rate))
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {"offered_per_s": len(tasks) / seconds, "goodput_per_s": outcomes["ok"] / seconds,
            "admitted_p99_ms": percentile(ok_lat, 99) if ok_lat else float("nan"),
            "refusal_p99_ms": percentile(refused_lat, 99) if refused_lat else float("nan"), **outcomes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--deadline-ms", type=float, default=1000.0)
    ap.add_argument("--loads", default="1,2,3", help="multiples of the measured capacity")
    args = ap.parse_args()
    flags = ["--engine", "null", "--max-batch", "8", "--log-level", "error"]
    for opt in ENGINE:
        flags += ["--engine-option", opt]
    server = start_server(flags)
    try:
        cap = asyncio.run(capacity(server.grpc_address, args.seconds))
        print(f"  capacity: {cap:.1f} observations/s", file=sys.stderr)
        rows = []
        for k in [float(x) for x in args.loads.split(",")]:
            r = asyncio.run(offered_load(server.grpc_address, k * cap, args.seconds, args.deadline_ms / 1e3))
            rows.append({"load": k, **r, "goodput_over_capacity": r["goodput_per_s"] / cap})
            print(f"  {k:.0f}x: goodput {r['goodput_per_s']:.1f}/s", file=sys.stderr)
    finally:
        server.stop()
    print(table(rows))
    path = write_result("overload", {"engine_options": list(ENGINE), "deadline_ms": args.deadline_ms,
                                     "capacity_per_s": cap, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
