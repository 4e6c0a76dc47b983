"""Transport overhead: one ALOHA-like observation -> one chunk, round trips on loopback, per transport.

    bash scripts/setup_openpi_venv.sh          # once: openpi-client 0.1.2 in .venv-openpi
    python benchmarks/transport.py [--n 300] [--warmup 30] [--only ours_stream,...]

Payload: 3 cameras of 224x224x3 uint8 + a 14-d float32 state -> a 50x14 float32 chunk (the
arx_r5_bimanual profile), first as raw pixels, then with the images JPEG-encoded (quality 90, encoded
once before timing: every transport sends the very same JPEG bytes). Each transport runs a closed loop
from one client (send, wait for the reply, repeat) after a warm-up; servers and clients are separate
processes, so client and server do not share a GIL.

Rows:
  ours_stream   our gRPC `Policy.Stream` (sync grpc client, one observation in flight)
  ours_infer    our gRPC unary `Policy.Infer`
  ours_openpi   our openpi endpoint (`--openpi-port`), driven by the real openpi-client
  ref_openpi    a minimal reference openpi server (benchmarks/openpi_side.py; behaves like openpi's
                websocket_policy_server.py), driven by the same openpi-client
  bare_grpc     the floor: a generic bytes->bytes grpc.aio unary handler that receives the same bytes
                as `ours_infer` and returns a pre-serialized chunk (no parsing, no pipeline)
  pipeline_only no transport at all: our `Scheduler.infer` in-process on an already-decoded observation,
                i.e. what the serving pipeline itself adds to any transport (thread handoffs, checks)

All servers use a null policy. Ours is `NullEngine` with no simulated compute whose preprocess does not
read pixels (`FlatNull` below): the server still decodes and validates every field (JPEG decoding
included), runs the two batching stages and checks the chunk, which is the overhead being measured.
The reference's null policy returns zeros without looking at the observation (in the JPEG rows it does
not decode the images; ours does). Prints a table and writes benchmarks/results/transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, table, write_result

ROOT = Path(__file__).resolve().parents[1]
OPENPI_SIDE = Path(__file__).resolve().parent / "openpi_side.py"
PROFILE = "arx_r5_bimanual"
OPENPI_CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")  # -> cam_top, cam_left_wrist, cam_right_wrist
BARE_METHOD = "/bench.Bare/Echo"
READY = re.compile(r"grpc=(\S+) http=(\S+) openpi=(\S+)")


# --- server roles (run as subprocesses of the benchmark) ------------------------------------------------------
def flat_null():
    """NullEngine without the per-image mean in preprocess: a null policy that ignores pixels."""
    from chatvla.engines.null import NullEngine, NullPrepared

    class FlatNull(NullEngine):
        def preprocess(self, obs):  # type: ignore[no-untyped-def]
            return NullPrepared(obs.instruction, np.asarray(obs.state, dtype=np.float32), ())

    return FlatNull(profile=PROFILE)


def serve_ours() -> int:
    from chatvla.server.app import ServerApp
    from chatvla.server.settings import ServerSettings

    async def main() -> None:
        settings = ServerSettings(
            engine="null", model="null", grpc_port=0, http_port=0, openpi_port=0, log_level="warning",
            deadline_ms=60_000,
        )
        app = ServerApp(settings, engine=flat_null())
        await app.start()
        print(app.ready_line(), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await app.shutdown()

    asyncio.run(main())
    return 0


def serve_bare(response_size: int) -> int:
    reply = bytes(response_size)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        methods = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        handler = grpc.method_handlers_generic_handler("bench.Bare", methods)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"bare ready port={port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())
    return 0


# --- payloads ---------------------------------------------------------------------------------------------------
def make_images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Camera-like images (smooth gradients plus noise), so JPEG sizes are realistic, not noise-sized."""
    from chatvla.profiles import get_profile

    out = {}
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32)
    for i, cam in enumerate(get_profile(PROFILE).camera_names):
        base = np.stack([(xx + 40 * i) % 256, (yy * 0.8 + 30 * i) % 256, ((xx + yy) * 0.5) % 256], axis=-1)
        out[cam] = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return out


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def infer_request(images: dict[str, np.ndarray], jpegs: dict[str, bytes] | None, state: np.ndarray):
    from chatvla.v1 import policy_pb2 as pb
    from chatvla.wire import encode_image, tensor_to_proto

    if jpegs is None:
        imgs = [encode_image(a, cam) for cam, a in images.items()]
    else:
        imgs = [pb.Image(camera=cam, encoding=pb.JPEG, height=224, width=224, data=jpegs[cam]) for cam in images]
    return imgs, tensor_to_proto(state)


