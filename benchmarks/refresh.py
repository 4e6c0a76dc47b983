"""What a dual-rate reasoning refresh costs the chunks: every 4th observation refreshed vs pre-fill only.

    python benchmarks/refresh.py [--model chatvla-tiny-mm] [--observations 80] [--every-n 4]

A real `chatvla serve` process (torch engine) and robots on Stream that send an observation every
`--period-ms` (or as soon as the previous chunk is back, if that is later; 0 = back to back). Two
policies, in one run:

  prefill only    after the first observation's text, every chunk pre-fills the cached text
                  (`every_n` larger than the run)
  every N         a refresh every N observations, decoded in the background while chunks keep
                  pre-filling the cached text; the new text takes over when it is ready

Per policy: client latency p50/p99 (first observation excluded: it always waits for its text), the
refreshes that happened (new `reasoning_seq` values seen in the chunks) per observation against the
configured 1/N, and the median age of the reasoning the chunks carried. The JSON holds the p99 ratio
every-N / prefill-only. Prints a table and writes benchmarks/results/refresh.json.
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
from common import median, percentile, table, write_result

from chatvla.cli.server_process import start_server
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import encode_image, tensor_to_proto


async def robot(address: str, every_n: int, n_obs: int, i: int, period_s: float) -> list[dict[str, Any]]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PolicyStub(ch)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        rng = np.random.default_rng(i)
        images = [encode_image(rng.integers(0, 255, (c.height, c.width, 3), dtype=np.uint8), c.name)
                  for c in info.profile.cameras]
        state = tensor_to_proto(np.zeros(info.profile.state_dim, np.float32))
        call = stub.Stream()
        await call.write(pb.StreamRequest(start=pb.SessionStart(
            robot_profile=info.profile.name, instruction="put the card with the sum on the square",
            reasoning=pb.ReasoningPolicy(every_n=every_n))))
        await call.read()
        out = []
        next_at = time.perf_counter()
        for seq in range(1, n_obs + 1):
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            t0 = time.perf_counter()
            next_at = t0 + period_s
            await call.write(pb.StreamRequest(observation=pb.Observation(
                seq=seq, tick=seq, images=images, state=state, seed=seq)))
            resp = await call.read()
            if resp.WhichOneof("msg") != "chunk":
                raise RuntimeError(f"seq {seq}: {resp}")
            c = resp.chunk
            out.append({"latency_ms": (time.perf_counter() - t0) * 1e3, "reasoning_seq": c.reasoning_seq,
                        "age_ms": c.reasoning_age_ms, "refreshed": c.reasoning_refreshed})
        await call.done_writing()
        return out


def measure(model: str, policy: str, every_n: int, n_obs: int, robots: int, period_s: float) -> dict[str, Any]:
    server = start_server(["--model", model, "--log-level", "warning", "--reasoning-every-n", str(every_n)])
    try:
        async def all_robots() -> list[list[dict[str, Any]]]:
            address = server.grpc_address
            return await asyncio.gather(*(robot(address, every_n, n_obs, i, period_s) for i in range(robots)))

        per = asyncio.run(all_robots())
    finally:
        server.stop()
    samples = [s for p in per for s in p[1:]]  # the first observation always waits for its text
    lat = [s["latency_ms"] for s in samples]
    refreshes = sum(len({s["reasoning_seq"] for s in p}) - 1 for p in per)  # beyond each robot's first text
    return {
        "policy": policy, "every_n": every_n, "robots": robots, "observations": len(samples),
        "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
        "refreshes_per_obs": refreshes / len(samples), "configured_per_obs": 0.0 if every_n > n_obs else 1 / every_n,
        "reasoning_age_p50_ms": median([s["age_ms"] for s in samples]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="chatvla-tiny-mm")
    ap.add_argument("--observations", type=int, default=80, help="per robot")
    ap.add_argument("--every-n", type=int, default=4)
    ap.add_argument("--robots", type=int, default=1)
    ap.add_argument("--period-ms", type=float, default=100.0, help="observation period per robot; 0 = back to back")
    args = ap.parse_args()
    never = 10 * args.observations + 1
    period = args.period_ms / 1e3
    rows = [measure(args.model, "prefill only", never, args.observations, args.robots, period),
            measure(args.model, f"every {args.every_n}", args.every_n, args.observations, args.robots, period)]
    for r in rows:
        print(f"  {r['policy']}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms", file=sys.stderr)
    print(table(rows))
    ratio = rows[1]["p99_ms"] / rows[0]["p99_ms"]
    rate = rows[1]["refreshes_per_obs"] / rows[1]["configured_per_obs"]
    print(f"p99 every-{args.every_n} / prefill-only: {ratio:.3f}; refresh rate / configured: {rate:.3f}")
    path = write_result("refresh", {"model": args.model, "period_ms": args.period_ms, "rows": rows, "p99_ratio": ratio,
                                    "refresh_rate_over_configured": rate})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
