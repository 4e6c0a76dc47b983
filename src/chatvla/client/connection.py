"""The contract between the control loop and a policy: what crosses the connection, and the clock.

`PolicyConnection` is all the loop knows about a policy. Its `submit` and `poll` must never block:
that is what lets the arm keep ticking whatever the network does, and what lets a fake policy with
scripted latency and loss (chatvla.client.fakes) stand in for the gRPC client
(chatvla.client.policy_client) in tests, benchmarks and the load test. What goes in is an
`ObservationRequest`; what comes out are `PolicyEvent`s (`ChunkReply`, `RequestFailed`,
`ConnectionChanged`), failures typed as `PolicyError`s. Time comes from a `Clock` both sides read, so
the same code runs on wall time or on a fake clock.

Nothing here imports the loop, gRPC or protobuf: implementations of the contract depend on it, not
on each other.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


# ---- time ----------------------------------------------------------------------------------------
@runtime_checkable
class Clock(Protocol):
    """Seconds on a monotonic scale. The control loop, the executor's latency measurements and the
    watchdog all read the same clock so a fake one makes them deterministic together."""

    def now(self) -> float: ...

    def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    """Wall time for real robots."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# ---- what crosses the connection -----------------------------------------------------------------
class PolicyError(Exception):
    """An error reported by (or about) the policy server; `message` is the server's own text.
    `fatal` errors will not go away by retrying (bad token, unknown profile); the connection stops
    reconnecting after one."""

    code: str = "UNKNOWN"
    fatal: bool = False

    def __init__(self, message: str, *, field: str = "", seq: int | None = None) -> None:
        super().__init__(f"{self.code}: {message}" + (f" [{field}]" if field else ""))
        self.message = message
        self.field = field
        self.seq = seq


class InvalidArgument(PolicyError):
    code = "INVALID_ARGUMENT"


class DeadlineExceeded(PolicyError):
    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(PolicyError):
    code = "RESOURCE_EXHAUSTED"


class Aborted(PolicyError):
    """The observation was superseded by a newer one of the same session."""

    code = "ABORTED"


class Internal(PolicyError):
    code = "INTERNAL"


class Unavailable(PolicyError):
    code = "UNAVAILABLE"


class Unauthenticated(PolicyError):
    code = "UNAUTHENTICATED"
    fatal = True


class PermissionDenied(PolicyError):
    code = "PERMISSION_DENIED"
    fatal = True


class Unimplemented(PolicyError):
    code = "UNIMPLEMENTED"
    fatal = True


class SessionRejected(PolicyError):
    """The server refused the session start (unknown profile or camera, bad control rate...)."""

    code = "SESSION_REJECTED"
    fatal = True


@dataclass(frozen=True)
class ObservationRequest:
    """One observation to send. Arrays are encoded off the control thread by the connection."""

    tick: int
    images: Mapping[str, np.ndarray]
    state: np.ndarray
    instruction: str | None = None  # None: keep the session's instruction
    force_reasoning: bool = False
    deadline_ms: int | None = None  # None: the connection's default
    seed: int = 0
    # Reasoning override: the server pre-fills this text instead of decoding its own, for this
    # observation only (operators steering the robot, evaluations asking "does it follow this?").
    # None: the model's own reasoning, decoded or cached as the session's policy says.
    reasoning: str | None = None


@dataclass(frozen=True)
class ChunkReply:
    """A chunk answering observation `seq` (captured at `tick`); row i is for tick `tick + i`."""

    seq: int
    tick: int
    actions: np.ndarray
    received_at: float
    reasoning: str = ""
    reasoning_refreshed: bool = False
    reasoning_tokens: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestFailed:
    """Observation `seq` will not be answered (server error, deadline, lost connection)."""

    seq: int
    error: PolicyError
    at: float


@dataclass(frozen=True)
class ConnectionChanged:
    connected: bool
    address: str
    at: float
    error: PolicyError | None = None
    session_id: str = ""


PolicyEvent = ChunkReply | RequestFailed | ConnectionChanged


class PolicyConnection(ABC):
    """A policy the control loop can use without ever waiting for it."""

    # The error that ended the connection for good (bad token, unknown profile: retrying cannot help),
    # or None while it may still recover. Load generators stop a virtual robot on it.
    fatal_error: PolicyError | None = None

    def start(self) -> None:
        """Begin connecting (in the background). Idempotent."""

    @abstractmethod
    def submit(self, request: ObservationRequest) -> int:
        """Queue an observation and return its seq at once. A newer submit may supersede an older one
        that has not left yet; the superseded seq is then reported as failed (Aborted)."""

    @abstractmethod
    def poll(self) -> list[PolicyEvent]:
        """Everything that happened since the last poll, oldest first. Returns at once."""

    def close(self) -> None:
        """Stop background work. Safe to call twice."""

    def __enter__(self) -> PolicyConnection:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
