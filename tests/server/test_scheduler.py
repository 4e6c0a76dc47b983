"""The scheduler's contract on its own, without a transport: stateless calls, bounded admission,
sessions (pipelining, supersede, closing), dual-rate reasoning (wait for new text, re-use the cached
text, refresh in the background), deadlines, and drain. Driven by the NullEngine and the serverkit
fakes; queueing is made by holding the engine, never by timing (only deadlines are let pass by a
sleep just past them)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import numpy as np
import pytest
from serverkit import CAMERAS, GatedEngine, eventually, image, state_vec

from chatvla.engines.base import ActItem, EngineObservation, ReasoningResult, ReasonItem
from chatvla.engines.null import REASONING_TEMPLATE, NullEngine
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, ReasoningPolicy, SessionConfig, ValidatedObservation
from chatvla.server.metrics import Metrics
from chatvla.server.scheduler import Scheduler, SchedulerConfig
from chatvla.server.sessions import Session

INSTRUCTION = "pick up the red block"

MakeScheduler = Callable[..., Awaitable[Scheduler]]


@pytest.fixture
async def scheduler() -> AsyncIterator[MakeScheduler]:
    """`await scheduler(engine, **SchedulerConfig fields)` -> a started Scheduler, closed after the test
    (a held engine is released first, so a failing test cannot hang the teardown)."""
    made: list[Scheduler] = []

    async def make(engine: NullEngine | None = None, **config: object) -> Scheduler:
        s = Scheduler(engine or NullEngine(), SchedulerConfig(**config), Metrics())  # type: ignore[arg-type]
        await s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        release = getattr(s.engine, "release", None)
        if release is not None:
            release()
        await s.close()


def observation(seq: int = 1, instruction: str = INSTRUCTION, **kw: object) -> ValidatedObservation:
    """What a transport's `decode` hands the scheduler: a valid observation for the NullEngine's profile."""
    obs = EngineObservation(images={c: image() for c in CAMERAS}, state=state_vec(), instruction=instruction)
    return ValidatedObservation(obs, seq=seq, tick=seq * 10, seed=kw.pop("seed", 7), **kw)  # type: ignore[arg-type]


def sample(s: Scheduler, name: str, **labels: str) -> float:
    """A metric's value (0 when the series does not exist yet)."""
    v = s.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


class Emitted:
    """A session's `emit`: records (seq, answer) in the order the scheduler hands them to the transport."""

    def __init__(self) -> None:
        self.items: list[tuple[int, ChunkResult | ServeError]] = []

    def __call__(self, seq: int, result: ChunkResult | ServeError) -> None:
        self.items.append((seq, result))

    async def first(self, n: int) -> list[tuple[int, ChunkResult | ServeError]]:
        """The first `n` answers, once they have all been emitted."""
        await eventually(lambda: len(self.items) >= n)
        return self.items[:n]

    def chunk(self, seq: int) -> ChunkResult:
        """The one answer emitted for `seq`, which must be a chunk (each seq is answered exactly once)."""
        [answer] = [r for s, r in self.items if s == seq]
        assert isinstance(answer, ChunkResult), answer
        return answer

    def error(self, seq: int) -> ServeError:
        """The one answer emitted for `seq`, which must be a refusal."""
        [answer] = [r for s, r in self.items if s == seq]
        assert isinstance(answer, ServeError), answer
        return answer


def open_session(s: Scheduler, every_n: int = 1, max_in_flight: int = 0, deadline_ms: int = 0,
                 every_seconds: float = 0.0) -> tuple[Session, Emitted]:
    """A session as a transport opens it, with an `Emitted` recorder as its stream."""
    cfg = SessionConfig(cameras=CAMERAS, instruction=INSTRUCTION, robot_id="r",
                        reasoning=ReasoningPolicy(every_n=every_n, every_seconds=every_seconds),
                        default_deadline_ms=deadline_ms, max_in_flight=max_in_flight)
    out = Emitted()
    return s.open_session(cfg, out, "r", "test"), out


