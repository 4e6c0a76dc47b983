"""Serving latency and throughput: 1, 4 and 16 concurrent robot sessions, batching on vs off.

    python benchmarks/serving.py [--engine torch --model tiny] [--sessions 1,4,16] [--observations 20]
    python benchmarks/serving.py --engine null                       # transport + scheduling only

For each mode (batching on: `--max-batch`, default 16; off: max batch 1) a real `chatvla serve` process
is started on loopback with OS-chosen ports; N virtual robots then each open a Stream and run a
closed loop (send an observation, wait for its chunk, send the next). Per chunk we record the
client-side latency and the server's own timings.

Columns:
  p50/p99 ms     client latency, observation sent -> chunk received
  chunks/s       all sessions together, over the wall time of the run
  compute ms     p50 of preprocess + reasoning + expert batch time (what the model costs)
  overhead ms    p50 of (latency - compute): queueing, batching waits, serialization, network, asyncio
  queue ms       p50 of the server's own queue time
  batch          mean reasoning batch size the chunks ran in
With the null engine (`--engine-option reason_ms=20` etc.) compute is simulated, so the numbers show
what the serving layer adds.

With a real model (torch), the same script first measures the model's own speed in this process, on
the main thread, with the robots' inputs (preprocess + reason + act per batch, no server): its batch-1
latency and its batch-N chunks/s. The JSON then holds the ratios served/own (throughput at the most
sessions, p50 latency at one session), measured in one run. Prints a table and writes
benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, percentile, table, write_result

from chatvla.server.app import READY_PREFIX
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import encode_image, tensor_to_proto

READY = re.compile(re.escape(READY_PREFIX) + r" grpc=(\S+) http=(\S+)")
NULL_DEFAULTS = ("reason_ms=20", "act_ms=8", "per_item_ms=1")


def start_server(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "chatvla.cli.main", "serve", "--engine", args.engine, "--model", args.model,
           "--grpc-port", "0", "--http-port", "0", "--max-batch", str(max_batch), "--max-queue", "512",
           "--deadline-ms", "600000", "--log-level", "warning"]
    options = list(args.engine_option or (NULL_DEFAULTS if args.engine == "null" else ()))
    for opt in options:
        cmd += ["--engine-option", opt]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()
    m = READY.match(line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, m.group(1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def robot_images(profile) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {c.name: rng.integers(0, 255, (c.height, c.width, 3), dtype=np.uint8) for c in profile.cameras}


def model_own_speed(args: argparse.Namespace, batches: list[int], repeats: int = 5) -> dict[int, float]:
    """Seconds per batch of preprocess + reason + act, on this thread, the way a plain loop runs the model."""
    from chatvla.engines.base import ActItem, EngineObservation, ReasonItem
    from chatvla.engines.loader import load_engine

    engine = load_engine(args.model, args.engine)
    p = engine.info.profile
    images = robot_images(p)
    state = np.zeros(p.state_dim, np.float32)
    out = {}
    for b in batches:
        obs = [EngineObservation(images=images, state=state, instruction=f"pick up block {i}") for i in range(b)]

        def once(rep: int, obs=obs) -> float:
            t0 = time.perf_counter()
            rs = engine.reason_batch([ReasonItem(engine.preprocess(o)) for o in obs])
            engine.act_batch([ActItem(r, state, seed=rep * 100 + i + 1) for i, r in enumerate(rs)])
            return time.perf_counter() - t0

        once(0)  # warm-up
        out[b] = median([once(rep + 1) for rep in range(repeats)])
        print(f"  model's own speed, batch {b}: {out[b] * 1e3:.1f} ms per batch", file=sys.stderr)
    engine.close()
    return out


def observation_factory(info: pb.ModelInfo):
    images = [encode_image(img, name) for name, img in robot_images(info.profile).items()]
    state = tensor_to_proto(np.zeros(info.profile.state_dim, np.float32))

    def make(seq: int) -> pb.StreamRequest:
        return pb.StreamRequest(observation=pb.Observation(seq=seq, tick=seq, images=images, state=state, seed=seq))

    return make


async def robot(stub: pb_grpc.PolicyStub, info: pb.ModelInfo, n_obs: int, warmup: int, i: int) -> list[dict]:
    make = observation_factory(info)
    call = stub.Stream()
    await call.write(pb.StreamRequest(start=pb.SessionStart(
        robot_profile=info.profile.name, instruction=f"pick up block {i}", robot_id=f"bench-{i}")))
    await call.read()
    out = []
    for seq in range(1, warmup + n_obs + 1):
        t0 = time.perf_counter()
        await call.write(make(seq))
        resp = await call.read()
        latency = (time.perf_counter() - t0) * 1e3
        if resp.WhichOneof("msg") != "chunk":
            raise RuntimeError(f"session {i} seq {seq}: {resp}")
        if seq > warmup:
            t = resp.chunk.timings
            out.append({"latency_ms": latency, "compute_ms": t.preprocess_ms + t.reasoning_ms + t.expert_ms,
                        "queue_ms": t.queue_ms, "batch": t.reasoning_batch_size, "end": time.perf_counter()})
    await call.done_writing()
    return out


async def run_load(address: str, sessions: int, n_obs: int, warmup: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.PolicyStub(ch)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        t0 = time.perf_counter()
        per = await asyncio.gather(*(robot(stub, info, n_obs, warmup, i) for i in range(sessions)))
    samples = [s for p in per for s in p]
    # `wall` runs from before the sessions open to the last chunk, so it covers every session's warmup
    # chunks too: sessions * (warmup + n_obs) chunks were delivered in it, not just the len(samples) ==
    # sessions * n_obs measured ones. Throughput is therefore all delivered chunks over the wall.
    wall = max(s["end"] for s in samples) - t0
    delivered = len(samples) + sessions * warmup
    lat = [s["latency_ms"] for s in samples]
    return {
        "sessions": sessions, "chunks": len(samples),
        "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
        "chunks_per_s": delivered / wall,
        "compute_ms": median([s["compute_ms"] for s in samples]),
        "overhead_ms": median([s["latency_ms"] - s["compute_ms"] for s in samples]),
        "queue_ms": median([s["queue_ms"] for s in samples]),
        "batch": float(np.mean([s["batch"] for s in samples])),
        "model": f"{info.engine}:{info.model_id}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="torch", choices=["torch", "null", "vllm"])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--engine-option", action="append", metavar="KEY=VALUE",
                    help=f"passed to the server (null default: {' '.join(NULL_DEFAULTS)})")
    ap.add_argument("--sessions", default="1,4,16")
    ap.add_argument("--observations", type=int, default=20, help="measured observations per session")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured observations per session first")
    ap.add_argument("--max-batch", type=int, default=16, help="max batch of the 'batching on' mode")
    args = ap.parse_args()
    counts = [int(x) for x in args.sessions.split(",")]
    own = model_own_speed(args, sorted({1, max(counts)})) if args.engine != "null" else {}
    rows = []
    for mode, max_batch in (("batching", args.max_batch), ("no batching", 1)):
        proc, address = start_server(args, max_batch)
        try:
            for n in counts:
                row = {"mode": mode, "max_batch": max_batch, **asyncio.run(run_load(address, n, args.observations,
                                                                                     args.warmup))}
                rows.append(row)
                print(f"  {mode:12s} sessions={n:3d}  p50={row['p50_ms']:.1f} ms  {row['chunks_per_s']:.1f} chunks/s",
                      file=sys.stderr)
        finally:
            stop_server(proc)
    cols = ["mode", "sessions", "p50_ms", "p99_ms", "chunks_per_s", "compute_ms", "overhead_ms", "queue_ms", "batch"]
    print(table(rows, cols))
    ratios: dict[str, Any] = {}
    if own:
        top, one = max(counts), 1
        served = next(r for r in rows if r["mode"] == "batching" and r["sessions"] == top)
        ratios = {
            "model_own_batch_s": {str(b): s for b, s in own.items()},
            f"model_own_chunks_per_s_batch{top}": top / own[top],
            f"served_over_own_throughput_{top}_sessions": served["chunks_per_s"] / (top / own[top]),
        }
        if one in own and any(r["sessions"] == one for r in rows):
            single = next(r for r in rows if r["mode"] == "batching" and r["sessions"] == one)
            ratios["served_over_own_latency_1_session"] = single["p50_ms"] / (own[one] * 1e3)
        for k, v in ratios.items():
            if not isinstance(v, dict):
                print(f"{k}: {v:.3f}")
    path = write_result("serving", {
        "engine": args.engine, "model": args.model, "observations_per_session": args.observations,
        "engine_options": args.engine_option or (list(NULL_DEFAULTS) if args.engine == "null" else []),
        "rows": rows, **ratios,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
