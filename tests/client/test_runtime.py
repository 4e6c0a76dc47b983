"""The control loop end to end on a fake clock: FakeRobot -> executor -> safety -> FakeRobot, with a
fake policy whose chunk rows are the ticks they belong to (so an executed action equal to its tick
proves nothing stale ran)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from chatvla.client.connection import MonotonicClock, ObservationRequest, PolicyConnection, ResourceExhausted
from chatvla.client.executor import ChunkExecutor, ExecutorConfig
from chatvla.client.fakes import FakeClock, FakePolicyConnection, FakeRobot, TrackingPolicy
from chatvla.client.robots.base import RobotError
from chatvla.client.runtime import ControlLoop, TickRecord
from chatvla.client.safety import SafetyConfig, SafetyFilter, Verdict


def tick_policy(profile):
    def policy(req: ObservationRequest) -> np.ndarray:
        return (req.tick + np.arange(profile.chunk_size, dtype=np.float64))[:, None]

    return policy


class Recorder:
    def __init__(self) -> None:
        self.records: list[TickRecord] = []

    def on_tick(self, record: TickRecord) -> None:
        self.records.append(record)


def build(profile, clock, latency, *, executor=None, safety=None, errors=None, policy=None):
    robot = FakeRobot(profile, clock=clock)
    conn = FakePolicyConnection(clock, policy or tick_policy(profile), latency=latency, errors=errors)
    rec = Recorder()
    loop = ControlLoop(
        robot,
        conn,
        executor or ChunkExecutor(profile),
        safety or SafetyFilter(profile),
        clock=clock,
        observers=[rec],
    )
    return loop, robot, conn, rec


def executed_commands(rec: Recorder) -> list[tuple[int, float]]:
    return [
        (r.tick, float(r.decision.action[0]))
        for r in rec.records
        if r.decision.verdict is Verdict.COMMAND and r.proposed is not None
    ]


@pytest.mark.parametrize("latency", [0.0, 0.12, 0.25, 0.33])
def test_no_stalls_and_no_stale_actions_below_half_a_chunk(counter, clock, latency):
    loop, _robot, _conn, rec = build(counter, clock, latency)
    loop.run(max_ticks=300)
    ex = loop.executor
    assert ex.stats.stalls == 0
    assert ex.stats.startup_ticks <= 1 + round(latency * counter.control_rate_hz)
    cmds = executed_commands(rec)
    assert len(cmds) >= 300 - ex.stats.startup_ticks
    assert all(abs(value - tick) < 1e-9 for tick, value in cmds)
    assert clock.now() == pytest.approx(300 * counter.dt)


def test_latency_above_the_lead_and_loss_cost_stalls_but_never_staleness(counter, clock):
    # Every 4th request is lost, the rest take 0.2-0.5 s: stalls happen and are counted.
    rng = np.random.default_rng(0)

    def latency(seq, _req):
        return None if seq % 4 == 0 else float(rng.uniform(0.2, 0.5))

    # Replace blending keeps "value == tick" exact; a crossfade eases out of stalls from the held pose.
    executor = ChunkExecutor(counter, ExecutorConfig(blend="replace", max_in_flight=1))
    loop, _robot, conn, rec = build(counter, clock, latency, executor=executor)
    loop.run(max_ticks=400)
    ex = loop.executor
    assert ex.stats.requests_timed_out == len(conn.lost) > 0
    assert all(abs(value - tick) < 1e-9 for tick, value in executed_commands(rec))
    stalled = sum(1 for r in rec.records if r.proposed is None)
    assert stalled == ex.stats.stalls + ex.stats.startup_ticks
    counts = loop.safety.counts
    assert counts["stall_hold"] + counts["watchdog_hold"] == stalled


def test_server_errors_are_counted_and_the_next_request_goes_out(counter, clock):
    def errors(seq, _req):
        return ResourceExhausted("server full") if seq in (3, 4) else None

    loop, _robot, _conn, rec = build(counter, clock, 0.1, errors=errors)
    loop.run(max_ticks=200)
    assert loop.stats.failures["RESOURCE_EXHAUSTED"] == 2
    assert "server full" in loop.stats.last_error
    assert loop.executor.stats.requests_failed == 2
    assert all(abs(value - tick) < 1e-9 for tick, value in executed_commands(rec))


def test_dead_server_holds_then_stops_then_recovers(toy, clock):
    policy = TrackingPolicy(toy, amplitude=0.2)
    safety = SafetyFilter(toy, SafetyConfig(hold_after_ms=800, stop_after_ms=1600))
    loop, robot, conn, rec = build(toy, clock, 0.2, safety=safety, policy=policy)
    loop.run(max_ticks=50)
    assert loop.executor.stats.stalls == 0
    conn.set_available(False)
    loop.run(max_ticks=40)
    verdicts = [r.decision for r in rec.records[50:]]
    holds = [d for d in verdicts if d.verdict is Verdict.HOLD]
    stops = [d for d in verdicts if d.verdict is Verdict.STOP]
    assert holds and stops and verdicts[-1].verdict is Verdict.STOP
    assert robot.stops == 1  # stopped once on entering, not once per tick
    # While holding, the robot is sent the last safe command, never anything new.
    last_command = [d.action for d in verdicts if d.verdict is Verdict.COMMAND][-1]
    for d in holds:
        np.testing.assert_array_equal(d.action, last_command)
    assert safety.counts["watchdog_stop"] == len(stops)
    conn.set_available(True)
    loop.run(max_ticks=30)
    assert rec.records[-1].decision.verdict is Verdict.COMMAND
    assert safety.mode is Verdict.COMMAND


def test_overrunning_ticks_are_skipped_and_their_actions_dropped(counter, clock):
    class SlowRobot(FakeRobot):
        def observe(self):
            if len(self.targets) % 10 == 5:
                clock.advance(0.25)  # this tick takes 2.5 periods
            return super().observe()

    robot = SlowRobot(counter, clock=clock)
    conn = FakePolicyConnection(clock, tick_policy(counter), latency=0.1)
    rec = Recorder()
    loop = ControlLoop(robot, conn, ChunkExecutor(counter), SafetyFilter(counter), clock=clock, observers=[rec])
    loop.run(max_ticks=100)
    assert loop.stats.missed_ticks > 0
    ticks = [r.tick for r in rec.records]
    assert len(set(ticks)) == len(ticks) and ticks == sorted(ticks)
    assert all(abs(value - tick) < 1e-9 for tick, value in executed_commands(rec))
    # Tick n ran no earlier than its slot t0 + n * dt.
    assert all(r.time >= r.tick * counter.dt - 1e-9 for r in rec.records)


def test_instruction_changes_ride_on_the_next_request_only(counter, clock):
    loop, _robot, conn, _rec = build(counter, clock, 0.1)
    loop.run(max_ticks=5)
    loop.set_instruction("put the 7 card on the target")
    loop.run(max_ticks=30)
    carried = [r.instruction for r in conn.requests if r.instruction]
    assert carried == ["put the 7 card on the target"]


def test_a_reasoning_refresh_rides_on_the_next_request_only(counter, clock):
    loop, _robot, conn, _rec = build(counter, clock, 0.1)
    loop.run(max_ticks=5)
    before = len(conn.requests)
    loop.refresh_reasoning()
    loop.run(max_ticks=30)
    assert before > 0 and not any(r.force_reasoning for r in conn.requests[:before])
    assert [r.force_reasoning for r in conn.requests[before:]] == [True] + [False] * (len(conn.requests) - before - 1)


def test_reasoning_override_rides_on_every_request_until_cleared(counter, clock):
    robot = FakeRobot(counter, clock=clock)
    conn = FakePolicyConnection(clock, tick_policy(counter), latency=0.1)
    loop = ControlLoop(robot, conn, ChunkExecutor(counter), SafetyFilter(counter), clock=clock,
                       reasoning_override="Pick card 49.")
    assert loop.reasoning_override == "Pick card 49."
    loop.run(max_ticks=30)
    first = len(conn.requests)
    assert first > 1 and all(r.reasoning == "Pick card 49." for r in conn.requests)
    assert loop.stats.last_reasoning == "Pick card 49."  # the fake echoes it, as the server does
    loop.set_reasoning_override(None)
    loop.run(max_ticks=30)
    cleared = len(conn.requests)
    assert cleared > first and all(r.reasoning is None for r in conn.requests[first:])
    loop.set_reasoning_override("Place it on the target.")
    loop.run(max_ticks=30)
    assert len(conn.requests) > cleared
    assert all(r.reasoning == "Place it on the target." for r in conn.requests[cleared:])
    loop.set_reasoning_override("")  # empty is "no override", as on the wire
    assert loop.reasoning_override is None
    with pytest.raises(TypeError):
        loop.set_reasoning_override(49)  # type: ignore[arg-type]


def test_a_misshapen_chunk_is_dropped_not_fatal(counter, clock):
    def policy(req):
        return np.zeros((8, 5)) if req.tick == 0 else tick_policy(counter)(req)

    loop, _robot, _conn, rec = build(counter, clock, 0.0, policy=policy)
    loop.run(max_ticks=20)
    assert loop.stats.bad_chunks == 1
    assert all(abs(value - tick) < 1e-9 for tick, value in executed_commands(rec))


def test_a_robot_error_stops_the_robot_and_surfaces(counter, clock):
    loop, robot, _conn, _rec = build(counter, clock, 0.0)
    loop.run(max_ticks=3)
    robot.fail_observe = "camera unplugged"
    with pytest.raises(RobotError, match="camera unplugged"):
        loop.run(max_ticks=3)
    assert robot.stops == 1 and isinstance(loop.error, RobotError)


def test_the_loop_never_waits_on_a_connection_that_would_block(counter):
    """A connection whose submit/poll are slow would be a bug, but even a policy that never answers
    must leave the loop ticking at its rate: here on wall time, on its own thread."""

    class Silent(PolicyConnection):
        def __init__(self) -> None:
            self.n = 0

        def submit(self, request):
            self.n += 1
            return self.n

        def poll(self):
            return []

    fast = type(counter)(**{**counter.__dict__, "control_rate_hz": 200.0})
    robot = FakeRobot(fast)
    loop = ControlLoop(robot, Silent(), ChunkExecutor(fast), SafetyFilter(fast), clock=MonotonicClock())
    done = threading.Event()
    loop.start()
    try:
        done.wait(0.3)
    finally:
        loop.stop()
    assert not loop.running and loop.error is None
    assert loop.stats.ticks > 5 and loop.stats.holds + loop.stats.stops == loop.stats.ticks
    # Nothing but holds (re-sending the measured pose) and one stop ever reached the robot.
    assert robot.stops == 1 and robot.commands == loop.stats.holds
    summary = loop.summary()
    assert summary["ticks"] == loop.stats.ticks and "executor" in summary and "safety" in summary


def test_fake_clock_sleep_never_goes_back():
    c = FakeClock(1.0)
    c.sleep_until(0.5)
    assert c.now() == 1.0
    c.sleep_until(2.0)
    c.advance(0.5)
    assert c.now() == 2.5