# --- clients ----------------------------------------------------------------------------------------------------
Samples = list[tuple[float, float]]  # (client round trip ms, server-reported ms from receipt to reply ready)


def timed(fn, n: int, warmup: int) -> Samples:
    """`fn()` returns the server-reported time of its call (0 where the server reports none)."""
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        server_ms = fn()
        if i >= warmup:
            out.append(((time.perf_counter() - t0) * 1e3, float(server_ms)))
    return out


def run_infer(address: str, images, jpegs, state, n: int, warmup: int) -> Samples:
    from chatvla.v1 import policy_pb2 as pb
    from chatvla.v1 import policy_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.PolicyStub(ch)

        def once() -> float:
            imgs, st = infer_request(images, jpegs, state)  # built per call, as a client would
            resp = stub.Infer(pb.InferRequest(images=imgs, state=st, instruction="fold the towel", seed=1))
            assert resp.chunk.actions.shape == [50, 14], resp.chunk.actions.shape
            return resp.chunk.timings.total_ms

        return timed(once, n, warmup)


def run_stream(address: str, images, jpegs, state, n: int, warmup: int) -> Samples:
    from chatvla.v1 import policy_pb2 as pb
    from chatvla.v1 import policy_pb2_grpc as pb_grpc

    requests: queue.Queue = queue.Queue()

    def feed():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.PolicyStub(ch)
        requests.put(pb.StreamRequest(start=pb.SessionStart(robot_profile=PROFILE, instruction="fold the towel")))
        responses = stub.Stream(feed())
        first = next(responses)
        assert first.WhichOneof("msg") == "session", first
        seq = [0]

        def once() -> float:
            seq[0] += 1
            imgs, st = infer_request(images, jpegs, state)
            requests.put(pb.StreamRequest(observation=pb.Observation(
                seq=seq[0], tick=seq[0], images=imgs, state=st, seed=1)))
            resp = next(responses)
            assert resp.WhichOneof("msg") == "chunk", resp
            return resp.chunk.timings.total_ms

        try:
            return timed(once, n, warmup)
        finally:
            requests.put(None)
            responses.cancel()


def run_bare(port: int, images, jpegs, state, n: int, warmup: int) -> Samples:
    from chatvla.v1 import policy_pb2 as pb

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(BARE_METHOD)  # no serializers: bytes in, bytes out

        def once() -> float:
            imgs, st = infer_request(images, jpegs, state)
            payload = pb.InferRequest(images=imgs, state=st, instruction="fold the towel", seed=1).SerializeToString()
            assert len(call(payload)) > 0
            return 0.0

        return timed(once, n, warmup)


def run_pipeline_only(images, state, n: int, warmup: int) -> Samples:
    """No transport: `Scheduler.infer` in this process with an already-decoded observation (the scheduler's
    own cost: admission, the hand-off to the compute thread and back, null compute, chunk checks)."""
    from chatvla.engines.base import EngineObservation
    from chatvla.server.app import scheduler_config
    from chatvla.server.messages import ValidatedObservation
    from chatvla.server.metrics import Metrics
    from chatvla.server.scheduler import Scheduler
    from chatvla.server.settings import ServerSettings

    req = ValidatedObservation(obs=EngineObservation(images=images, state=state, instruction="fold the towel"), seed=1)

    async def main() -> Samples:
        pipeline = Scheduler(flat_null(), scheduler_config(ServerSettings(engine="null")), Metrics())
        await pipeline.start()
        out = []
        try:
            for i in range(warmup + n):
                t0 = time.perf_counter()
                result = await pipeline.infer(lambda: req, "bench")
                if i >= warmup:
                    out.append(((time.perf_counter() - t0) * 1e3, result.timings.total_ms))
        finally:
            await pipeline.close()
        return out

    return asyncio.run(main())


