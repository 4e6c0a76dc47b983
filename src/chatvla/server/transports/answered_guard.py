"""Drop a response that uvicorn has already answered for us, instead of a traceback per request.

uvicorn (0.3x, h11 protocol) parses a request's head, starts the app, then parses the body bytes that
arrived with it. If those are malformed (a bad chunk size, bytes after a GET's declared body), it
answers 400 "Invalid HTTP request received." itself and closes the connection, but the app is already
running: when the app then answers without reading the body (a 404, a refusal from the headers), h11
refuses the second response (`LocalProtocolError ... state=MUST_CLOSE`) and uvicorn logs "Exception in
ASGI application" with a traceback. A bare FastAPI app behind uvicorn does the same; anyone who can
reach the port can repeat it (benchmarks/hostile.py found 3 in 10,000 raw-socket inputs).

The client has its answer (the 400) and the connection is closing, so there is nothing left to send:
this middleware swallows that one error, waits for uvicorn to register the disconnect (so it does not
log "returned without completing response" either), and counts the event under the log rule of
`server/log_rate.py` (first and every 1000th). Every other send error passes through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from chatvla.server.log_rate import EveryNthWarning

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("chatvla.server.http")
_DISCONNECT_WAIT_S = 2.0  # uvicorn registers the closed transport on the next loop turns


def _already_answered(exc: BaseException) -> bool:
    """h11's refusal to send a second response on a connection uvicorn answered and is closing."""
    return type(exc).__name__ == "LocalProtocolError" and "MUST_CLOSE" in str(exc)


class AnsweredGuard:
    """ASGI middleware (outermost) around the HTTP app; see the module doc."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._count = EveryNthWarning()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        dropped = False

        async def guarded_send(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            try:
                await send(message)
            except Exception as e:
                if not _already_answered(e):
                    raise
                dropped = True
                record = log.makeRecord(log.name, logging.WARNING, __file__, 0,
                                        "a malformed HTTP request was already answered 400 by the HTTP "
                                        "server; the application's response was dropped", (), None)
                if self._count.filter(record):
                    log.handle(record)
                await _wait_for_disconnect(receive)

        await self.app(scope, receive, guarded_send)


async def _wait_for_disconnect(receive: Receive) -> None:
    """Read until uvicorn reports the disconnect (it then stops expecting a response), bounded."""
    try:
        async with asyncio.timeout(_DISCONNECT_WAIT_S):
            while (await receive()).get("type") != "http.disconnect":
                pass
    except TimeoutError:
        pass