async def send(s: Scheduler, session: Session, seq: int, instruction: str | None = None, **kw: object) -> None:
    """Submit observation `seq` as a transport does: an observation without an instruction keeps the
    session's current one (which `submit` hands to `decode`)."""
    await s.submit(session, seq, lambda current: observation(seq, instruction or current, **kw))


async def answered(s: Scheduler, session: Session, seq: int, emitted: Emitted, **kw: object) -> ChunkResult:
    """Send `seq` and wait for its chunk (closed loop: one observation at a time)."""
    await send(s, session, seq, **kw)
    await eventually(lambda: any(q == seq for q, _ in emitted.items))
    return emitted.chunk(seq)


class HeldDecode(NullEngine):
    """Decodes run until the test lets them finish (`finish`), yielding between "tokens" as a model
    does: a background refresh that takes exactly as long as the test needs, with no timing guesses."""

    def __init__(self) -> None:
        super().__init__()
        self.finish = threading.Event()
        self.finish.set()
        self.holding = threading.Event()  # a decode is being held

    def reason_batch(self, items: Sequence[ReasonItem], yield_point: Callable[[], None] | None = None
                     ) -> list[ReasoningResult]:
        if any(it.reasoning is None and it.reasoning_token_ids is None for it in items):
            while not self.finish.wait(0.002):
                self.holding.set()
                if yield_point is not None:
                    yield_point()
            self.holding.clear()
        return super().reason_batch(items, yield_point)

    def release(self) -> None:
        self.finish.set()


# --- stateless calls ------------------------------------------------------------------------------


async def test_a_stateless_infer_returns_the_chunk_for_its_state_and_seed_with_reasoning_written_for_it(scheduler):
    s = await scheduler()
    chunk = await s.infer(lambda: observation(seq=4, seed=11), transport="test")
    assert (chunk.seq, chunk.tick) == (4, 40)
    assert (chunk.actions == s.engine.actions_for(state_vec(), 11)).all()
    assert chunk.reasoning == REASONING_TEMPLATE.format(instruction=INSTRUCTION)
    assert chunk.reasoning_refreshed and chunk.reasoning_tokens > 0 and chunk.reasoning_seq == 4
    assert chunk.timings.total_ms >= chunk.timings.expert_ms > 0
    assert s.admitted == 0
    assert sample(s, "chatvla_requests_total", transport="test", outcome="ok") == 1
    assert sample(s, "chatvla_reasoning_refresh_total", reason="stateless") == 1


async def test_supplied_reasoning_is_prefilled_and_echoed_instead_of_decoded(scheduler):
    s = await scheduler()
    chunk = await s.infer(lambda: observation(reasoning="go left first"), transport="test")
    assert (chunk.reasoning, chunk.reasoning_refreshed, chunk.reasoning_tokens) == ("go left first", False, 0)
    assert sample(s, "chatvla_reasoning_refresh_total", reason="stateless") == 0


async def test_a_bad_stateless_observation_raises_its_error_and_frees_its_place(scheduler):
    s = await scheduler()

    def invalid() -> ValidatedObservation:
        raise ServeError(Code.INVALID_ARGUMENT, "bad state", "state")

    def buggy() -> ValidatedObservation:
        raise ValueError("decoder bug")

    with pytest.raises(ServeError) as e:
        await s.infer(invalid, transport="test")
    assert (e.value.code, e.value.field) == (Code.INVALID_ARGUMENT, "state")
    with pytest.raises(ServeError) as e:
        await s.infer(buggy, transport="test")
    assert e.value.code is Code.INTERNAL and "ValueError" in e.value.message  # a decoder bug is INTERNAL
    assert s.admitted == 0
    assert (await s.infer(observation, transport="test")).seq == 1