def run_openpi_client(python: Path, url: str, jpeg_dir: str | None, n: int, warmup: int) -> Samples:
    cmd = [str(python), str(OPENPI_SIDE), "client", "--url", url, "--n", str(n), "--warmup", str(warmup)]
    if jpeg_dir:
        cmd += ["--jpeg", jpeg_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"openpi client failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["actions_shape"] == [50, 14], result
    return list(zip(result["latencies_ms"], result["server_ms"]))


# --- orchestration -------------------------------------------------------------------------------------------
def launch(cmd: list[str], pattern: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, re.Match]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    found: list[re.Match] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            m = re.search(pattern, line)
            if m:
                found.append(m)
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(120)
    if not found:
        proc.kill()
        raise SystemExit(f"{cmd[1:3]} did not start")
    return proc, found[0]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(name: str, encoding: str, samples: Samples, payload_bytes: int) -> dict[str, Any]:
    lat = [a for a, _ in samples]
    return {
        "transport": name, "images": encoding, "n": len(lat), "request_kib": round(payload_bytes / 1024, 1),
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
        "mean_ms": float(np.mean(lat)) if lat else float("nan"),
        # Where the time goes: the server's own receipt-to-reply time, and the rest (client encode/decode,
        # framing, the kernel, event-loop scheduling on both ends).
        "server_p50_ms": percentile([s for _, s in samples], 50),
        "outside_p50_ms": percentile([a - s for a, s in samples], 50),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="measured round trips per transport and encoding")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured round trips per connection")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (n is split over them)")
    ap.add_argument("--openpi-python", type=Path, default=ROOT / ".venv-openpi" / "bin" / "python")
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--encodings", default="rgb8,jpeg")
    ap.add_argument("--role", choices=["ours-server", "bare-server"], help=argparse.SUPPRESS)
    ap.add_argument("--response-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "ours-server":
        return serve_ours()
    if args.role == "bare-server":
        return serve_bare(args.response_size)

    from chatvla.v1 import policy_pb2 as pb

    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731
    have_openpi = args.openpi_python.exists()
    if not have_openpi:
        print(f"note: {args.openpi_python} missing (bash scripts/setup_openpi_venv.sh); openpi rows skipped",
              file=sys.stderr)

    rng = np.random.default_rng(0)
    images = make_images(rng)
    state = np.linspace(-0.5, 0.5, 14).astype(np.float32)
    jpegs = {cam: jpeg_bytes(a) for cam, a in images.items()}
    response = pb.InferResponse(chunk=pb.ActionChunk(seq=1, tick=1)).SerializeToString()
    chunk_bytes = 50 * 14 * 4 + 150 + len(response)  # actions + timings/reasoning, roughly what ours returns

    me = [sys.executable, str(Path(__file__).resolve())]
    ours, m = launch([*me, "--role", "ours-server"], READY.pattern)
    grpc_addr, openpi_url = m.group(1), m.group(3)
    bare, mb = launch([*me, "--role", "bare-server", "--response-size", str(chunk_bytes)], r"port=(\d+)")
    ref = None
    if have_openpi:
        ref, mr = launch([str(args.openpi_python), str(OPENPI_SIDE), "ref-server"], r"port=(\d+)")
    names = ["bare_grpc", "pipeline_only", "ours_stream", "ours_infer"]
    names += ["ours_openpi", "ref_openpi"] if have_openpi else []
    names = [n for n in names if want(n)]
    encodings = args.encodings.split(",")
    samples: dict[tuple[str, str], Samples] = {(n, e): [] for n in names for e in encodings}
    sizes: dict[str, int] = {}
    tmp = tempfile.TemporaryDirectory()

    def run(name: str, encoding: str, n: int, w: int) -> Samples:
        jp = jpegs if encoding == "jpeg" else None
        if name == "bare_grpc":
            return run_bare(int(mb.group(1)), images, jp, state, n, w)
        if name == "pipeline_only":
            return run_pipeline_only(images, state, n, w)
        if name == "ours_stream":
            return run_stream(grpc_addr, images, jp, state, n, w)
        if name == "ours_infer":
            return run_infer(grpc_addr, images, jp, state, n, w)
        url = openpi_url if name == "ours_openpi" else f"ws://127.0.0.1:{mr.group(1)}"
        return run_openpi_client(args.openpi_python, url, tmp.name if jp else None, n, w)

    try:
        for cam, data in jpegs.items():
            Path(tmp.name, f"{cam}.jpg").write_bytes(data)
        for encoding in encodings:
            imgs, st = infer_request(images, jpegs if encoding == "jpeg" else None, state)
            request = pb.InferRequest(images=imgs, state=st, instruction="fold the towel")
            sizes[encoding] = len(request.SerializeToString())
        # Rounds interleave the transports, so a burst of load from elsewhere on the machine spreads over
        # all rows instead of landing on one.
        per_round = max(1, args.n // args.rounds)
        for r in range(args.rounds):
            for encoding in encodings:
                for name in names:
                    if name == "pipeline_only" and encoding != encodings[0]:
                        continue  # decoded pixels: the encoding does not matter
                    samples[(name, encoding)] += run(name, encoding, per_round, args.warmup)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n}/{e} {percentile([a for a, _ in samples[(n, e)]], 50):.2f}" for e in encodings for n in names
                if samples[(n, e)]), file=sys.stderr)
    finally:
        tmp.cleanup()
        for p in (ours, bare, ref):
            if p is not None:
                stop(p)
    rows = [summary(n, e, samples[(n, e)], sizes[e]) for e in encodings for n in names
            if not (n == "pipeline_only" and e != encodings[0])]

    goal = goal_check(rows)
    print(table(rows, ["transport", "images", "request_kib", "p50_ms", "p90_ms", "p99_ms", "server_p50_ms",
                       "outside_p50_ms", "n"]))
    for line in goal["lines"]:
        print(line)
    path = write_result("transport", {
        "payload": "3 x 224x224x3 uint8 + 14-d float32 state -> 50x14 float32",
        "profile": PROFILE, "n": args.n, "warmup": args.warmup, "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "openpi_client": "openpi-client==0.1.2 (.venv-openpi)" if have_openpi else None,
        "rows": rows, "goal": goal,
    })
    print(f"wrote {path}")
    return 0


