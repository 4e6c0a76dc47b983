"""Helpers for the serving-core tests: in-process servers on OS-chosen loopback ports, a NullEngine
that tests can hold mid-batch (to create queueing deterministically, without sleeps), and message
builders. (A uniquely named module, not conftest: pytest runs in importlib mode.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import httpx
import numpy as np
import pytest

from chatvla.engines.base import ReasoningResult, ReasonItem
from chatvla.engines.null import NullEngine
from chatvla.profiles import FRANKA_JOINT
from chatvla.server.app import ServerApp
from chatvla.server.settings import ServerSettings
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import encode_image, tensor_to_proto

PROFILE = FRANKA_JOINT
CAMERAS = PROFILE.camera_names


class GatedEngine(NullEngine):
    """A NullEngine whose reasoning batches wait at a gate until the test opens it."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def warmup(self) -> None:
        super().warmup()
        self.entered = threading.Semaphore(0)  # count only the test's own batches

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def reason_batch(self, items: Sequence[ReasonItem], yield_point=None) -> list[ReasoningResult]:
        self.entered.release()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        return super().reason_batch(items, yield_point)

    async def wait_entered(self, timeout: float = 10.0) -> None:
        """Until a reasoning batch is inside the engine (holding the compute thread)."""
        ok = await asyncio.to_thread(self.entered.acquire, True, timeout)
        assert ok, "no reasoning batch reached the engine"


def settings(**kw: object) -> ServerSettings:
    base: dict[str, object] = {"engine": "null", "model": "test", "grpc_port": 0, "http_port": 0,
                               "max_wait_ms": 2.0, "drain_timeout_s": 5.0}
    base.update(kw)
    return ServerSettings(**base)


def image(value: int = 100, h: int = 32, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def state_vec(offset: float = 0.0) -> np.ndarray:
    return (np.asarray(PROFILE.home, np.float32) + np.float32(offset)).clip(
        np.asarray(PROFILE.action_lower, np.float32), np.asarray(PROFILE.action_upper, np.float32)
    )


def observation(seq: int, tick: int | None = None, *, seed: int = 7, cameras: Sequence[str] = CAMERAS,
                **kw: object) -> pb.Observation:
    return pb.Observation(
        seq=seq, tick=seq * 10 if tick is None else tick, seed=seed,
        images=[encode_image(image(), c) for c in cameras], state=tensor_to_proto(state_vec()), **kw,
    )


def start(instruction: str = "pick up the red block", **kw: object) -> pb.StreamRequest:
    return pb.StreamRequest(start=pb.SessionStart(robot_profile=PROFILE.name, instruction=instruction, **kw))


def obs_req(seq: int, **kw: object) -> pb.StreamRequest:
    return pb.StreamRequest(observation=observation(seq, **kw))


def infer_request(**kw: object) -> pb.InferRequest:
    base: dict[str, object] = {
        "images": [encode_image(image(), CAMERAS[0])], "state": tensor_to_proto(state_vec()),
        "instruction": "pick up the red block", "seed": 3,
    }
    base.update(kw)
    return pb.InferRequest(**base)


class Running:
    """A started in-process server plus clients for it."""

    def __init__(self, app: ServerApp, engine: NullEngine) -> None:
        self.app = app
        self.engine = engine
        self.channel = grpc.aio.insecure_channel(app.grpc_address)
        self.stub = pb_grpc.PolicyStub(self.channel)
        self.http = httpx.AsyncClient(base_url=app.http_url, timeout=30)

    @property
    def metrics(self):
        return self.app.metrics

    def sample(self, name: str, **labels: str) -> float:
        v = self.app.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    async def open_stream(self, **start_kw: object) -> tuple[grpc.aio.StreamStreamCall, pb.SessionInfo]:
        call = self.stub.Stream()
        await call.write(start(**start_kw))
        first = await call.read()
        assert first.WhichOneof("msg") == "session", first
        return call, first.session

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()


async def eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond` (a state the test waits for, not a speed) until true."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    """`await serve(engine=..., **settings)` -> Running; everything is shut down after the test.
    Conftests that need it import it from here (pytest collects fixtures imported into a conftest)."""
    running: list[Running] = []

    async def _serve(engine: NullEngine | None = None, **kw: object) -> Running:
        engine = engine or NullEngine()
        app = ServerApp(settings(**kw), engine=engine)
        await app.start()
        r = Running(app, engine)
        running.append(r)
        return r

    yield _serve
    for r in running:
        await r.close()
        await r.app.shutdown()
