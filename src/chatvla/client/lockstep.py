"""Simulated time for simulated robots: every chunk lands a fixed number of ticks after its observation.

Why: on wall time a closed-loop episode's outcome depends on how fast the host answered that day. A
chunk that lands a tick later is executed from a later row, the arm comes down a few millimetres
elsewhere, and a grasp that worked misses. The same checkpoint completed 22 of 50 evaluation episodes
on one day and 11 of 50 on a busier one; three simulated robots sharing two cores with the server
were enough to tell the two apart. A number that moves with the host says little about the model.

A simulated robot does not need wall time: its physics advances one tick per command. Here the
control loop reads a `SimClock` that advances only when the loop sleeps to its next tick, and a
`LockstepConnection` delivers the answer to the observation of tick `t` exactly at tick
`t + latency_ticks`. If the server has not answered by then in wall time, simulated time waits for it
(the arm is frozen in the simulation, not held); an answer that comes sooner is held back until its
tick. The episode then depends only on the model, the task and the stated latency, whatever the host's
speed or load, and a latency sweep shows how fast a server has to be for a given success rate.

Only for simulated robots: a real arm cannot wait for the server, which is what `MonotonicClock` and
the plain connection are for (and what `chatvla eval --real-time` measures).
"""

from __future__ import annotations

import random
import threading
import time

from chatvla.client.connection import (
    ChunkReply,
    ObservationRequest,
    PolicyConnection,
    PolicyError,
    PolicyEvent,
    RequestFailed,
)

# Ticks from an observation to its chunk in evaluations: 133 ms at 15 Hz, the median round trip one
# simulated robot measured against the shipped model on a 2-core CPU (to the tick).
DEFAULT_LATENCY_TICKS = 2
WAIT_POLL_S = 0.001  # wall time between polls of the real connection while simulated time waits


class SimClock:
    """Simulated seconds that only move when told to: `sleep_until` jumps instead of sleeping, so a loop
    of N ticks takes only the time its work takes."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds

    def sleep_until(self, deadline: float) -> None:
        with self._lock:
            self._t = max(self._t, deadline)


class LockstepConnection(PolicyConnection):
    """Wraps a real connection so each answer arrives `latency_ticks` ticks (of `dt` on `clock`) after
    its observation was sent, no sooner and no later.

    `poll` blocks (in wall time) while an answer that is due has not come yet, at most `wait_s` per
    answer; an answer still missing then is left to the executor's own timeout, as a lost one would be.
    """

    def __init__(self, inner: PolicyConnection, clock: SimClock, dt: float, latency_ticks: int, *,
                 jitter_ticks: int = 0, seed: int = 0, wait_s: float = 120.0) -> None:
        if latency_ticks < 0 or jitter_ticks < 0:
            raise ValueError("latency_ticks and jitter_ticks must be >= 0")
        self.inner = inner
        self.clock = clock
        self.dt = dt
        self.latency_ticks = latency_ticks
        # Each answer's latency is drawn from latency_ticks .. latency_ticks + jitter_ticks (seeded, so
        # still the same episode every run): what a loaded network or server does to a real arm.
        self.jitter_ticks = jitter_ticks
        self._rng = random.Random(seed)
        self.wait_s = wait_s
        self._due: dict[int, int] = {}  # seq -> the tick its answer is delivered at
        self._held: list[PolicyEvent] = []  # answers received, waiting for their tick
        self.waited_s = 0.0  # wall time simulated time spent waiting for the server (diagnostics)
        self.given_up = 0  # answers not delivered within `wait_s`

    @property  # type: ignore[override]
    def fatal_error(self) -> PolicyError | None:
        return self.inner.fatal_error

    def start(self) -> None:
        self.inner.start()

    def close(self) -> None:
        self.inner.close()

    def _tick_now(self) -> int:
        return round(self.clock.now() / self.dt)

    def submit(self, request: ObservationRequest) -> int:
        seq = self.inner.submit(request)
        extra = self._rng.randint(0, self.jitter_ticks) if self.jitter_ticks else 0
        self._due[seq] = self._tick_now() + self.latency_ticks + extra
        return seq

    def _answered(self, seq: int) -> bool:
        return any(isinstance(e, (ChunkReply, RequestFailed)) and e.seq == seq for e in self._held)

    def poll(self) -> list[PolicyEvent]:
        self._held.extend(self.inner.poll())
        tick = self._tick_now()
        for seq in sorted(s for s, due in self._due.items() if due <= tick):
            start = time.monotonic()
            while not self._answered(seq) and time.monotonic() - start < self.wait_s:
                time.sleep(WAIT_POLL_S)
                self._held.extend(self.inner.poll())
            self.waited_s += time.monotonic() - start
            if not self._answered(seq):
                self.given_up += 1
                del self._due[seq]
        out: list[PolicyEvent] = []
        keep: list[PolicyEvent] = []
        for e in self._held:
            if isinstance(e, (ChunkReply, RequestFailed)):
                due = self._due.get(e.seq)
                if due is not None and due > tick:
                    keep.append(e)
                    continue
                self._due.pop(e.seq, None)
            out.append(e)  # due now, or not ours to time (connection changes, unknown seqs)
        self._held = keep
        return out
