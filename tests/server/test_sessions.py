"""A session's state rules, without a server: slots, seq order, in-order emission, refresh decisions."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.engines.base import EngineObservation
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ReasoningPolicy, SessionConfig, ValidatedObservation
from chatvla.server.sessions import Job, ReasoningCache, Session, TextRef


def session(every_n: int = 1, every_seconds: float = 0.0, k: int = 2) -> tuple[Session, list]:
    out: list = []
    cfg = SessionConfig(cameras=("front",), instruction="go", robot_id="r",
                        reasoning=ReasoningPolicy(every_n=every_n, every_seconds=every_seconds))
    return Session(cfg, lambda seq, r: out.append((seq, r)), "r", "test", max_in_flight=k), out


def job(seq: int, instruction: str = "go", force: bool = False) -> Job:
    obs = EngineObservation(images={}, state=np.zeros(1, np.float32), instruction=instruction)
    return Job(ValidatedObservation(obs, seq=seq, force_reasoning=force), received=0.0, deadline=10.0, seed=1,
               transport="test")


def test_seq_must_increase():
    s, _ = session()
    s.check_seq(1)
    s.check_seq(5)
    with pytest.raises(ServeError) as e:
        s.check_seq(5)
    assert e.value.code is Code.INVALID_ARGUMENT and e.value.field == "observation.seq"


def test_slots_count_unanswered_jobs_only():
    s, _ = session(k=2)
    a, b = job(1), job(2)
    s.inflight.extend([a, b])
    assert not s.has_slot and s.can_replace
    a.answer = ServeError(Code.ABORTED, "x")  # answered, waiting to be emitted in order
    assert s.has_slot and not s.can_replace


def test_answers_are_emitted_in_seq_order_and_idle_follows():
    s, out = session()
    a, b = job(1), job(2)
    s.inflight.extend([a, b])
    s.update_idle()
    b.answer = "chunk 2"  # type: ignore[assignment]
    s.emit_ready()
    assert out == [] and not s._idle.is_set()  # 2 waits for 1
    a.answer = "chunk 1"  # type: ignore[assignment]
    s.emit_ready()
    assert out == [(1, "chunk 1"), (2, "chunk 2")] and s._idle.is_set()


def test_a_closed_session_emits_nothing():
    s, out = session()
    s.closed = True
    s.emit(1, "chunk")  # type: ignore[arg-type]
    assert out == []


def test_refresh_reasons_in_priority_order():
    s, _ = session(every_n=3, every_seconds=2.0)
    assert s.refresh_reason(job(1), now=0.0) == "first"
    s.cache = ReasoningCache(text=TextRef("t", (1,), seq=1, written_at=0.0), instruction="go", since_refresh=0)
    assert s.refresh_reason(job(2), now=0.5) is None
    assert s.refresh_reason(job(2, instruction="other"), now=0.5) == "instruction"
    assert s.refresh_reason(job(2, force=True), now=0.5) == "forced"
    s.cache.since_refresh = 2
    assert s.refresh_reason(job(2), now=0.5) == "every_n"
    s.cache.since_refresh = 0
    assert s.refresh_reason(job(2), now=2.5) == "interval"


def test_what_waits_for_its_own_text():
    dual, _ = session(every_n=4)
    every, _ = session(every_n=1)
    for reason in ("first", "instruction", "forced"):
        assert dual.must_wait_for_text(reason) and every.must_wait_for_text(reason)
    assert not dual.must_wait_for_text("every_n")  # a dual-rate refresh decodes in the background
    assert not dual.must_wait_for_text("interval")
    assert every.must_wait_for_text("every_n")  # every_n = 1: each observation gets its own text