async def test_a_caller_that_goes_away_takes_its_queued_work_back(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    engine.hold()
    blocker = asyncio.create_task(s.infer(observation, transport="test"))
    await engine.wait_entered()
    gone = asyncio.create_task(s.infer(observation, transport="test"))
    await eventually(lambda: s.admitted == 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert s.admitted == 1  # withdrawn at once, not computed for nobody
    engine.release()
    await blocker
    assert engine.batches["reasoning"] == [1] and s.admitted == 0


# --- admission ------------------------------------------------------------------------------------


async def test_admission_beyond_max_queue_is_refused_at_once_with_resource_exhausted_before_decoding(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine, max_queue=2)
    session, out = open_session(s)
    engine.hold()
    first = asyncio.create_task(s.infer(observation, transport="test"))
    await engine.wait_entered()
    second = asyncio.create_task(s.infer(observation, transport="test"))
    await eventually(lambda: s.admitted == 2)
    decoded: list[int] = []

    def decode() -> ValidatedObservation:
        decoded.append(1)
        return observation()

    with pytest.raises(ServeError) as e:
        await s.infer(decode, transport="test")
    assert (e.value.code, e.value.reason) == (Code.RESOURCE_EXHAUSTED, "overload")
    await s.submit(session, 1, lambda instruction: decode())
    assert out.error(1).code is Code.RESOURCE_EXHAUSTED  # a session's observation: answered for its seq
    assert decoded == [] and s.admitted == 2  # refused before any decoding; nothing admitted
    assert sample(s, "chatvla_rejected_total", reason="overload") == 2
    engine.release()
    assert (await first).actions is not None and (await second).actions is not None
    assert s.admitted == 0


async def test_sessions_beyond_max_sessions_are_refused_until_one_closes(scheduler):
    s = await scheduler(max_sessions=1)
    first, _ = open_session(s)
    with pytest.raises(ServeError) as e:
        open_session(s)
    assert (e.value.code, e.value.reason) == (Code.RESOURCE_EXHAUSTED, "sessions_limit")
    assert sample(s, "chatvla_rejected_total", reason="sessions_limit") == 1
    s.close_session(first)
    open_session(s)
    assert sample(s, "chatvla_active_sessions") == 1


# --- sessions -------------------------------------------------------------------------------------


async def test_a_session_computes_up_to_max_in_flight_at_once_and_answers_in_seq_order(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine, max_in_flight=3)
    session, out = open_session(s, max_in_flight=8)
    assert session.max_in_flight == 3  # the smaller of the session's wish and the server's limit
    engine.hold()
    await send(s, session, 1)
    await engine.wait_entered()
    await send(s, session, 2)  # not parked behind 1: queued for the next batch
    await send(s, session, 3)
    assert out.items == [] and s.admitted == 3
    await send(s, session, 4)  # a fourth has no slot: it replaces 3, the newest that no batch has taken
    assert [(q, r.code, r.reason) for q, r in out.items] == [(3, Code.ABORTED, "superseded")]
    engine.release()
    answers = await out.first(4)
    assert [(q, type(r).__name__) for q, r in answers[1:]] == [(1, "ChunkResult"), (2, "ChunkResult"),
                                                               (4, "ChunkResult")]
    assert engine.batches["reasoning"] == [1, 2]  # 2 and 4 shared the batch after 1
    assert s.admitted == 0


async def test_a_newer_observation_withdraws_a_queued_older_one_of_its_session(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s, max_in_flight=1)
    engine.hold()
    blocker = asyncio.create_task(s.infer(observation, transport="test"))  # another robot holds the engine
    await engine.wait_entered()
    await send(s, session, 1)  # queued for reasoning
    await send(s, session, 2)  # replaces it
    err = out.error(1)
    assert (err.code, err.reason) == (Code.ABORTED, "superseded") and "seq 2" in err.message
    engine.release()
    await blocker
    await out.first(2)
    assert out.chunk(2).seq == 2
    assert engine.batches["reasoning"] == [1, 1]  # seq 1 was never computed
    assert sample(s, "chatvla_rejected_total", reason="superseded") == 1


async def test_a_newer_observation_replaces_the_pending_one_even_with_admission_full(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine, max_queue=2)
    session, out = open_session(s, max_in_flight=1)
    engine.hold()
    await send(s, session, 1)
    await engine.wait_entered()  # 1 is computing: it cannot be taken back
    await send(s, session, 2)  # waits in the pending slot
    assert s.admitted == 2 and out.items == []
    await send(s, session, 3)  # replaces 2: adds no load, so admitted although the server is full
    assert out.error(2).reason == "superseded" and s.admitted == 2
    engine.release()
    answers = await out.first(3)
    assert [q for q, _ in answers] == [2, 1, 3]
    assert out.chunk(1).seq == 1 and out.chunk(3).seq == 3 and s.admitted == 0


async def test_a_bad_observation_is_answered_for_its_seq_and_the_session_carries_on(scheduler):
    s = await scheduler()
    session, out = open_session(s)

    def invalid(instruction: str) -> ValidatedObservation:
        raise ServeError(Code.INVALID_ARGUMENT, "bad image", "images[front]")

    await s.submit(session, 1, invalid)
    await answered(s, session, 2, out)
    await s.submit(session, 2, invalid)  # seq must increase: refused before decoding
    assert out.error(1).field == "images[front]"
    assert [(q, type(r).__name__) for q, r in out.items] == [(1, "ServeError"), (2, "ChunkResult"),
                                                             (2, "ServeError")]
    assert out.items[2][1].field == "observation.seq"
    assert (await answered(s, session, 3, out)).seq == 3 and s.admitted == 0


async def test_closing_a_session_drops_its_pending_work_and_lets_the_computing_one_finish_unseen(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s, max_in_flight=1)
    engine.hold()
    await send(s, session, 1)
    await engine.wait_entered()
    await send(s, session, 2)  # pending
    assert s.admitted == 2
    s.close_session(session)
    assert s.admitted == 1 and session.id not in s.sessions  # 2 dropped at once; 1 is in the engine
    assert sample(s, "chatvla_active_sessions") == 0
    await send(s, session, 3)  # a straggler for the closed stream is dropped
    engine.release()
    await eventually(lambda: s.admitted == 0)
    assert out.items == []  # nothing is emitted to a closed stream
    assert engine.batches["expert"] == [1]  # 1 did finish computing


async def test_closing_a_session_withdraws_its_queued_work_before_any_batch_takes_it(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s, max_in_flight=2)
    engine.hold()
    blocker = asyncio.create_task(s.infer(observation, transport="test"))
    await engine.wait_entered()
    await send(s, session, 1)
    await send(s, session, 2)
    assert s.admitted == 3
    s.close_session(session)
    assert s.admitted == 1
    engine.release()
    await blocker
    assert engine.batches["reasoning"] == [1] and out.items == [] and s.admitted == 0


# --- reasoning ------------------------------------------------------------------------------------


async def test_a_sessions_first_observation_waits_for_its_text_and_later_ones_reuse_it(scheduler):
    s = await scheduler()
    session, out = open_session(s, every_n=3)
    first = await answered(s, session, 1, out)
    second = await answered(s, session, 2, out)
    assert (first.reasoning_refreshed, first.reasoning_seq) == (True, 1) and first.reasoning_tokens > 0
    assert (second.reasoning_refreshed, second.reasoning_seq, second.reasoning_tokens) == (False, 1, 0)
    assert second.reasoning == first.reasoning
    assert second.reasoning_age_ms > first.reasoning_age_ms >= 0  # the cached text has aged
    assert sample(s, "chatvla_reasoning_refresh_total", reason="first") == 1


async def test_with_every_n_1_every_observation_waits_for_text_written_for_it(scheduler):
    s = await scheduler()
    session, out = open_session(s, every_n=1)
    chunks = [await answered(s, session, seq, out) for seq in (1, 2, 3)]
    assert [(c.reasoning_refreshed, c.reasoning_seq) for c in chunks] == [(True, 1), (True, 2), (True, 3)]


async def test_a_new_instruction_or_force_reasoning_waits_for_new_text(scheduler):
    s = await scheduler()
    session, out = open_session(s, every_n=10)
    await answered(s, session, 1, out)
    moved = await answered(s, session, 2, out, instruction="now the blue one")
    assert (moved.reasoning_refreshed, moved.reasoning_seq) == (True, 2) and "now the blue one" in moved.reasoning
    kept = await answered(s, session, 3, out)  # no instruction: the session keeps the new one
    assert (kept.reasoning_refreshed, kept.reasoning_seq) == (False, 2) and "now the blue one" in kept.reasoning
    forced = await answered(s, session, 4, out, force_reasoning=True)
    assert (forced.reasoning_refreshed, forced.reasoning_seq) == (True, 4)
    assert sample(s, "chatvla_reasoning_refresh_total", reason="instruction") == 1
    assert sample(s, "chatvla_reasoning_refresh_total", reason="forced") == 1


async def test_supplied_reasoning_conditions_only_its_own_observation(scheduler):
    s = await scheduler()
    session, out = open_session(s, every_n=10)
    first = await answered(s, session, 1, out)
    given = await answered(s, session, 2, out, reasoning="go left first")
    after = await answered(s, session, 3, out)
    assert (given.reasoning, given.reasoning_refreshed, given.reasoning_seq) == ("go left first", False, 2)
    assert (after.reasoning, after.reasoning_seq) == (first.reasoning, 1)


async def test_observations_arriving_while_the_first_text_decodes_wait_for_that_text_not_their_own(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s, every_n=5, max_in_flight=3)
    engine.hold()
    await send(s, session, 1)
    await engine.wait_entered()
    await send(s, session, 2)
    engine.release()
    await out.first(2)
    assert [(c.reasoning_refreshed, c.reasoning_seq) for c in (out.chunk(1), out.chunk(2))] == [(True, 1),
                                                                                               (False, 1)]
    assert sample(s, "chatvla_reasoning_refresh_total", reason="first") == 1


async def test_an_observation_waiting_for_its_new_instructions_text_never_gets_the_old_instructions_text(
        scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s, every_n=5, max_in_flight=3)
    engine.hold()
    await send(s, session, 1)  # decodes for the start instruction
    await engine.wait_entered()
    await send(s, session, 2, instruction="now the blue one")  # decodes for the new instruction
    await send(s, session, 3)  # same new instruction: waits for 2's text
    engine.release()
    await out.first(3)
    third = out.chunk(3)
    assert "now the blue one" in third.reasoning and (third.reasoning_refreshed, third.reasoning_seq) == (False, 2)
    assert "now the blue one" in out.chunk(2).reasoning and INSTRUCTION in out.chunk(1).reasoning


async def test_a_due_refresh_decodes_in_the_background_while_chunks_keep_coming_from_the_cache(scheduler):
    engine = HeldDecode()
    s = await scheduler(engine)
    session, out = open_session(s, every_n=2)
    await answered(s, session, 1, out)  # waits for its first text
    assert (await answered(s, session, 2, out)).reasoning_seq == 1
    engine.finish.clear()
    third = await answered(s, session, 3, out)  # due (every_n=2): a refresh is queued, the chunk does not wait
    assert await asyncio.to_thread(engine.holding.wait, 10)  # the refresh is decoding (and cannot finish)
    fourth = await answered(s, session, 4, out)
    fifth = await answered(s, session, 5, out)  # due again, but one refresh at a time
    assert engine.holding.is_set()  # both answered while the refresh was still decoding
    assert [(c.reasoning_refreshed, c.reasoning_seq) for c in (third, fourth, fifth)] == [(False, 1)] * 3
    assert sample(s, "chatvla_reasoning_refresh_total", reason="every_n") == 1
    engine.finish.set()
    await eventually(lambda: session.cache.text is not None and session.cache.text.seq == 3)
    sixth = await answered(s, session, 6, out)  # the new text replaced the cached one
    assert (sixth.reasoning_refreshed, sixth.reasoning_seq) == (False, 3)


# --- deadlines ------------------------------------------------------------------------------------


async def test_a_deadline_passed_when_the_batch_is_formed_is_answered_deadline_exceeded_and_never_computed(
        scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    engine.hold()
    blocker = asyncio.create_task(s.infer(observation, transport="test"))
    await engine.wait_entered()
    late = asyncio.create_task(s.infer(observation, transport="test", deadline_s=0.05))
    await eventually(lambda: s.admitted == 2)
    await asyncio.sleep(0.06)  # its deadline passes while the engine is busy
    engine.release()
    with pytest.raises(ServeError) as e:
        await late
    assert e.value.code is Code.DEADLINE_EXCEEDED
    await blocker
    assert engine.batches["reasoning"] == [1] and s.admitted == 0
    assert sample(s, "chatvla_requests_total", transport="test", outcome="deadline_exceeded") == 1


async def test_a_deadline_that_passes_while_decoding_is_deadline_exceeded_at_once(scheduler):
    s = await scheduler()

    def slow() -> ValidatedObservation:
        time.sleep(0.005)
        return observation(deadline_ms=1)

    with pytest.raises(ServeError) as e:
        await s.infer(slow, transport="test")
    assert e.value.code is Code.DEADLINE_EXCEEDED and "decoding" in e.value.message
    assert s.admitted == 0 and s.engine.batches["reasoning"] == []


async def test_a_pending_observation_whose_deadline_passed_behind_the_previous_one_is_deadline_exceeded(
        scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s, max_in_flight=1, deadline_ms=50)
    engine.hold()
    await send(s, session, 1, deadline_ms=10_000)
    await engine.wait_entered()
    await send(s, session, 2)  # pending behind 1, with the session's 50 ms deadline
    await asyncio.sleep(0.06)
    engine.release()
    await out.first(2)
    assert out.chunk(1).seq == 1
    err = out.error(2)
    assert err.code is Code.DEADLINE_EXCEEDED and "behind the previous" in err.message
    assert engine.batches["reasoning"] == [1] and s.admitted == 0


class HeldExpert(NullEngine):
    """A NullEngine whose expert batches wait at a gate (GatedEngine holds the reasoning stage only)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        return super().act_batch(items)

    def release(self) -> None:
        self.gate.set()


async def test_a_chunk_that_finishes_computing_is_delivered_even_past_its_deadline(scheduler):
    engine = HeldExpert()
    s = await scheduler(engine)
    call = asyncio.create_task(s.infer(observation, transport="test", deadline_s=0.05))
    assert await asyncio.to_thread(engine.entered.wait, 10)
    await asyncio.sleep(0.06)  # the deadline passes inside the expert batch
    engine.release()
    chunk = await call
    assert chunk.timings.total_ms > 50 and chunk.actions is not None


# --- drain ----------------------------------------------------------------------------------------


async def test_after_stop_accepting_new_work_is_unavailable_and_drain_waits_for_admitted_work(scheduler):
    engine = GatedEngine()
    s = await scheduler(engine)
    session, out = open_session(s)
    engine.hold()
    admitted = asyncio.create_task(s.infer(observation, transport="test"))
    await engine.wait_entered()
    s.stop_accepting()
    with pytest.raises(ServeError) as e:
        await s.infer(observation, transport="test")
    assert (e.value.code, e.value.reason) == (Code.UNAVAILABLE, "draining")
    with pytest.raises(ServeError) as e:
        open_session(s)
    assert e.value.code is Code.UNAVAILABLE
    await send(s, session, 1)
    assert out.error(1).code is Code.UNAVAILABLE
    assert not await s.drain(0.05)  # the admitted call is still computing
    drained = asyncio.create_task(s.drain(10))
    await asyncio.sleep(0)
    assert not drained.done()
    engine.release()
    assert await drained
    assert (await admitted).actions is not None


async def test_drain_with_nothing_admitted_is_done_at_once(scheduler):
    s = await scheduler()
    s.stop_accepting()
    assert await s.drain(1)
