"""Cost of decoding and validating one observation on the server, without any transport or pipeline.

    python benchmarks/decode.py [--n 3000] [--warmup 300] [--malloc pinned,mmap]

Payload: the transport benchmark's observation (arx_r5_bimanual: 3 cameras of 224x224x3 uint8 sent as
RGB8, a 14-d float32 state, an instruction). Each row calls the real validation entry point the gRPC
transport runs for every request, `--n` times after `--warmup` calls, each call timed on its own:

  stream        `observation_from_proto` on an already-parsed `Observation` (what `Policy.Stream` runs)
  infer         `infer_from_proto` on an already-parsed `InferRequest` (what `Policy.Infer` runs)
  parse         `StreamRequest.FromString` alone: the protobuf deserialisation gRPC does before us
  parse+stream  both, i.e. everything from the received bytes to a validated `ValidatedObservation`

Every read of a protobuf `bytes` field allocates a new 147 KiB buffer per image, so the figures depend on
glibc's allocator far more than on the code around it. Each regime runs in its own process:

  pinned  MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 256 MiB: buffers are reused from the heap,
          no page faults (what a pinned allocator gives, and what glibc's adaptive threshold gives once
          the process happens to have freed a big enough block)
  mmap    MALLOC_MMAP_THRESHOLD_=131072: every image-sized buffer is a fresh mmap, page-faulted in and
          unmapped again (glibc's default before its threshold adapts)

glibc's unpinned default lands in either regime, or in between (heap trimming), depending on what the
process allocated before, so it is not a row of its own. `image_copied` says whether a decoded image owns
its pixels (a copy) or is a view of the bytes the field access returned.
Prints a table and writes benchmarks/results/decode.json. Figures in microseconds per observation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, table, write_result

from chatvla.profiles import get_profile
from chatvla.server.validation import InputSpec, infer_from_proto, observation_from_proto
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import Limits, encode_image, tensor_to_proto

PROFILE = "arx_r5_bimanual"
INSTRUCTION = "pick up the red cube and place it in the bowl"
REGIMES = {
    "pinned": {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)},
    "mmap": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
}


def _time(fn: Callable[[], Any], n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    us = []
    for _ in range(n):
        t0 = clock()
        fn()
        us.append((clock() - t0) / 1e3)
    return {
        "median_us": round(percentile(us, 50), 1),
        "p90_us": round(percentile(us, 90), 1),
        "mean_us": round(sum(us) / len(us), 1),
        "min_us": round(min(us), 1),
    }


def measure(n: int, warmup: int) -> dict[str, Any]:
    """Time every row in this process (the allocator regime is whatever its environment set)."""
    profile = get_profile(PROFILE)
    spec = InputSpec(profile=profile, limits=Limits())
    rng = np.random.default_rng(0)
    images = [
        encode_image(rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8), c.name, "rgb8")
        for c in profile.cameras
    ]
    state = tensor_to_proto(rng.uniform(-1, 1, profile.state_dim).astype(np.float32))
    obs = pb.Observation(seq=1, tick=1, images=images, state=state, instruction=INSTRUCTION)
    infer = pb.InferRequest(images=images, state=state, instruction=INSTRUCTION)
    raw = pb.StreamRequest(observation=obs).SerializeToString()
    cameras = profile.camera_names

    def stream() -> Any:
        return observation_from_proto(obs, spec, cameras, INSTRUCTION)

    def parse_stream() -> Any:
        return observation_from_proto(pb.StreamRequest.FromString(raw).observation, spec, cameras, INSTRUCTION)

    image_copied = bool(stream().obs.images[cameras[0]].flags.owndata)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("stream", stream),
        ("infer", lambda: infer_from_proto(infer, spec)),
        ("parse", lambda: pb.StreamRequest.FromString(raw)),
        ("parse+stream", parse_stream),
    ]
    return {
        "cameras": len(images),
        "image_shape": [images[0].height, images[0].width, 3],
        "state_dim": profile.state_dim,
        "message_bytes": len(raw),
        "image_copied": image_copied,
        "rows": [{"row": name, **_time(fn, n, warmup)} for name, fn in cases],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="timed calls per row")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--malloc", default="pinned,mmap", help=f"allocator regimes, of {', '.join(REGIMES)}")
    ap.add_argument("--out", default="decode")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one regime, in the environment the parent set; JSON on stdout
        print(json.dumps(measure(args.n, args.warmup)))
        return 0

    regimes = [r.strip() for r in args.malloc.split(",") if r.strip()]
    unknown = sorted(set(regimes) - set(REGIMES))
    if unknown:
        ap.error(f"unknown --malloc regime {unknown[0]!r}; use {', '.join(REGIMES)}")
    rows, facts = [], {}
    for regime in regimes:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | REGIMES[regime]
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--n", str(args.n), "--warmup", str(args.warmup)],
            env=env, check=True, capture_output=True, text=True,
        )
        facts = json.loads(out.stdout)
        rows += [{"malloc": regime, **r} for r in facts.pop("rows")]
        print(f"{regime}: done", file=sys.stderr)

    print(f"{PROFILE}: {facts['cameras']} x {facts['image_shape'][0]}x{facts['image_shape'][1]} RGB8 + "
          f"{facts['state_dim']}-d state, {facts['message_bytes']} message bytes; {args.n} calls per row; "
          f"decoded image copied: {facts['image_copied']}")
    print(table(rows))
    path = write_result(args.out, {
        "profile": PROFILE, **facts, "n": args.n, "warmup": args.warmup,
        "malloc": {r: REGIMES[r] for r in regimes}, "rows": rows,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
