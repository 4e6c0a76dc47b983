"""Helpers for the openpi endpoint tests: an in-process server factory, an engine that records what it
was given, and a small independent openpi-protocol client (websockets + msgpack, written from the
protocol description, not from openpi-client). A uniquely named module: pytest runs in importlib mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from chatvla.engines.base import EngineObservation
from chatvla.engines.null import NullEngine
from chatvla.server.app import ServerApp
from chatvla.server.settings import ServerSettings


class RecordingEngine(NullEngine):
    """A NullEngine that keeps every observation it preprocesses (the mapped images/state/prompt)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.seen: list[EngineObservation] = []

    def warmup(self) -> None:
        super().warmup()
        self.seen.clear()

    def preprocess(self, obs: EngineObservation):  # type: ignore[no-untyped-def]
        self.seen.append(obs)
        return super().preprocess(obs)


class RampEngine(RecordingEngine):
    """Known actions, to check conversions: from the observed state each joint moves RAMP[j] rad per tick
    and the gripper goes to GRIPPER_WIDTH metres."""

    RAMP = np.array([0.01, -0.02, 0.005, 0.0, 0.03, -0.01, 0.02])
    GRIPPER_WIDTH = 0.02

    def actions_for(self, state: np.ndarray, seed: int) -> np.ndarray:
        p = self.info.profile
        ticks = np.arange(1, p.chunk_size + 1, dtype=np.float64)[:, None]
        a = np.empty((p.chunk_size, p.action_dim), np.float32)
        a[:, :7] = np.asarray(state[:7], np.float64) + ticks * self.RAMP
        a[:, 7] = self.GRIPPER_WIDTH
        return a


def settings(**kw: object) -> ServerSettings:
    base: dict[str, object] = {"engine": "null", "model": "test", "grpc_port": 0, "http_port": 0, "openpi_port": 0,
                               "max_wait_ms": 1.0, "drain_timeout_s": 5.0}
    base.update(kw)
    return ServerSettings(**base)


async def start(engine: NullEngine | None = None, **kw: object) -> ServerApp:
    app = ServerApp(settings(**kw), engine=engine or RecordingEngine(profile="arx_r5_bimanual"))
    await app.start()
    return app


def nd(a: np.ndarray) -> dict[bytes, Any]:
    """openpi's ndarray encoding: a map with bytes keys."""
    a = np.ascontiguousarray(a)
    return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str, b"shape": list(a.shape)}


def encode(obj: Any) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return nd(o)
        raise TypeError(type(o))

    return msgpack.packb(obj, use_bin_type=True, default=default)


def decode(data: bytes) -> Any:
    def hook(obj: dict) -> Any:
        if obj.get(b"__ndarray__") is True:
            return np.frombuffer(obj[b"data"], dtype=np.dtype(obj[b"dtype"])).reshape(obj[b"shape"])
        return obj

    return msgpack.unpackb(data, raw=False, object_hook=hook)


def aloha_obs(*, chw: bool = True, prompt: str | None = "fold the shirt", cameras: Sequence[str] = (
        "cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist"), value: int | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    shape = (3, 32, 40) if chw else (32, 40, 3)
    images = {c: (np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 255, shape, np.uint8))
              for c in cameras}
    state = np.linspace(-0.5, 0.5, 14).astype(np.float32)
    state[[6, 13]] = 0.04  # the grippers, in metres: within the profile's range (the server refuses far outside)
    obs: dict[str, Any] = {"state": state, "images": images}
    if prompt is not None:
        obs["prompt"] = prompt
    return obs


def droid_obs(prompt: str = "put the marker in the cup") -> dict[str, Any]:
    rng = np.random.default_rng(2)
    return {
        "observation/exterior_image_1_left": rng.integers(0, 255, (24, 24, 3), np.uint8),
        "observation/wrist_image_left": rng.integers(0, 255, (24, 24, 3), np.uint8),
        "observation/joint_position": np.array([0.1, -0.7, 0.0, -2.3, 0.0, 1.6, 0.8]),  # float64 like DROID
        "observation/gripper_position": np.array([0.25]),  # DROID: 0..1, 1 = closed
        "observation/cartesian_position": np.zeros(6),  # unmapped: ignored
        "prompt": prompt,
    }


async def eventually(cond, timeout: float = 10.0) -> None:
    """Poll `cond` (a state the test waits for, not a speed) until true."""
    import asyncio
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)
