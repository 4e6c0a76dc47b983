"""A virtual robot: replays episodes tick by tick through the real client path.

Each tick does what `ControlLoop.step` does for a real arm, minus the arm: drain the connection's events
into the `ChunkExecutor`, ask the executor whether to send an observation now (`should_request`: the
latency-aware request policy), send the recorded observation of this tick through `GrpcPolicyClient`,
and pop this tick's action (none = a stall). Ticks run at the recording's control rate on wall time;
if the load generator itself falls behind, the missed ticks are skipped (as the control loop does) and
counted as `generator_late_ticks`, so an overloaded client machine shows up in the report instead of
silently looking like a slow server.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chatvla.client.connection import (
    ChunkReply,
    ConnectionChanged,
    ObservationRequest,
    PolicyConnection,
    RequestFailed,
)
from chatvla.client.executor import ChunkExecutor, ExecutorConfig
from chatvla.client.loadtest.sources import ReplayEpisode
from chatvla.wire.vocabulary import TIMING_MS_FIELDS

# (seconds since the run started, robot index, client round trip ms, server ms in TIMING_MS_FIELDS order)
Sample = tuple[float, int, float, tuple[float, ...]]


@dataclass
class RobotStats:
    """What one virtual robot saw. Written by its own thread only; read by the progress line."""

    index: int
    started: bool = False
    finished: bool = False
    episodes: int = 0
    ticks: int = 0
    observations: int = 0
    chunks: int = 0
    stalls: int = 0
    startup_ticks: int = 0
    generator_late_ticks: int = 0
    errors: Counter = field(default_factory=Counter)  # PolicyError code -> count
    connects: int = 0
    disconnects: int = 0
    fatal: str = ""
    samples: list[Sample] = field(default_factory=list)


class SharedBudget:
    """A run-wide cap on observations sent (bounded in count as well as in time)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()
        self.exhausted = threading.Event()

    def take(self) -> bool:
        if self.limit is None:
            return True
        with self._lock:
            if self._used >= self.limit:
                self.exhausted.set()
                return False
            self._used += 1
            return True


class VirtualRobot(threading.Thread):
    def __init__(
        self,
        index: int,
        episodes: Sequence[ReplayEpisode],
        connect: Callable[[ReplayEpisode], PolicyConnection],
        *,
        t0: float,
        start_at: float,
        end_at: float,
        stop: threading.Event,
        budget: SharedBudget,
        executor_config: ExecutorConfig | None = None,
        max_samples: int = 200_000,
    ) -> None:
        super().__init__(name=f"loadtest-robot-{index}", daemon=True)
        self.index = index
        self.episodes = episodes
        self._connect = connect
        self.t0, self.start_at, self.end_at = t0, start_at, end_at
        self._halt = stop
        self.budget = budget
        self.executor_config = executor_config or ExecutorConfig()
        self.max_samples = max_samples
        self.stats = RobotStats(index)
        self.error: BaseException | None = None

    def _over(self) -> bool:
        return self._halt.is_set() or time.monotonic() >= self.end_at

    def run(self) -> None:
        try:
            if self._halt.wait(max(0.0, self.start_at - time.monotonic())):
                return
            self.stats.started = True
            first = self.episodes[self.index % len(self.episodes)]
            conn = self._connect(first)
            try:
                conn.start()
                k = self.index
                while not self._over():
                    self._play(conn, self.episodes[k % len(self.episodes)])
                    k += 1
                    fatal = conn.fatal_error
                    if fatal is not None:
                        self.stats.fatal = str(fatal)
                        break
            finally:
                conn.close()
        except BaseException as e:  # reported by the runner; a load generator must not hang on a bug
            self.error = e
        finally:
            self.stats.finished = True

    def _play(self, conn: PolicyConnection, ep: ReplayEpisode) -> None:
        s = self.stats
        executor = ChunkExecutor(ep.profile, self.executor_config)
        sent_at: dict[int, float] = {}
        first_seq: int | None = None
        dt = 1.0 / ep.rate_hz
        start = time.monotonic()
        tick = 0
        instruction: str | None = ep.instruction
        try:
            while tick < ep.length and not self._over():
                now = time.monotonic()
                for ev in conn.poll():
                    self._event(ev, executor, sent_at, first_seq, now)
                if conn.fatal_error is not None:
                    return
                if executor.should_request(tick, now) and self.budget.take():
                    images, state = ep.observation(tick)
                    seq = conn.submit(ObservationRequest(tick=tick, images=images, state=state,
                                                         instruction=instruction))
                    instruction = None  # the session keeps it until the next episode
                    sent_at[seq] = time.monotonic()
                    if first_seq is None:
                        first_seq = seq
                    executor.on_request_sent(seq, tick, now)
                    s.observations += 1
                elif self.budget.exhausted.is_set():
                    self._halt.set()
                executor.pop(tick)
                s.ticks += 1
                tick += 1
                due = start + tick * dt
                late = time.monotonic() - due
                if late > dt:  # the generator fell behind: skip ticks, as the control loop does
                    missed = int(late / dt)
                    tick += missed
                    s.generator_late_ticks += missed
                    due += missed * dt
                self._halt.wait(max(0.0, min(due, self.end_at) - time.monotonic()))
        finally:
            s.episodes += 1
            s.stalls += executor.stats.stalls
            s.startup_ticks += executor.stats.startup_ticks

    def _event(self, ev, executor: ChunkExecutor, sent_at: dict[int, float], first_seq: int | None,
               now: float) -> None:
        s = self.stats
        if isinstance(ev, ChunkReply):
            sent = sent_at.pop(ev.seq, None)
            if first_seq is None or ev.seq < first_seq or sent is None:
                return  # answers an observation of the previous episode
            executor.add_chunk(ev.actions, seq=ev.seq, tick=ev.tick, now=now)
            s.chunks += 1
            if len(s.samples) < self.max_samples:
                rtt = (ev.received_at - sent) * 1e3
                s.samples.append((sent - self.t0, self.index, rtt, tuple(float(ev.timings.get(k, 0.0))
                                                                      for k in TIMING_MS_FIELDS)))
        elif isinstance(ev, RequestFailed):
            sent_at.pop(ev.seq, None)
            executor.on_request_failed(ev.seq, now)
            s.errors[ev.error.code] += 1
        elif isinstance(ev, ConnectionChanged):
            if ev.connected:
                s.connects += 1
            else:
                s.disconnects += 1
