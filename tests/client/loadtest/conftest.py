"""Fixtures of the load-test tests: an in-process server with the null engine (simulated compute)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from chatvla.engines.base import EngineObservation
from chatvla.engines.null import NullEngine
from chatvla.server.app import ServerApp
from chatvla.server.settings import ServerSettings


class StateRecordingEngine(NullEngine):
    """Remembers the state of every observation it preprocessed (to check what was replayed)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.states: list[np.ndarray] = []

    def warmup(self) -> None:
        super().warmup()
        self.states.clear()

    def preprocess(self, obs: EngineObservation):  # type: ignore[no-untyped-def]
        self.states.append(np.array(obs.state, copy=True))
        return super().preprocess(obs)


@pytest.fixture
async def null_server() -> AsyncIterator[Callable[..., object]]:
    apps: list[ServerApp] = []

    async def _start(profile: str = "franka_joint", **kw: object) -> ServerApp:
        engine = StateRecordingEngine(profile=profile, reason_ms=2.0, act_ms=1.0)
        base: dict[str, object] = {"engine": "null", "model": "test", "grpc_port": 0, "http_port": 0,
                                   "max_wait_ms": 2.0, "drain_timeout_s": 5.0}
        base.update(kw)
        app = ServerApp(ServerSettings(**base), engine=engine)
        await app.start()
        apps.append(app)
        return app

    yield _start
    for app in apps:
        await app.shutdown()
