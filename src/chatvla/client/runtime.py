"""The robot-side control loop and the small interfaces it needs from its executor and subscribers.

One loop per robot ties Robot -> ChunkExecutor -> SafetyFilter -> Robot at the profile's control rate on
its own thread. It talks to the policy only through `PolicyConnection` (chatvla.client.connection), whose
`submit` and `poll` never block, so the arm keeps ticking whatever the network does. Time comes from a
`Clock`, so the same loop runs on wall time or on a fake clock.

The shape follows openpi-client's runtime (environment / agent / subscribers) but the agent is split in
two: a non-blocking connection and a tick-indexed queue, because a blocking `infer()` is exactly what
makes synchronous brokers stall.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from chatvla.client.connection import (
    ChunkReply,
    Clock,
    ConnectionChanged,
    MonotonicClock,
    ObservationRequest,
    PolicyConnection,
    RequestFailed,
)
from chatvla.client.executor import ChunkMerge
from chatvla.client.robots.base import Robot, RobotError, RobotObservation
from chatvla.client.safety import SafetyDecision, SafetyFilter, Verdict

log = logging.getLogger(__name__)


# ---- what the loop needs from its parts ----------------------------------------------------------
class ActionQueue(Protocol):
    """What the loop needs from an executor; `ChunkExecutor` is the real one, a synchronous broker
    (benchmarks/control_loop.py) implements it too for comparison."""

    def should_request(self, tick: int, now: float) -> bool: ...

    def on_request_sent(self, seq: int, tick: int, now: float) -> None: ...

    def on_request_failed(self, seq: int, now: float) -> None: ...

    def add_chunk(
        self, actions: np.ndarray, *, seq: int, now: float, tick: int | None = None,
        server_s: tuple[float, float] | None = None,
    ) -> ChunkMerge: ...

    def pop(self, tick: int) -> np.ndarray | None: ...


# ---- the loop ------------------------------------------------------------------------------------
def _override(text: str | None) -> str | None:
    """An empty override means none: on the wire an empty `reasoning` is "not set" anyway."""
    if text is not None and not isinstance(text, str):
        raise TypeError(f"reasoning override must be a string or None, not {type(text).__name__}")
    return text or None


@dataclass(frozen=True)
class TickRecord:
    """Everything that happened on one tick: what recording and live plots subscribe to."""

    tick: int
    time: float
    observation: RobotObservation
    replies: tuple[ChunkReply, ...]
    merges: tuple[ChunkMerge, ...]
    failures: tuple[RequestFailed, ...]
    sent_seq: int | None
    proposed: np.ndarray | None  # the executor's action; None = the queue was dry
    decision: SafetyDecision  # what the robot was told to do

    @property
    def executed(self) -> np.ndarray | None:
        return self.decision.action


class TickObserver(Protocol):
    def on_tick(self, record: TickRecord) -> None: ...


@dataclass
class LoopStats:
    ticks: int = 0
    missed_ticks: int = 0  # ticks skipped because a step overran its period
    commands: int = 0
    holds: int = 0
    stops: int = 0
    bad_chunks: int = 0
    failures: Counter = field(default_factory=Counter)  # PolicyError code -> count
    connected: bool = False
    last_error: str = ""
    last_reasoning: str = ""


class ControlLoop:
    """Runs one robot at its profile's control rate. Tick `n` is due at `t0 + n * dt`; if a step overruns,
    the ticks it missed are skipped (and their actions dropped), never executed late."""

    def __init__(
        self,
        robot: Robot,
        connection: PolicyConnection,
        executor: ActionQueue,
        safety: SafetyFilter,
        *,
        clock: Clock | None = None,
        observers: Sequence[TickObserver] = (),
        instruction: str | None = None,
        reasoning_override: str | None = None,
    ) -> None:
        self.robot = robot
        self.connection = connection
        self.executor = executor
        self.safety = safety
        self.clock: Clock = clock or MonotonicClock()
        self.observers = list(observers)
        self.dt = robot.profile.dt
        self.stats = LoopStats()
        self.error: BaseException | None = None
        self._pending_instruction = instruction
        self._pending_refresh = False
        self._reasoning_override = _override(reasoning_override)
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._tick = 0
        self._stop = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def tick(self) -> int:
        """The next tick to run."""
        return self._tick

    def set_instruction(self, text: str) -> None:
        """Change the task; the next observation sent carries it. Thread-safe."""
        with self._lock:
            self._pending_instruction = text

    def refresh_reasoning(self) -> None:
        """Ask for new reasoning text with the next observation sent (`force_reasoning`), once.

        Why: a server that decodes text once per instruction (the shipped model's policy) keeps
        the text it wrote for the session's first observation. After the scene changes under the
        same instruction (a reset, objects moved by hand, a failed grasp that pushed the card), that
        text still says where things were, and the arm would go there. Thread-safe."""
        with self._lock:
            self._pending_refresh = True

    def set_reasoning_override(self, text: str | None) -> None:
        """Make the model follow `text` instead of its own reasoning; None (or "") goes back to the
        model's. Unlike an instruction it persists: every observation sent carries it until cleared,
        because the server applies an override to its own observation only. Thread-safe."""
        with self._lock:
            self._reasoning_override = _override(text)

    @property
    def reasoning_override(self) -> str | None:
        """The override every observation currently carries, or None."""
        with self._lock:
            return self._reasoning_override

    # ---- one tick --------------------------------------------------------------------------------
    def step(self) -> TickRecord:
        """Run the current tick now. Public so tests and benchmarks can drive the loop tick by tick."""
        now = self.clock.now()
        obs = self.robot.observe()
        if self._t0 is None:
            self._t0 = now
            self.safety.reset(now, reference=obs.state)
        tick = self._tick
        replies, merges, failures = self._drain(now)

        sent: int | None = None
        if self.executor.should_request(tick, now):
            with self._lock:
                instruction, self._pending_instruction = self._pending_instruction, None
                refresh, self._pending_refresh = self._pending_refresh, False
                reasoning = self._reasoning_override
            req = ObservationRequest(
                tick=tick, images=obs.images, state=obs.state, instruction=instruction, reasoning=reasoning,
                force_reasoning=refresh,
            )
            sent = self.connection.submit(req)
            self.executor.on_request_sent(sent, tick, now)
            # A reply that is already there (a local or very fast server) can still serve this tick.
            more = self._drain(now)
            replies, merges, failures = replies + more[0], merges + more[1], failures + more[2]

        proposed = self.executor.pop(tick)
        decision = self.safety.filter(proposed, now, state=obs.state)
        self._apply(decision)
        self.stats.ticks += 1
        self._tick = tick + 1
        record = TickRecord(tick, now, obs, replies, merges, failures, sent, proposed, decision)
        for o in self.observers:
            o.on_tick(record)
        return record

    def _drain(self, now: float) -> tuple[tuple[ChunkReply, ...], tuple[ChunkMerge, ...], tuple[RequestFailed, ...]]:
        replies: list[ChunkReply] = []
        merges: list[ChunkMerge] = []
        failures: list[RequestFailed] = []
        for ev in self.connection.poll():
            if isinstance(ev, ChunkReply):
                replies.append(ev)
                try:
                    t = ev.timings
                    server_s = (t["total_ms"] / 1e3, t.get("queue_ms", 0.0) / 1e3) if "total_ms" in t else None
                    m = self.executor.add_chunk(ev.actions, seq=ev.seq, tick=ev.tick, now=now, server_s=server_s)
                except ValueError as e:
                    self.stats.bad_chunks += 1
                    self.stats.last_error = f"bad chunk {ev.seq}: {e}"
                    log.warning("dropping chunk %d: %s", ev.seq, e)
                    self.executor.on_request_failed(ev.seq, now)
                    continue
                merges.append(m)
                if m.fresh:
                    self.safety.note_fresh_chunk(now)
                if ev.reasoning:
                    self.stats.last_reasoning = ev.reasoning
            elif isinstance(ev, RequestFailed):
                failures.append(ev)
                self.executor.on_request_failed(ev.seq, now)
                self.stats.failures[ev.error.code] += 1
                self.stats.last_error = str(ev.error)
            elif isinstance(ev, ConnectionChanged):
                self.stats.connected = ev.connected
                if ev.error is not None:
                    self.stats.last_error = str(ev.error)
        return tuple(replies), tuple(merges), tuple(failures)

    def _apply(self, decision: SafetyDecision) -> None:
        if decision.verdict is Verdict.COMMAND:
            self.stats.commands += 1
            self.robot.command(decision.action)
        elif decision.verdict is Verdict.HOLD:
            self.stats.holds += 1
            if decision.action is not None:
                self.robot.command(decision.action)  # re-sending the last safe target holds it smoothly
            else:
                self.robot.hold()
        else:
            self.stats.stops += 1
            if not self._stopped:  # one stop on entering; the arm then stays stopped without commands
                self.robot.stop()
        self._stopped = decision.verdict is Verdict.STOP

    # ---- running ---------------------------------------------------------------------------------
    def run(self, max_ticks: int | None = None) -> None:
        """Tick until `stop()` or `max_ticks`. On any error the robot is stopped and the error re-raised;
        on a normal exit the robot is left holding."""
        ran = 0
        self.connection.start()  # idempotent; a connection that is already up is left alone
        try:
            while not self._stop.is_set() and (max_ticks is None or ran < max_ticks):
                self.step()
                ran += 1
                self._sleep_to_next_tick()
        except BaseException as e:
            self.error = e
            log.error("control loop stopped: %s", e)
            self._safe_stop()
            raise
        self.robot.hold()

    def _sleep_to_next_tick(self) -> None:
        assert self._t0 is not None
        due = self._t0 + self._tick * self.dt
        late = self.clock.now() - due
        if late > self.dt:
            missed = math.floor(late / self.dt)
            self._tick += missed
            self.stats.missed_ticks += missed
            due += missed * self.dt
        self.clock.sleep_until(due)

    def _safe_stop(self) -> None:
        try:
            self.robot.stop()
        except (RobotError, OSError, RuntimeError) as e:  # pragma: no cover - depends on the SDK
            log.error("robot.stop() failed too: %s", e)

    def start(self) -> None:
        """Run on a background thread (daemon, so a crashed caller cannot leave it ticking forever)."""
        if self._thread is not None:
            raise RuntimeError("control loop already started")
        self._thread = threading.Thread(target=self._run_quietly, name="chatvla-control", daemon=True)
        self._thread.start()

    def _run_quietly(self) -> None:
        with contextlib.suppress(BaseException):  # already logged and kept in self.error
            self.run()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def summary(self) -> dict[str, object]:
        """Counters of the loop, the executor and the safety filter, for logs and the demo."""
        out: dict[str, object] = {
            "ticks": self.stats.ticks,
            "missed_ticks": self.stats.missed_ticks,
            "commands": self.stats.commands,
            "holds": self.stats.holds,
            "stops": self.stats.stops,
            "bad_chunks": self.stats.bad_chunks,
            "failures": dict(self.stats.failures),
            "safety": dict(self.safety.counts),
        }
        ex_stats = getattr(self.executor, "stats", None)
        if ex_stats is not None and hasattr(ex_stats, "as_dict"):
            out["executor"] = ex_stats.as_dict()
        return out