def goal_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal: our p50 at most half of the openpi reference, and close to the bare floor."""
    by = {(r["transport"], r["images"]): r["p50_ms"] for r in rows}
    out: dict[str, Any] = {"lines": []}
    for enc in sorted({r["images"] for r in rows}):
        ref, bare = by.get(("ref_openpi", enc)), by.get(("bare_grpc", enc))
        for name in ("ours_stream", "ours_infer", "ours_openpi"):
            ours = by.get((name, enc))
            if ours is None:
                continue
            entry = {"p50_ms": ours}
            if ref:
                entry["vs_ref"] = ours / ref
                entry["half_of_ref"] = ours <= ref / 2
            if bare:
                entry["vs_floor"] = ours / bare
                entry["over_floor_ms"] = ours - bare
            out[f"{name}/{enc}"] = entry
            parts = [f"{name:12s} {enc:5s} p50 {ours:.2f} ms"]
            if ref:
                parts.append(f"{ours / ref:.2f}x ref ({'meets' if ours <= ref / 2 else 'misses'} <= 0.5x)")
            if bare:
                parts.append(f"{ours / bare:.2f}x floor (+{ours - bare:.2f} ms)")
            out["lines"].append("goal: " + ", ".join(parts))
    return out


if __name__ == "__main__":
    sys.exit(main())
