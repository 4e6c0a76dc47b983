"""The openpi side of benchmarks/transport.py and tests/server/openpi: runs in the isolated `.venv-openpi`
(openpi-client 0.1.2, numpy<2), so it imports nothing from chatvla.

    .venv-openpi/bin/python benchmarks/openpi_side.py ref-server [--port 0] [--horizon 50 --dim 14]
    .venv-openpi/bin/python benchmarks/openpi_side.py client --url ws://127.0.0.1:PORT [--n 300 --warmup 30]
                                                             [--jpeg DIR] [--cameras a,b,c] [--api-key KEY]

`ref-server` is a minimal openpi-protocol server written from the description of openpi's
`websocket_policy_server.py` (not its code): it greets with the metadata frame, then answers each
observation with a null policy's actions plus `policy_timing`/`server_timing`, on the event loop, with
openpi_client's own msgpack-numpy codec; errors go back as a text frame and a 1011 close; `GET /healthz`
answers 200. It prints `ref-server ready port=N` and serves until stdin closes or SIGTERM.

`client` drives an openpi endpoint with the real `openpi_client.websocket_client_policy.WebsocketClientPolicy`
and prints one JSON line: metadata, the last response's keys and timings, and the round trips in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np


# --- the reference server --------------------------------------------------------------------------------
class NullPolicy:
    """openpi's BasePolicy shape: infer(obs) -> dict of outputs."""

    def __init__(self, horizon: int, dim: int) -> None:
        self.actions = np.zeros((horizon, dim), np.float32)

    def infer(self, obs: dict) -> dict:
        t0 = time.monotonic()
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        if obs.get("fail"):
            raise ValueError("boom")
        return {"actions": self.actions.copy(), "policy_timing": {"infer_ms": (time.monotonic() - t0) * 1e3}}


async def ref_server(port: int, horizon: int, dim: int) -> None:
    from openpi_client import msgpack_numpy
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import CloseCode

    policy = NullPolicy(horizon, dim)
    metadata = {"server": "openpi-reference", "action_horizon": horizon}

    def health(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def handler(ws) -> None:
        packer = msgpack_numpy.Packer()
        await ws.send(packer.pack(metadata))
        previous_ms = None
        while True:
            try:
                start = time.monotonic()
                obs = msgpack_numpy.unpackb(await ws.recv())
                t_infer = time.monotonic()
                out = policy.infer(obs)
                timing = {"infer_ms": (time.monotonic() - t_infer) * 1e3}
                if previous_ms is not None:
                    timing["prev_total_ms"] = previous_ms
                out["server_timing"] = timing
                await ws.send(packer.pack(out))
                previous_ms = (time.monotonic() - start) * 1e3
            except ConnectionClosed:
                return
            except Exception:
                await ws.send(traceback.format_exc())
                await ws.close(CloseCode.INTERNAL_ERROR, "Internal server error. Traceback included in previous frame.")
                return

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None, process_request=health) as srv:
        bound = next(iter(srv.sockets)).getsockname()[1]
        print(f"ref-server ready port={bound}", flush=True)
        await stop.wait()


# --- the client ---------------------------------------------------------------------------------------------
def client(args: argparse.Namespace) -> int:
    from openpi_client import websocket_client_policy

    rng = np.random.default_rng(0)
    if args.style == "droid":
        cameras = ["observation/exterior_image_1_left", "observation/wrist_image_left"]
    else:
        cameras = ["cam_high", "cam_left_wrist", "cam_right_wrist"] + (["cam_low"] if args.cam_low else [])
    if args.jpeg:  # pre-encoded JPEG files (the same bytes every transport of the benchmark sends)
        files = sorted(Path(args.jpeg).glob("*.jpg"))
        images = {c: files[i % len(files)].read_bytes() for i, c in enumerate(cameras)}
    else:
        shape = (3, args.size, args.size) if args.chw else (args.size, args.size, 3)
        images = {c: rng.integers(0, 255, shape, dtype=np.uint8) for c in cameras}
    policy = websocket_client_policy.WebsocketClientPolicy(args.url, api_key=args.api_key)
    meta = policy.get_server_metadata()

    def obs() -> dict:
        if args.style == "droid":
            return {
                **images,
                "observation/joint_position": np.linspace(-0.3, 0.3, 7),  # float64, as DROID's env gives it
                "observation/gripper_position": np.array([0.04]),
                "prompt": args.prompt,
            }
        return {"state": np.linspace(-0.5, 0.5, 14).astype(np.float32), "images": dict(images), "prompt": args.prompt}

    result: dict = {"metadata": meta}
    latencies, server_ms = [], []
    try:
        for i in range(args.warmup + args.n):
            t0 = time.perf_counter()
            reply = policy.infer(obs())
            dt = (time.perf_counter() - t0) * 1e3
            if i >= args.warmup:
                latencies.append(dt)
                st = reply.get("server_timing") or {}
                server_ms.append(st.get("total_ms", st.get("infer_ms", 0.0)))  # ours: total_ms; openpi: infer_ms
        a = reply["actions"]
        result.update({
            "keys": sorted(reply), "actions_shape": list(a.shape), "actions_dtype": str(a.dtype),
            "actions_writeable": bool(a.flags.writeable), "server_timing": reply.get("server_timing"),
            "policy_timing": reply.get("policy_timing"), "reasoning": reply.get("reasoning"),
            "latencies_ms": latencies, "server_ms": server_ms,
        })
        if args.then_fail:
            try:
                policy.infer({"fail": True, "prompt": 7, "state": np.zeros(3, np.float32)})
                result["error"] = None
            except RuntimeError as e:
                result["error"] = str(e)
    finally:
        policy._ws.close()
    print(json.dumps(result, default=str), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("ref-server")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--horizon", type=int, default=50)
    s.add_argument("--dim", type=int, default=14)
    c = sub.add_parser("client")
    c.add_argument("--url", required=True)
    c.add_argument("--n", type=int, default=10)
    c.add_argument("--warmup", type=int, default=0)
    c.add_argument("--style", choices=["aloha", "droid"], default="aloha", help="openpi observation keys")
    c.add_argument("--chw", action="store_true", help="ALOHA images as 3xHxW (what openpi's ALOHA client sends)")
    c.add_argument("--cam-low", action="store_true", help="also send images/cam_low (ALOHA's fourth camera)")
    c.add_argument("--size", type=int, default=224)
    c.add_argument("--prompt", default="fold the towel")
    c.add_argument("--jpeg", default=None, help="directory with <camera>.jpg files to send instead of pixels")
    c.add_argument("--api-key", default=None)
    c.add_argument("--then-fail", action="store_true", help="finally send a bad observation; report the error")
    args = ap.parse_args()
    if args.role == "ref-server":
        asyncio.run(ref_server(args.port, args.horizon, args.dim))
        return 0
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
