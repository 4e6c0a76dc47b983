"""A session's scheduling state: observations in flight, the pending slot, the reasoning cache.

This module holds state and the small rules that read it; `scheduler.py` acts on them. Everything
here is touched only on the event loop thread, so it needs no locks.

In flight: up to `max_in_flight` observations of a session compute at once (observation n+1 reasons
while n is in the expert stage), and their answers are emitted in seq order. Beyond that a newer
observation replaces the newest one that no batch has taken yet, or waits in one pending slot where
a newer one replaces it again: only the freshest observation matters to a robot, and a backlog of
stale ones can never build up.

Reasoning: the cache holds the last decoded text and the observation it was decoded for. Whether an
observation needs new text is `refresh_reason`; whether it must wait for it is `must_wait_for_text`
(the first observation, a new instruction, a forced refresh, or a policy that decodes every
observation); otherwise a due refresh decodes in the background while chunks keep using the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, SessionConfig, ValidatedObservation

if TYPE_CHECKING:
    from chatvla.server.compute import Work

# What a session hands back to its transport: (seq, a chunk or the error that answers that seq).
Emit = Callable[[int, "ChunkResult | ServeError"], None]

_job_ids = itertools.count(1)


@dataclass(frozen=True)
class TextRef:
    """The reasoning a chunk is conditioned on: its text, and which observation it was written for."""

    text: str
    token_ids: tuple[int, ...] | None
    seq: int  # the observation it was decoded for (or that supplied it)
    written_at: float  # time.monotonic()


@dataclass(eq=False)
class Job:
    """One admitted observation, from admission until its answer is emitted."""

    request: ValidatedObservation
    received: float  # time.monotonic() at receipt
    deadline: float  # time.monotonic() instant
    seed: int | None  # diffusion noise seed; None: zero noise (SchedulerConfig.zero_noise)
    transport: str  # metrics label
    session: Session | None = None
    work: Work | None = None  # the compute work answering it; None while pending or waiting for text
    text: TextRef | None = None  # the cached reasoning it pre-fills, if it does not decode its own
    decoded_reason: str | None = None  # why it decodes its own reasoning, if it does
    answer: ChunkResult | ServeError | None = None  # set when done; emitted in seq order
    future: asyncio.Future | None = None  # stateless calls: resolved with the answer
    id: int = field(default_factory=lambda: next(_job_ids))


@dataclass
class ReasoningCache:
    text: TextRef | None = None
    instruction: str = ""
    since_refresh: int = 0  # observations that used `text` since it was decoded (or its refresh began)


class Session:
    """A robot's Stream."""

    def __init__(self, config: SessionConfig, emit: Emit, robot: str, transport: str, max_in_flight: int) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.config = config
        self.robot = robot  # from the auth token when tokens are on, else the client's robot_id
        self.transport = transport  # metrics label
        self.instruction = config.instruction
        self.max_in_flight = max_in_flight
        self.last_seq: int | None = None
        self.inflight: deque[Job] = deque()  # admitted and started, in seq order
        self.pending: Job | None = None
        self.cache = ReasoningCache()
        self.decoding: Work | None = None  # a decode whose text will become the cache
        self.decoding_instruction = ""
        self.waiting_text: list[Job] = []  # jobs waiting for `decoding` to finish
        self.closed = False
        self._emit = emit
        self._idle = asyncio.Event()
        self._idle.set()

    # --- delivery ------------------------------------------------------------------------------

    def emit(self, seq: int, result: ChunkResult | ServeError) -> None:
        if not self.closed:
            self._emit(seq, result)

    def emit_ready(self) -> None:
        """Emit the answers at the head of the in-flight queue, in seq order."""
        while self.inflight and self.inflight[0].answer is not None:
            job = self.inflight.popleft()
            self.emit(job.request.seq, job.answer)  # type: ignore[arg-type]
        self.update_idle()

    def update_idle(self) -> None:
        if not self.inflight and self.pending is None:
            self._idle.set()
        else:
            self._idle.clear()

    async def wait_idle(self) -> None:
        """Until every admitted observation of this session has been answered."""
        await self._idle.wait()

    # --- slots ---------------------------------------------------------------------------------

    @property
    def has_slot(self) -> bool:
        return sum(1 for j in self.inflight if j.answer is None) < self.max_in_flight

    @property
    def can_replace(self) -> bool:
        """True if a new observation would replace a waiting one rather than add load."""
        return self.pending is not None or not self.has_slot

    def check_seq(self, seq: int) -> None:
        if self.last_seq is not None and seq <= self.last_seq:
            raise ServeError(
                Code.INVALID_ARGUMENT, f"seq {seq} is not greater than the previous {self.last_seq}",
                "observation.seq",
            )
        self.last_seq = seq

    # --- reasoning -------------------------------------------------------------------------------

    @property
    def dual_rate(self) -> bool:
        p = self.config.reasoning
        return p.every_n > 1 or p.every_seconds > 0

    def refresh_reason(self, job: Job, now: float) -> str | None:
        """Why this observation calls for new reasoning text, or None to re-use the cached text."""
        policy, cache = self.config.reasoning, self.cache
        if cache.text is None:
            return "first"
        if job.request.obs.instruction != cache.instruction:
            return "instruction"
        if job.request.force_reasoning:
            return "forced"
        if cache.since_refresh + 1 >= policy.every_n:
            return "every_n"
        if policy.every_seconds > 0 and now - cache.text.written_at >= policy.every_seconds:
            return "interval"
        return None

    def must_wait_for_text(self, reason: str) -> bool:
        """True if the observation's chunk must be conditioned on text decoded for it."""
        return reason in ("first", "instruction", "forced") or not self.dual_rate
