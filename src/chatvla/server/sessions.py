"""Per-session scheduling state: one observation in flight, newest-wins supersede, reasoning cache.

Why one in flight: a robot executes one chunk at a time and only the freshest observation matters,
so a session never occupies more than one batch slot (fairness across the fleet) and a backlog of
stale observations can never build up. An observation that arrives while the previous one is still
*queued* (not yet taken into a reasoning batch) replaces it; one that arrives while the previous is
computing waits in a single pending slot, where a newer one replaces it again. Replaced observations
are answered ABORTED so the client knows their fate.

The reasoning cache implements the dual-rate policy: System 2 (decode new text) when the policy says
so, System 1 (pre-fill the cached text with the new observation) in between. An observation that
supplies its own reasoning (an override) is pre-filled with that text and never replaces the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, ObservationRequest, SessionConfig

# What a session hands back to its transport: (seq, a chunk or the error that answers that seq).
Emit = Callable[[int, "ChunkResult | ServeError"], None]

_job_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One admitted observation on its way through the stages."""

    request: ObservationRequest
    prepared: Any
    received: float  # time.monotonic() at receipt
    deadline: float  # time.monotonic() instant
    preprocess_s: float
    seed: int
    session: Session | None = None
    started: bool = False  # taken into a reasoning batch: can no longer be withdrawn
    task: asyncio.Task | None = None
    abort: ServeError | None = None  # why the task was cancelled, if it was on purpose
    id: int = field(default_factory=lambda: next(_job_ids))

    def mark_started(self) -> None:
        self.started = True


@dataclass
class ReasoningCache:
    """The session's last decoded reasoning and what it was decoded for."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None  # re-used as-is: re-tokenising text may not round-trip
    instruction: str = ""
    since_refresh: int = 0
    refreshed_at: float = 0.0


class Session:
    """A robot's Stream. Mutated only on the event loop thread, so it needs no locks."""

    def __init__(self, config: SessionConfig, emit: Emit, robot: str, transport: str) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.config = config
        self.robot = robot  # from the auth token when tokens are on, else the client's robot_id
        self.transport = transport  # metrics label
        self.instruction = config.instruction
        self.last_seq: int | None = None
        self.current: Job | None = None
        self.pending: Job | None = None
        self.cache = ReasoningCache()
        self.closed = False
        self._emit = emit
        self._idle = asyncio.Event()
        self._idle.set()

    # --- delivery ------------------------------------------------------------------------------

    def emit(self, seq: int, result: ChunkResult | ServeError) -> None:
        if not self.closed:
            self._emit(seq, result)

    # --- slot management -------------------------------------------------------------------------

    @property
    def can_replace(self) -> bool:
        """True if a new observation would replace a queued one rather than add load."""
        return self.pending is not None or (self.current is not None and not self.current.started)

    def check_seq(self, seq: int) -> None:
        if self.last_seq is not None and seq <= self.last_seq:
            raise ServeError(
                Code.INVALID_ARGUMENT, f"seq {seq} is not greater than the previous {self.last_seq}",
                "observation.seq",
            )
        self.last_seq = seq

    def admit(self, job: Job) -> tuple[Job | None, Job | None]:
        """Place `job`; return (job to start now or None, job it superseded or None)."""
        job.session = self
        self._idle.clear()
        if self.current is None:
            self.current = job
            return job, None
        if not self.current.started:
            old, self.current = self.current, job
            return job, old
        old, self.pending = self.pending, job
        return None, old

    def finish(self, job: Job) -> Job | None:
        """`job` is answered; return the pending job to start next, if any."""
        if job is self.current:
            self.current, nxt = self.pending, self.pending
            self.pending = None
        elif job is self.pending:
            self.pending, nxt = None, None
        else:
            nxt = None
        if self.current is None and self.pending is None:
            self._idle.set()
        return nxt

    async def wait_idle(self) -> None:
        """Until every admitted observation of this session has been answered."""
        await self._idle.wait()

    # --- dual-rate reasoning -----------------------------------------------------------------------

    def refresh_reason(self, job: Job, now: float) -> str | None:
        """Why this observation needs new reasoning text, or None to re-use the cached text."""
        policy, cache = self.config.reasoning, self.cache
        if cache.text is None:
            return "first"
        if job.request.obs.instruction != cache.instruction:
            return "instruction"
        if job.request.force_reasoning:
            return "forced"
        if cache.since_refresh + 1 >= policy.every_n:
            return "every_n"
        if policy.every_seconds > 0 and now - cache.refreshed_at >= policy.every_seconds:
            return "interval"
        return None

    def record_reasoning(
        self, text: str, token_ids: tuple[int, ...], decoded: bool, instruction: str, now: float
    ) -> None:
        if decoded:
            self.cache = ReasoningCache(
                text=text, token_ids=tuple(token_ids), instruction=instruction, since_refresh=0, refreshed_at=now
            )
        else:
            self.cache.since_refresh += 1

    def record_override(self) -> None:
        """An observation ran on supplied reasoning. The cached decoded text stays (the override is for
        that observation only), but it ages like a System 1 step: `every_n` counts observations since
        the text was decoded, so a long run of overrides is followed by fresh reasoning, not stale."""
        self.cache.since_refresh += 1
