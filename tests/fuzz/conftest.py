"""Fixtures of the fuzz tests: in-process servers as in tests/server (serverkit), the budget in fuzzkit.py."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "server"))

from serverkit import Running, settings

from chatvla.engines.null import NullEngine
from chatvla.server.app import ServerApp


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    """`await serve(**settings)` -> Running (NullEngine); everything is shut down after the test."""
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
