"""The serving pipeline: validate/preprocess -> reasoning stage -> expert stage -> chunk.

Transports (gRPC, HTTP, future websocket) only use this API:

    pipeline = Pipeline(engine, PipelineConfig(...), metrics); await pipeline.start()
    result = await pipeline.infer(decode, transport="http")           # stateless, raises ServeError
    session = pipeline.open_session(config, emit, robot, transport)   # a Stream
    await pipeline.submit(session, seq, decode)                       # answers arrive via `emit`
    pipeline.close_session(session)
    pipeline.stop_accepting(); await pipeline.drain(timeout); await pipeline.close()

`decode` is a zero-argument callable (for sessions: taking the session's current instruction) that
validates raw input and returns an `ObservationRequest`; the pipeline runs it in the preprocessing
thread pool together with `engine.preprocess`, so image decoding never blocks the event loop.

Admission is bounded: at most `max_queue` observations are admitted-and-unanswered at a time, and
beyond that new work is refused with RESOURCE_EXHAUSTED at once instead of queueing (a robot is
better served by a fast "no" than by a stale chunk). Deadlines are checked after preprocessing and
whenever a stage forms a batch; a chunk that finishes computing is always delivered (the client
drops actions for ticks already past).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from chatvla.engines.base import ActItem, Engine, ReasoningResult, ReasonItem
from chatvla.server.batcher import BatchStats, MicroBatcher
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, ObservationRequest, ReasoningPolicy, SessionConfig, StageTimings
from chatvla.server.metrics import Metrics
from chatvla.server.sessions import Emit, Job, Session
from chatvla.server.validation import InputSpec
from chatvla.wire import Limits
from chatvla.wire.limits import DEFAULT_LIMITS

log = logging.getLogger("chatvla.server")

DEFAULT_REASONING = ReasoningPolicy()


@dataclass(frozen=True)
class PipelineConfig:
    limits: Limits = DEFAULT_LIMITS
    max_batch: int = 8
    max_wait_s: float = 0.005
    expert_max_batch: int = 8
    expert_max_wait_s: float = 0.005
    max_queue: int = 128
    max_sessions: int = 256
    preprocess_workers: int = 2
    deadline_s: float = 5.0
    reasoning: ReasoningPolicy = DEFAULT_REASONING


class Pipeline:
    """Schedules observations from all transports onto one engine."""

    def __init__(self, engine: Engine, config: PipelineConfig, metrics: Metrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.spec = InputSpec(profile=engine.info.profile, limits=config.limits)
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._admitted = 0
        self._preparing = 0  # observations in decode/preprocess: they may join the next batch
        self._idle: asyncio.Event | None = None
        self._pool = ThreadPoolExecutor(config.preprocess_workers, thread_name_prefix="chatvla-preprocess")
        self._reasoning: MicroBatcher[ReasonItem, ReasoningResult] | None = None
        self._expert: MicroBatcher[ActItem, np.ndarray] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        c = self.config
        # Reasoning waits for observations still being preprocessed; the expert waits for a reasoning
        # batch that is running (its whole output arrives at once when it finishes).
        if not self.engine.continuous_batching:
            self._reasoning = self._batcher(
                "reasoning", self.engine.reason_batch, c.max_batch, c.max_wait_s, lambda: self._preparing > 0
            )
        elif hasattr(self.engine, "on_step"):
            # The engine forms its own batches: it reports the size of every forward pass it runs.
            self.engine.on_step = self.metrics.batch_size.labels(stage="reasoning").observe
        reasoning = self._reasoning
        self._expert = self._batcher(
            "expert", self.engine.act_batch, c.expert_max_batch, c.expert_max_wait_s,
            lambda: reasoning is not None and reasoning.busy,
        )

    def _batcher(
        self, stage: str, fn: Callable, max_batch: int, max_wait_s: float, more_coming: Callable[[], bool]
    ) -> MicroBatcher:
        depth = self.metrics.queue_depth.labels(stage=stage)
        sizes = self.metrics.batch_size.labels(stage=stage)
        b: MicroBatcher = MicroBatcher(
            stage, fn, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=self.config.max_queue,
            on_depth=depth.set, on_batch=lambda s: sizes.observe(s.size), more_coming=more_coming,
        )
        b.start()
        return b

    def stop_accepting(self) -> None:
        """Refuse new calls, sessions and observations (UNAVAILABLE); admitted work carries on."""
        self.accepting = False

    async def drain(self, timeout: float) -> bool:
        """Wait until every admitted observation is answered; True if that happened in time."""
        assert self._idle is not None, "start() first"
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        for s in list(self.sessions.values()):
            self.close_session(s)
        for b in (self._reasoning, self._expert):
            if b is not None:
                await b.close()
        self._pool.shutdown(wait=True)

    @property
    def admitted(self) -> int:
        """Observations admitted and not yet answered."""
        return self._admitted

    # --- stateless calls ---------------------------------------------------------------------------

    async def infer(
        self, decode: Callable[[], ObservationRequest], transport: str, deadline_s: float | None = None
    ) -> ChunkResult:
        """Answer one observation without a session. Raises `ServeError`."""
        received = time.monotonic()
        try:
            self._check_accepting()
            self._reserve(can_replace=False)
            try:
                req, prepared, pre_s = await self._prepare(decode)
                job = self._job(req, prepared, received, pre_s, req.deadline_ms or None, deadline_s)
                result = await self._run(job)
            finally:
                self._release()
        except ServeError as e:
            self._count(transport, e)
            raise
        self._count(transport, None)
        return result

    # --- sessions ----------------------------------------------------------------------------------

    def open_session(self, config: SessionConfig, emit: Emit, robot: str, transport: str) -> Session:
        self._check_accepting()
        if len(self.sessions) >= self.config.max_sessions:
            err = ServeError(
                Code.RESOURCE_EXHAUSTED, f"server has {len(self.sessions)} sessions (the maximum)",
                reason="sessions_limit",
            )
            self.metrics.rejected.labels(reason=err.reason).inc()
            raise err
        session = Session(config, emit, robot, transport)
        self.sessions[session.id] = session
        self.metrics.active_sessions.set(len(self.sessions))
        log.info("session %s opened (robot %s, %s)", session.id, robot or "-", transport)
        return session

    def close_session(self, session: Session) -> None:
        """The stream is gone: withdraw queued work; a computing observation finishes unseen."""
        if session.closed:
            return
        session.closed = True
        closed = ServeError(Code.ABORTED, "session closed")
        if session.pending is not None:  # admitted, never launched
            pending = session.pending
            session.finish(pending)
            self._abort(pending, closed)
        current = session.current
        if current is not None and current.task is not None and not current.started:
            self._abort(current, closed)  # its wrapper releases and finishes it
        self.sessions.pop(session.id, None)
        self.metrics.active_sessions.set(len(self.sessions))
        log.info("session %s closed", session.id)

    async def submit(self, session: Session, seq: int, decode: Callable[[str], ObservationRequest]) -> None:
        """Take one observation of `session` (call in arrival order). Never raises for bad input:
        the outcome for `seq` is delivered through the session's `emit`."""
        received = time.monotonic()
        transport: str = session.transport
        try:
            self._check_accepting()
            session.check_seq(seq)
            self._reserve(can_replace=session.can_replace)
        except ServeError as e:
            self._count(transport, e)
            session.emit(seq, e)
            return
        try:
            instruction = session.instruction
            req, prepared, pre_s = await self._prepare(lambda: decode(instruction))
            session.instruction = req.obs.instruction
            deadline_ms = req.deadline_ms or session.config.default_deadline_ms or None
            job = self._job(req, prepared, received, pre_s, deadline_ms, None)
        except ServeError as e:
            self._release()
            self._count(transport, e)
            session.emit(seq, e)
            return
        except BaseException:  # the stream was cancelled mid-preprocess: give the slot back
            self._release()
            raise
        if session.closed:
            self._release()
            return
        start, superseded = session.admit(job)
        if superseded is not None:
            self._abort(superseded, ServeError(
                Code.ABORTED, f"superseded by seq {seq}", reason="superseded"
            ))
        if start is not None:
            self._launch(start)

    def _launch(self, job: Job) -> None:
        job.task = asyncio.get_running_loop().create_task(self._run_session_job(job))

    def _abort(self, job: Job, err: ServeError) -> None:
        if job.task is not None:
            job.abort = err
            job.task.cancel()  # its wrapper answers, releases and moves the session on
        else:  # a pending job that never started
            assert job.session is not None
            self._release()
            self._count(job.session.transport, err)
            job.session.emit(job.request.seq, err)

    async def _run_session_job(self, job: Job) -> None:
        session = job.session
        assert session is not None
        transport: str = session.transport
        try:
            if time.monotonic() >= job.deadline:
                raise ServeError(Code.DEADLINE_EXCEEDED, "deadline passed behind the previous observation")
            result = await self._run(job)
        except asyncio.CancelledError:
            err = job.abort or ServeError(Code.UNAVAILABLE, "server is shutting down")
            self._count(transport, err)
            session.emit(job.request.seq, err)
        except ServeError as e:
            self._count(transport, e)
            session.emit(job.request.seq, e)
        except Exception as e:  # a bug must not take the session down
            log.exception("observation %s of session %s failed", job.request.seq, session.id)
            err = ServeError(Code.INTERNAL, f"{type(e).__name__}: {e}")
            self._count(transport, err)
            session.emit(job.request.seq, err)
        else:
            self._count(transport, None)
            session.emit(job.request.seq, result)
        finally:
            self._release()
            nxt = session.finish(job)
            if nxt is not None:
                if session.closed:
                    session.finish(nxt)
                    self._abort(nxt, ServeError(Code.ABORTED, "session closed"))
                else:
                    self._launch(nxt)

    # --- the stages --------------------------------------------------------------------------------

    async def _prepare(self, decode: Callable[[], ObservationRequest]) -> tuple[ObservationRequest, Any, float]:
        waiting = self.metrics.queue_depth.labels(stage="preprocess")
        lock, counted = threading.Lock(), [True]

        def uncount() -> None:  # exactly once: when work starts, or when the caller gives up first
            with lock:
                if counted[0]:
                    counted[0] = False
                    waiting.dec()

        def work() -> tuple[ObservationRequest, Any, float]:
            uncount()
            t0 = time.perf_counter()
            req = decode()
            try:
                prepared = self.engine.preprocess(req.obs)
            except ServeError:
                raise
            except Exception as e:
                raise ServeError(Code.INTERNAL, f"preprocess failed: {type(e).__name__}: {e}") from e
            return req, prepared, time.perf_counter() - t0

        waiting.inc()
        self._preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            self._preparing -= 1
            uncount()

    def _job(
        self, req: ObservationRequest, prepared: Any, received: float, pre_s: float,
        deadline_ms: int | None, deadline_s: float | None,
    ) -> Job:
        budget = (deadline_ms / 1000.0) if deadline_ms else self.config.deadline_s
        if deadline_s is not None:
            budget = min(budget, deadline_s)
        deadline = received + budget
        if time.monotonic() >= deadline:
            raise ServeError(Code.DEADLINE_EXCEEDED, "deadline passed during preprocessing")
        seed = req.seed or random.getrandbits(63) or 1
        return Job(req, prepared, received, deadline, pre_s, seed)

    async def _run(self, job: Job) -> ChunkResult:
        req, session = job.request, job.session
        now = time.monotonic()
        if req.reasoning is not None:
            # Supplied reasoning (Infer's `reasoning`, a Stream observation's override): pre-fill it,
            # whatever the session's policy says, so an operator or an evaluation decides what the
            # action expert follows.
            reason, cached, cached_ids = None, req.reasoning, None
        elif session is not None:
            reason = session.refresh_reason(job, now)
            cached = None if reason else session.cache.text
            cached_ids = None if reason else session.cache.token_ids
        else:
            reason, cached, cached_ids = "stateless", None, None
        item = ReasonItem(prepared=job.prepared, reasoning=cached, reasoning_token_ids=cached_ids)
        rres, rstats = await self._reason(item, job)
        if rres.decoded:
            self.metrics.reasoning_tokens.inc(len(rres.token_ids))
            self.metrics.reasoning_refresh.labels(reason=reason or "stateless").inc()
        if session is not None:
            if req.reasoning is None:
                session.record_reasoning(rres.text, rres.token_ids, rres.decoded, req.obs.instruction, now)
            else:
                session.record_override()
        assert self._expert is not None
        fut = self._expert.submit(ActItem(rres, req.obs.state, job.seed), deadline=job.deadline)
        actions, estats = await fut
        actions = self._check_actions(actions)
        total = time.monotonic() - job.received
        compute = job.preprocess_s + rstats.seconds + estats.seconds
        timings = StageTimings(
            queue_ms=max(0.0, total - compute) * 1e3, preprocess_ms=job.preprocess_s * 1e3,
            reasoning_ms=rstats.seconds * 1e3, expert_ms=estats.seconds * 1e3, total_ms=total * 1e3,
            reasoning_batch_size=rstats.size, expert_batch_size=estats.size,
        )
        self._observe(timings)
        return ChunkResult(
            # Supplied text is echoed as sent (the engine's version may be re-decoded from tokens).
            seq=req.seq, tick=req.tick, actions=actions,
            reasoning=req.reasoning if req.reasoning is not None else rres.text,
            reasoning_refreshed=rres.decoded, reasoning_tokens=len(rres.token_ids) if rres.decoded else 0,
            timings=timings,
        )

    async def _reason(self, item: ReasonItem, job: Job) -> tuple[ReasoningResult, BatchStats]:
        if self._reasoning is not None:
            return await self._reasoning.submit(item, deadline=job.deadline, on_start=job.mark_started)
        # Continuous-batching engine: it schedules across requests itself.
        job.mark_started()
        t0 = time.perf_counter()
        try:
            res = await self.engine.reason_async(item)
        except ServeError:
            raise
        except Exception as e:
            raise ServeError(Code.INTERNAL, f"reasoning failed: {type(e).__name__}: {e}") from e
        # The batch-size histogram is fed per engine step (`on_step`); the chunk reports the most
        # requests that shared a forward pass with this one.
        stats = BatchStats(size=int(getattr(res, "batch_size", 1)), seconds=time.perf_counter() - t0)
        return res, stats

    def _check_actions(self, actions: Any) -> np.ndarray:
        """Never send a robot garbage: wrong shape or non-finite actions become INTERNAL errors."""
        p = self.spec.profile
        a = np.asarray(actions, dtype=np.float32)
        if a.shape != (p.chunk_size, p.action_dim):
            raise ServeError(Code.INTERNAL, f"engine returned actions of shape {a.shape}")
        if not np.isfinite(a).all():
            raise ServeError(Code.INTERNAL, "engine returned non-finite actions")
        return a

    # --- bookkeeping -------------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ServeError(Code.UNAVAILABLE, "server is draining; reconnect to another replica", reason="draining")

    def _reserve(self, can_replace: bool) -> None:
        if self._admitted >= self.config.max_queue and not can_replace:
            raise ServeError(
                Code.RESOURCE_EXHAUSTED, f"server is at capacity ({self.config.max_queue} observations queued)",
                reason="overload",
            )
        self._admitted += 1
        if self._idle is not None:
            self._idle.clear()

    def _release(self) -> None:
        self._admitted -= 1
        if self._admitted == 0 and self._idle is not None:
            self._idle.set()

    def _count(self, transport: str, err: ServeError | None) -> None:
        self.metrics.requests.labels(transport=transport, outcome="ok" if err is None else err.outcome).inc()
        if err is not None and err.code is not Code.INTERNAL:
            self.metrics.rejected.labels(reason=err.reason).inc()

    def _observe(self, t: StageTimings) -> None:
        h = self.metrics.stage_latency
        h.labels(stage="queue").observe(t.queue_ms / 1e3)
        h.labels(stage="preprocess").observe(t.preprocess_ms / 1e3)
        h.labels(stage="reasoning").observe(t.reasoning_ms / 1e3)
        h.labels(stage="expert").observe(t.expert_ms / 1e3)
        h.labels(stage="total").observe(t.total_ms / 1e3)
