"""Fixtures of the openpi endpoint tests; helpers live in openpikit.py beside this file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from openpikit import start

from chatvla.server.app import ServerApp


@pytest.fixture
async def openpi_server() -> AsyncIterator[Callable[..., object]]:
    """`await openpi_server(engine=..., **settings)` -> a started ServerApp with the openpi port on."""
    apps: list[ServerApp] = []

    async def _start(engine=None, **kw: object) -> ServerApp:
        app = await start(engine, **kw)
        apps.append(app)
        return app

    yield _start
    for app in apps:
        await app.shutdown()
