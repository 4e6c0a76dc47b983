"""Simulated time for sim evaluations: each answer lands exactly `latency_ticks` after its observation,
however long the real server took, so an episode's outcome does not depend on the host's speed."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from chatvla.client.connection import (
    ChunkReply,
    ConnectionChanged,
    ObservationRequest,
    PolicyConnection,
    PolicyEvent,
    RequestFailed,
    Unavailable,
)
from chatvla.client.executor import ChunkExecutor
from chatvla.client.fakes import FakeRobot
from chatvla.client.lockstep import LockstepConnection, SimClock
from chatvla.client.runtime import ControlLoop, TickRecord
from chatvla.client.safety import SafetyFilter


class WallServer(PolicyConnection):
    """A server on wall time: answers each observation from another thread after `delay(seq)` seconds
    (None: never), with rows that are the ticks they belong to."""

    def __init__(self, chunk: int, delay=lambda seq: 0.0, fail=lambda seq: False) -> None:
        self.chunk, self.delay, self.fail = chunk, delay, fail
        self._events: list[PolicyEvent] = []
        self._lock = threading.Lock()
        self._seq = 0

    def push(self, event: PolicyEvent) -> None:
        with self._lock:
            self._events.append(event)

    def submit(self, request: ObservationRequest) -> int:
        self._seq += 1
        seq, d = self._seq, self.delay(self._seq)
        if d is None:
            return seq
        rows = (request.tick + np.arange(self.chunk, dtype=np.float32))[:, None]
        event: PolicyEvent = (RequestFailed(seq, Unavailable("down"), time.monotonic()) if self.fail(seq)
                              else ChunkReply(seq, request.tick, rows, received_at=time.monotonic()))
        if d == 0:
            self.push(event)
        else:
            threading.Timer(d, self.push, args=(event,)).start()
        return seq

    def poll(self) -> list[PolicyEvent]:
        with self._lock:
            out, self._events = self._events, []
        return out


def request(tick: int) -> ObservationRequest:
    return ObservationRequest(tick=tick, images={}, state=np.zeros(1, np.float32))


DT = 0.1


def at_tick(clock: SimClock, tick: int) -> None:
    clock.sleep_until(tick * DT)


def test_an_early_answer_is_held_back_until_its_tick() -> None:
    clock = SimClock()
    conn = LockstepConnection(WallServer(4), clock, DT, latency_ticks=2)
    seq = conn.submit(request(0))
    assert conn.poll() == []  # tick 0: answered on the wall already, not due
    at_tick(clock, 1)
    assert conn.poll() == []
    at_tick(clock, 2)
    (reply,) = conn.poll()
    assert isinstance(reply, ChunkReply) and reply.seq == seq and reply.tick == 0


def test_a_late_answer_is_waited_for_at_its_tick() -> None:
    clock = SimClock()
    conn = LockstepConnection(WallServer(4, delay=lambda seq: 0.05), clock, DT, latency_ticks=1)
    conn.submit(request(0))
    at_tick(clock, 1)
    (reply,) = conn.poll()  # blocks until the server answers: simulated time waits for it
    assert isinstance(reply, ChunkReply) and reply.tick == 0
    assert conn.waited_s > 0


def test_failures_land_on_their_tick_too_and_connection_changes_at_once() -> None:
    clock = SimClock()
    server = WallServer(4, fail=lambda seq: True)
    conn = LockstepConnection(server, clock, DT, latency_ticks=3)
    conn.submit(request(0))
    server.push(ConnectionChanged(False, "x", 0.0))
    (changed,) = conn.poll()
    assert isinstance(changed, ConnectionChanged)
    at_tick(clock, 3)
    (failed,) = conn.poll()
    assert isinstance(failed, RequestFailed)


def test_an_answer_that_never_comes_is_given_up_after_the_wait() -> None:
    clock = SimClock()
    conn = LockstepConnection(WallServer(4, delay=lambda seq: None), clock, DT, latency_ticks=1, wait_s=0.02)
    conn.submit(request(0))
    at_tick(clock, 1)
    assert conn.poll() == [] and conn.given_up == 1
    at_tick(clock, 2)
    assert conn.poll() == []  # not waited for again: the executor's own timeout takes it from here


def test_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="latency_ticks"):
        LockstepConnection(WallServer(4), SimClock(), DT, latency_ticks=-1)


def run_loop(profile, delays, latency_ticks: int, ticks: int = 80) -> list[TickRecord]:
    clock = SimClock()
    rng = random.Random(delays)
    server = WallServer(profile.chunk_size, delay=lambda seq: rng.choice([0.0, 0.0, 0.002, 0.01]) if delays else 0.0)
    records: list[TickRecord] = []

    class Rec:
        def on_tick(self, r: TickRecord) -> None:
            records.append(r)

    loop = ControlLoop(FakeRobot(profile, clock=clock), LockstepConnection(server, clock, profile.dt, latency_ticks),
                       ChunkExecutor(profile), SafetyFilter(profile), clock=clock, observers=[Rec()])
    loop.run(max_ticks=ticks)
    return records


@pytest.mark.parametrize("latency_ticks", [0, 1, 3])
def test_in_the_loop_every_chunk_lands_latency_ticks_after_its_observation(counter, latency_ticks) -> None:
    """Below half a chunk (8 ticks here) the executor asks early enough that the arm never waits."""
    records = run_loop(counter, delays=1, latency_ticks=latency_ticks)
    replies = [(r.tick, reply.tick) for r in records for reply in r.replies]
    assert replies and all(at == sent + latency_ticks for at, sent in replies)
    first = next(r.tick for r in records if r.proposed is not None)
    assert first == latency_ticks  # the first chunk's first usable row
    assert all(r.proposed is not None and float(r.proposed[0]) == r.tick for r in records[first:])


def test_the_same_episode_whatever_the_server_took(counter) -> None:
    """Wall delays that vary from answer to answer (a loaded host) change nothing the robot does."""
    fast = run_loop(counter, delays=0, latency_ticks=3)
    jittery = run_loop(counter, delays=7, latency_ticks=3)
    assert [r.sent_seq for r in fast] == [r.sent_seq for r in jittery]
    assert [None if r.proposed is None else r.proposed.tolist() for r in fast] == \
        [None if r.proposed is None else r.proposed.tolist() for r in jittery]


def test_jitter_draws_each_latency_in_its_range_the_same_way_every_run() -> None:
    def due_ticks(seed: int) -> list[int]:
        clock = SimClock()
        conn = LockstepConnection(WallServer(4), clock, DT, latency_ticks=2, jitter_ticks=3, seed=seed)
        out = []
        for k in range(40):
            at_tick(clock, 10 * k)
            conn.submit(request(10 * k))
            for t in range(10 * k, 10 * k + 6):
                at_tick(clock, t)
                if conn.poll():
                    out.append(t - 10 * k)
        return out

    first = due_ticks(5)
    assert len(first) == 40 and set(first) == {2, 3, 4, 5}
    assert due_ticks(5) == first
