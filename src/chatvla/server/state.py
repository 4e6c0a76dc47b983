"""What the transports share while the process runs: the pipeline (once loaded), readiness, auth.

The transports start before the model finishes loading so that liveness probes answer during a
long load; until then `require()` refuses work with UNAVAILABLE, and readiness stays off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chatvla.server.auth import TokenStore
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ReasoningPolicy
from chatvla.server.metrics import Metrics
from chatvla.server.scheduler import SESSIONS_LIMIT, Scheduler
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import Limits


@dataclass
class ServerState:
    metrics: Metrics
    limits: Limits
    reasoning: ReasoningPolicy
    tokens: TokenStore | None = None
    pipeline: Scheduler | None = None
    model_info: pb.ModelInfo | None = None
    # Trained or not, and measured figures, from the model's own files (server/card.py); HTTP /v1/model.
    model_card: dict[str, Any] | None = None
    ready: bool = False
    draining: bool = False

    def __post_init__(self) -> None:
        self._readiness_hooks: list[Callable[[bool], Awaitable[None]]] = []

    def require(self) -> Scheduler:
        """The pipeline, or UNAVAILABLE while loading or draining."""
        if self.draining:
            raise ServeError(Code.UNAVAILABLE, "server is draining; reconnect to another replica", reason="draining")
        if self.pipeline is None or not self.ready:
            raise ServeError(Code.UNAVAILABLE, "model is loading", reason="not_ready")
        return self.pipeline

    def refuse(self, transport: str | None, err: ServeError) -> None:
        """The one place every transport counts what it refused before the pipeline answered it, so
        a refusal counts the same whichever door it came through: the outcome under `requests` when an
        observation or call was refused (`transport` names it), nothing there when a session or
        connection was (`transport=None`); the reason under `rejected`, except the sessions limit,
        which the scheduler counts when it refuses the session."""
        if transport is not None:
            self.metrics.requests.labels(transport=transport, outcome=err.outcome).inc()
        if err.reason != SESSIONS_LIMIT:
            self.metrics.rejected.labels(reason=err.reason).inc()

    def robot_for(self, token: str | None) -> str | None:
        return self.tokens.robot_for(token) if self.tokens is not None else None

    def on_readiness(self, hook: Callable[[bool], Awaitable[None]]) -> None:
        self._readiness_hooks.append(hook)

    async def set_ready(self, ready: bool) -> None:
        self.ready = ready
        await asyncio.gather(*(h(ready) for h in self._readiness_hooks))
