"""The scheduler: admission, sessions, supersede, pipelining and reasoning refresh (on the event loop).

Transports (gRPC, HTTP, the openpi websocket) only use this API:

    scheduler = Scheduler(engine, SchedulerConfig(...), metrics); await scheduler.start()
    result = await scheduler.infer(decode, transport="http")            # stateless; raises ServeError
    session = scheduler.open_session(config, emit, robot, transport)    # a Stream
    await scheduler.submit(session, seq, decode)                        # answers arrive via `emit`
    scheduler.close_session(session)
    scheduler.stop_accepting(); await scheduler.drain(timeout); await scheduler.close()

One observation's path: the transport receives it; `decode` validates it and decodes its images
right here, on the receiving side; the scheduler admits it and decides which reasoning conditions
it; the compute thread (`compute.py`) runs it through the model and hands the chunk back once.

Admission is bounded: at most `max_queue` observations are admitted-and-unanswered at a time;
beyond that new work is refused with RESOURCE_EXHAUSTED at once instead of queueing (a robot is
better served by a fast "no" than by a stale chunk). Deadlines are checked when a batch is formed;
a chunk that finishes computing is always delivered (the client drops actions for ticks already past).

Reasoning (dual-rate): an observation that needs text written for it (a session's first, a new
instruction, `force_reasoning`, or every observation when the policy is `every_n = 1`) waits for its
decode; a refresh that the dual-rate policy calls for decodes in the background while the session's
chunks keep coming from the cached text, which the new text replaces when it is ready. Each chunk
says which observation its reasoning was written for and how old it was.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chatvla.engines.base import Engine
from chatvla.server.compute import ComputeConfig, ComputeLoop, Work
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, ReasoningPolicy, SessionConfig, StageTimings, ValidatedObservation
from chatvla.server.metrics import Metrics
from chatvla.server.sessions import Emit, Job, ReasoningCache, Session, TextRef
from chatvla.server.validation import InputSpec
from chatvla.wire import Limits
from chatvla.wire.limits import DEFAULT_LIMITS
from chatvla.wire.vocabulary import (
    BATCH_STAGES,
    STAGE_EXPERT,
    STAGE_PREPROCESS,
    STAGE_QUEUE,
    STAGE_REASONING,
    STAGE_TOTAL,
)

log = logging.getLogger("chatvla.server")


DEFAULT_COMPUTE = ComputeConfig()
DEFAULT_REASONING = ReasoningPolicy()


# Admit only what is expected to be answered within this share of its deadline.
ADMISSION_HEADROOM = 0.8


SESSIONS_LIMIT = "sessions_limit"  # the rejection reason `open_session` counts itself


@dataclass(frozen=True)
class SchedulerConfig:
    limits: Limits = DEFAULT_LIMITS
    compute: ComputeConfig = DEFAULT_COMPUTE
    max_queue: int = 128
    max_sessions: int = 256
    max_in_flight: int = 3
    deadline_s: float = 5.0
    reasoning: ReasoningPolicy = DEFAULT_REASONING
    zero_noise: bool = True  # requests without a seed: zero noise, else a random seed (ServerSettings.noise)


class Scheduler:
    """Schedules observations from all transports onto one engine."""

    def __init__(
        self, engine: Engine, config: SchedulerConfig, metrics: Metrics, *, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.engine = engine
        self._executor = executor  # the thread that loaded the engine (compute.compute_executor)
        self.config = config
        self.metrics = metrics
        self.spec = InputSpec(profile=engine.info.profile, limits=config.limits, state_stats=engine.info.state_stats)
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._admitted = 0
        self._with_work: set[str] = set()  # sessions with something admitted and unanswered
        self._per_obs_s = 0.0  # recent compute cost of one observation in its batch (moving average)
        self._idle: asyncio.Event | None = None
        self._compute: ComputeLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        depth = {s: self.metrics.queue_depth.labels(stage=s) for s in BATCH_STAGES}
        sizes = {s: self.metrics.batch_size.labels(stage=s) for s in BATCH_STAGES}
        if self.engine.batches_reasoning_itself:
            self.engine.on_step = sizes[STAGE_REASONING].observe  # it reports every forward pass it runs
        self._compute = ComputeLoop(
            self.engine, self.config.compute, asyncio.get_running_loop(),
            on_depth=lambda stage, n: depth[stage].set(n),
            on_batch=lambda stage, n: sizes[stage].observe(n),
            # Sessions with nothing in flight are closed-loop robots about to send: worth a short wait.
            more_coming=lambda: len(self.sessions) > len(self._with_work),
            executor=self._executor,
        )
        self._compute.start()

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
        if self._compute is not None:
            await asyncio.to_thread(self._compute.close)
            await asyncio.sleep(0)  # let the compute thread's last hand-backs run

    @property
    def admitted(self) -> int:
        """Observations admitted and not yet answered."""
        return self._admitted

    # --- stateless calls ---------------------------------------------------------------------------

    async def infer(
        self, decode: Callable[[], ValidatedObservation], transport: str, deadline_s: float | None = None
    ) -> ChunkResult:
        """Answer one observation without a session. Raises `ServeError`."""
        received = time.monotonic()
        try:
            self._check_accepting()
            budget = self.config.deadline_s if deadline_s is None else min(deadline_s, self.config.deadline_s)
            self._reserve(can_replace=False, budget_s=budget)
        except ServeError as e:
            self._count(transport, e)
            raise
        try:
            req = self._decode(decode)
            job = self._job(req, received, req.deadline_ms or None, deadline_s, None, transport)
        except ServeError as e:
            self._release()
            self._count(transport, e)
            raise
        job.future = asyncio.get_running_loop().create_future()
        self._dispatch(job)
        try:
            answer = await asyncio.shield(job.future)
        except asyncio.CancelledError:  # the caller went away: take the work back if nothing computes it
            self._abort(job, ServeError(Code.ABORTED, "the caller went away"))
            raise
        if isinstance(answer, ServeError):
            raise answer
        return answer

    # --- sessions ----------------------------------------------------------------------------------

    def open_session(self, config: SessionConfig, emit: Emit, robot: str, transport: str) -> Session:
        self._check_accepting()
        if len(self.sessions) >= self.config.max_sessions:
            err = ServeError(
                Code.RESOURCE_EXHAUSTED, f"server has {len(self.sessions)} sessions (the maximum)",
                reason=SESSIONS_LIMIT,
            )
            self.metrics.rejected.labels(reason=err.reason).inc()
            raise err
        k = min(config.max_in_flight or self.config.max_in_flight, self.config.max_in_flight)
        session = Session(config, emit, robot, transport, max_in_flight=k)
        self.sessions[session.id] = session
        self.metrics.active_sessions.set(len(self.sessions))
        log.info("session %s opened (robot %s, %s, %d in flight)", session.id, robot or "-", transport, k)
        return session

    def close_session(self, session: Session) -> None:
        """The stream is gone: withdraw queued work; work already computing finishes unseen."""
        if session.closed:
            return
        session.closed = True
        closed = ServeError(Code.ABORTED, "session closed")
        if session.pending is not None:
            self._abort(session.pending, closed)
        for job in [*session.waiting_text, *session.inflight]:
            if job.answer is None:
                self._abort(job, closed)
        if session.decoding is not None and not session.decoding.act and self._compute is not None:
            self._compute.withdraw(session.decoding)
        self.sessions.pop(session.id, None)
        self._with_work.discard(session.id)
        self.metrics.active_sessions.set(len(self.sessions))
        log.info("session %s closed", session.id)

    async def submit(self, session: Session, seq: int, decode: Callable[[str], ValidatedObservation]) -> None:
        """Take one observation of `session` (call in arrival order). Never raises for bad input:
        the outcome for `seq` is delivered through the session's `emit`."""
        received = time.monotonic()
        transport = session.transport
        try:
            self._check_accepting()
            session.check_seq(seq)
            default_ms = session.config.default_deadline_ms
            self._reserve(can_replace=session.can_replace,
                          budget_s=default_ms / 1e3 if default_ms else self.config.deadline_s)
        except ServeError as e:
            self._count(transport, e)
            session.emit(seq, e)
            return
        try:
            instruction = session.instruction
            req = self._decode(lambda: decode(instruction))
            session.instruction = req.obs.instruction
            deadline_ms = req.deadline_ms or session.config.default_deadline_ms or None
            job = self._job(req, received, deadline_ms, None, session, transport)
        except ServeError as e:
            self._release()
            self._count(transport, e)
            session.emit(seq, e)
            return
        if session.closed:
            self._release()
            return
        self._admit(session, job)

    # --- admission and supersede -------------------------------------------------------------------

    def _admit(self, session: Session, job: Job) -> None:
        superseded = ServeError(Code.ABORTED, f"superseded by seq {job.request.seq}", reason="superseded")
        if not session.has_slot:
            newest = next((j for j in reversed(session.inflight) if j.answer is None), None)
            if newest is None or not self._abort(newest, superseded):  # no queued one to replace: wait
                old, session.pending = session.pending, job
                if old is not None:
                    self._abort(old, superseded)
                self._track(session)
                return
        session.inflight.append(job)
        self._dispatch(job)
        self._track(session)

    def _start_pending(self, session: Session) -> None:
        while session.pending is not None and session.has_slot and not session.closed:
            job, session.pending = session.pending, None
            if time.monotonic() >= job.deadline:
                self._finish(job, ServeError(Code.DEADLINE_EXCEEDED, "deadline passed behind the previous observation"))
                continue
            session.inflight.append(job)
            self._dispatch(job)

    def _abort(self, job: Job, err: ServeError) -> bool:
        """Answer `job` with `err` now, if no batch has taken it yet. False if it is computing."""
        if job.answer is not None:
            return False
        s = job.session
        if job.work is not None:
            assert self._compute is not None
            if not self._compute.withdraw(job.work):
                return False
            if s is not None and s.decoding is job.work:
                self._decoding_lost(s)
        if s is not None:
            if job in s.waiting_text:
                s.waiting_text.remove(job)
            if s.pending is job:
                s.pending = None
            if job in s.inflight:
                s.inflight.remove(job)
        self._finish(job, err)
        return True

    # --- which reasoning conditions an observation --------------------------------------------------

    def _dispatch(self, job: Job) -> None:
        req, session = job.request, job.session
        now = time.monotonic()
        if req.reasoning is not None:
            # Supplied reasoning (Infer's `reasoning`, a Stream observation's override): pre-fill it,
            # whatever the session's policy says; it ages the session's cached text like a refill.
            job.text = TextRef(req.reasoning, None, req.seq, now)
            if session is not None:
                session.cache.since_refresh += 1
            self._put(job)
            return
        if session is None:
            self._decode_for(job, "stateless")
            return
        reason = session.refresh_reason(job, now)
        if reason is not None and session.must_wait_for_text(reason):
            if (session.dual_rate and reason in ("first", "instruction") and session.decoding is not None
                    and session.decoding_instruction == req.obs.instruction):
                session.waiting_text.append(job)  # the text it needs is being written already
                return
            self._decode_for(job, reason)
            return
        cache = session.cache
        job.text = cache.text
        cache.since_refresh += 1
        self._put(job)
        if reason is not None and session.decoding is None:
            self._refresh_in_background(session, job, reason)

    def _decode_for(self, job: Job, reason: str) -> None:
        job.decoded_reason = reason
        self.metrics.reasoning_refresh.labels(reason=reason).inc()
        session = job.session
        on_reasoned = None
        if session is not None:
            seq = job.request.seq
            on_reasoned = lambda w, s=session, seq=seq: self._text_arrived(s, w, seq)  # noqa: E731
        self._put(job, on_reasoned=on_reasoned)
        if session is not None and job.work is not None and job.answer is None:
            session.decoding, session.decoding_instruction = job.work, job.request.obs.instruction

    def _refresh_in_background(self, session: Session, job: Job, reason: str) -> None:
        assert self._compute is not None and job.work is not None
        seq = job.request.seq
        bg = Work(
            obs=job.request.obs, seed=0, deadline=job.deadline, act=False, source=job.work,
            on_done=lambda w, s=session, seq=seq: self._background_done(s, w, seq),
        )
        try:
            self._compute.put(bg)
        except ServeError:
            return
        self.metrics.reasoning_refresh.labels(reason=reason).inc()
        session.decoding, session.decoding_instruction = bg, job.request.obs.instruction
        session.cache.since_refresh = 0  # the cadence counts from the refresh, not from its arrival

    def _text_arrived(self, session: Session, w: Work, seq: int) -> None:
        res = w.reasoning_result
        assert res is not None
        self.metrics.reasoning_tokens.inc(len(res.token_ids))
        if session.decoding is w:
            session.decoding = None
        if session.closed:
            return
        since = session.cache.since_refresh if not w.act else 0
        session.cache = ReasoningCache(
            text=TextRef(res.text, tuple(res.token_ids), seq, w.reasoned_at), instruction=w.obs.instruction,
            since_refresh=since,
        )
        waiting, session.waiting_text = session.waiting_text, []
        for j in waiting:
            if j.answer is not None:
                continue
            if j.request.obs.instruction != w.obs.instruction:  # it waits for a newer instruction's text
                self._dispatch(j)
            else:
                j.text = session.cache.text
                session.cache.since_refresh += 1
                self._put(j)

    def _background_done(self, session: Session, w: Work, seq: int) -> None:
        if w.error is not None:
            if session.decoding is w:
                session.decoding = None
            log.info("reasoning refresh for session %s failed: %s", session.id, w.error)
            return
        self._text_arrived(session, w, seq)

    def _decoding_lost(self, session: Session) -> None:
        """The decode others were waiting for will not come: they decode on their own."""
        session.decoding = None
        waiting, session.waiting_text = session.waiting_text, []
        for j in waiting:
            if j.answer is None:
                self._dispatch(j)

    # --- the hand-off to compute and back ------------------------------------------------------------

    def _put(self, job: Job, on_reasoned: Callable[[Work], None] | None = None) -> None:
        assert self._compute is not None
        text = job.text
        w = Work(
            obs=job.request.obs, seed=job.seed, deadline=job.deadline,
            on_done=lambda w, job=job: self._work_done(job, w), on_reasoned=on_reasoned,
            reasoning=text.text if text is not None else None,
            reasoning_token_ids=text.token_ids if text is not None else None,
        )
        job.work = w
        try:
            self._compute.put(w)
        except ServeError as e:
            self._finish(job, e)

    def _work_done(self, job: Job, w: Work) -> None:
        s = job.session
        if s is not None and s.decoding is w:  # a decode others waited for failed
            self._decoding_lost(s)
        self._finish(job, w.error if w.error is not None else self._chunk(job, w))

    def _chunk(self, job: Job, w: Work) -> ChunkResult:
        req, res = job.request, w.reasoning_result
        assert res is not None and w.actions is not None
        now = time.monotonic()
        total = now - job.received
        compute = w.preprocess_s + w.reasoning_s + w.expert_s
        timings = StageTimings(
            queue_ms=max(0.0, total - compute) * 1e3, preprocess_ms=w.preprocess_s * 1e3,
            reasoning_ms=w.reasoning_s * 1e3, expert_ms=w.expert_s * 1e3, total_ms=total * 1e3,
            reasoning_batch_size=w.reasoning_batch, expert_batch_size=w.expert_batch,
        )
        text = job.text or TextRef(res.text, None, req.seq, w.reasoned_at)
        return ChunkResult(
            # Supplied text is echoed as sent (the engine's version may be re-decoded from tokens).
            seq=req.seq, tick=req.tick, actions=w.actions,
            reasoning=req.reasoning if req.reasoning is not None else res.text,
            reasoning_refreshed=res.decoded, reasoning_tokens=len(res.token_ids) if res.decoded else 0,
            timings=timings, reasoning_seq=text.seq, reasoning_age_ms=max(0.0, now - text.written_at) * 1e3,
        )

    def _finish(self, job: Job, answer: ChunkResult | ServeError) -> None:
        if job.answer is not None:
            return
        job.answer = answer
        self._release()
        self._count(job.transport, answer if isinstance(answer, ServeError) else None)
        if isinstance(answer, ChunkResult):
            t = answer.timings
            cost = (t.preprocess_ms + t.reasoning_ms / max(1, t.reasoning_batch_size)
                    + t.expert_ms / max(1, t.expert_batch_size)) / 1e3
            self._per_obs_s = cost if self._per_obs_s == 0 else 0.9 * self._per_obs_s + 0.1 * cost
            if answer.reasoning_refreshed and job.session is None:
                self.metrics.reasoning_tokens.inc(answer.reasoning_tokens)
            self._observe(answer.timings)
        s = job.session
        if s is None:
            if job.future is not None and not job.future.done():
                job.future.set_result(answer)
            return
        if job in s.inflight:
            s.emit_ready()
        else:  # superseded or refused while waiting: answered at once
            s.emit(job.request.seq, answer)
        self._start_pending(s)
        self._track(s)

    # --- bookkeeping -------------------------------------------------------------------------------

    @staticmethod
    def _decode(decode: Callable[[], ValidatedObservation]) -> ValidatedObservation:
        try:
            return decode()
        except ServeError:
            raise
        except Exception as e:  # a bug in decoding must answer this observation, not end the stream
            log.exception("decoding an observation failed")
            raise ServeError(Code.INTERNAL, f"decoding failed: {type(e).__name__}") from e

    def _job(
        self, req: ValidatedObservation, received: float, deadline_ms: int | None, deadline_s: float | None,
        session: Session | None, transport: str,
    ) -> Job:
        budget = (deadline_ms / 1000.0) if deadline_ms else self.config.deadline_s
        if deadline_s is not None:
            budget = min(budget, deadline_s)
        deadline = received + budget
        if time.monotonic() >= deadline:
            raise ServeError(Code.DEADLINE_EXCEEDED, "deadline passed while decoding")
        seed = req.seed or (None if self.config.zero_noise else random.getrandbits(63) or 1)
        return Job(req, received, deadline, seed, transport, session=session)

    def _track(self, session: Session) -> None:
        session.update_idle()
        if session.inflight or session.pending is not None:
            self._with_work.add(session.id)
        else:
            self._with_work.discard(session.id)

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ServeError(Code.UNAVAILABLE, "server is draining; reconnect to another replica", reason="draining")

    def _reserve(self, can_replace: bool, budget_s: float) -> None:
        """Admit one observation, or refuse it at once (before any decoding): when `max_queue` are
        admitted already, or when the expected wait (observations ahead x the recent cost of one)
        would not leave it time to be answered within its deadline (never when none is admitted). A
        late chunk is a wasted chunk: refusing it keeps the server's time for the ones that can still
        make it."""
        # One that replaces a waiting observation of its session adds no load: always admitted.
        if not can_replace and self._admitted >= self.config.max_queue:
            raise ServeError(
                Code.RESOURCE_EXHAUSTED, f"server is at capacity ({self.config.max_queue} observations queued)",
                reason="overload",
            )
        # An idle server admits one whatever the estimate says: nothing waits ahead of it, and the estimate
        # only moves when an observation is answered, so refusing here would refuse for good after one slow
        # observation (a cold first call on a busy host: 7.8 s against a 5 s deadline; benchmarks/hostile.py).
        if not can_replace and self._per_obs_s > 0 and self._admitted > 0:
            expected = (self._admitted + 1) * self._per_obs_s
            if expected > ADMISSION_HEADROOM * budget_s:  # headroom: batches form in steps, costs vary
                raise ServeError(
                    Code.RESOURCE_EXHAUSTED,
                    f"server is overloaded: expected wait {expected * 1e3:.0f} ms exceeds the "
                    f"{budget_s * 1e3:.0f} ms deadline", reason="overload",
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
        h.labels(stage=STAGE_QUEUE).observe(t.queue_ms / 1e3)
        h.labels(stage=STAGE_PREPROCESS).observe(t.preprocess_ms / 1e3)
        h.labels(stage=STAGE_REASONING).observe(t.reasoning_ms / 1e3)
        h.labels(stage=STAGE_EXPERT).observe(t.expert_ms / 1e3)
        h.labels(stage=STAGE_TOTAL).observe(t.total_ms / 1e3)
