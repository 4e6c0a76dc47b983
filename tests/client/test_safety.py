"""The safety filter: envelope, step limits, finiteness, watchdog, counters and logs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from chatvla.client.safety import SafetyConfig, SafetyFilter, Verdict
from chatvla.profiles import FRANKA_JOINT, PROFILES


def armed(toy, state=(0.0, 0.0, 0.04), **cfg) -> SafetyFilter:
    f = SafetyFilter(toy, SafetyConfig(**cfg))
    f.reset(0.0, reference=np.asarray(state))
    f.note_fresh_chunk(0.0)
    return f


def test_joint_and_gripper_limits_are_clipped_and_counted(toy, caplog):
    f = armed(toy, state=(0.95, 0.0, 0.04))
    with caplog.at_level(logging.WARNING, logger="chatvla.client.safety"):
        d = f.filter(np.array([1.5, 0.05, 0.2]), now=0.0)
    assert d.verdict is Verdict.COMMAND
    np.testing.assert_allclose(d.action, [1.0, 0.05, 0.08])
    assert set(d.interventions) == {"joint_limit", "gripper_range"}
    assert f.counts["joint_limit"] == 1 and f.counts["gripper_range"] == 1
    assert "joint_limit" in caplog.text and "gripper_range" in caplog.text


def test_step_limit_applies_to_joints_not_grippers(toy):
    f = armed(toy)
    d = f.filter(np.array([0.5, -0.05, 0.0]), now=0.0)
    np.testing.assert_allclose(d.action, [0.1, -0.05, 0.0])  # gripper closes in one command
    assert d.interventions == ("step_limit",)
    d = f.filter(np.array([0.5, -0.05, 0.08]), now=0.1)
    np.testing.assert_allclose(d.action, [0.2, -0.05, 0.08])
    assert f.counts["step_limit"] == 2


def test_the_first_command_is_step_limited_from_the_measured_state(toy):
    f = SafetyFilter(toy)
    f.reset(0.0)  # no reference yet
    f.note_fresh_chunk(0.0)
    d = f.filter(np.array([0.9, 0.0, 0.04]), now=0.0, state=np.array([0.5, 0.0, 0.04]))
    np.testing.assert_allclose(d.action, [0.6, 0.0, 0.04])


def test_step_scale(toy):
    f = armed(toy, step_scale=0.5)
    d = f.filter(np.array([0.5, 0.0, 0.04]), now=0.0)
    assert d.action[0] == pytest.approx(0.05)


@pytest.mark.parametrize("bad", [[np.nan, 0, 0], [0, np.inf, 0], [0, 0]])
def test_nonfinite_or_misshapen_actions_hold_the_last_safe_command(toy, bad):
    f = armed(toy)
    first = f.filter(np.array([0.05, 0.0, 0.04]), now=0.0)
    d = f.filter(np.array(bad, dtype=float), now=0.1)
    assert d.verdict is Verdict.HOLD and d.interventions == ("nonfinite",)
    np.testing.assert_array_equal(d.action, first.action)


def test_a_stall_holds_the_last_safe_command(toy):
    f = SafetyFilter(toy, SafetyConfig(reference_from_state=False))
    f.reset(0.0)
    d = f.filter(None, now=0.0)
    assert d.verdict is Verdict.HOLD and d.action is None  # nothing commanded yet: robot.hold()
    f.note_fresh_chunk(0.0)
    f.filter(np.array([0.05, 0.0, 0.04]), now=0.0)
    d = f.filter(None, now=0.1)
    assert d.verdict is Verdict.HOLD
    np.testing.assert_allclose(d.action, [0.05, 0.0, 0.04])
    assert f.counts["stall_hold"] == 2


def test_watchdog_holds_then_stops_then_resumes_on_a_fresh_chunk(toy, caplog):
    f = armed(toy, hold_after_ms=300, stop_after_ms=600)
    a = np.array([0.05, 0.0, 0.04])
    assert f.filter(a, now=0.3).verdict is Verdict.COMMAND
    with caplog.at_level(logging.WARNING, logger="chatvla.client.safety"):
        d = f.filter(a, now=0.31)
        assert d.verdict is Verdict.HOLD and d.interventions == ("watchdog_hold",)
        np.testing.assert_allclose(d.action, a)
        assert f.filter(a, now=0.5).verdict is Verdict.HOLD
        assert f.filter(a, now=0.61).verdict is Verdict.STOP
        assert f.filter(a, now=0.7).verdict is Verdict.STOP
    assert f.counts["watchdog_hold"] == 2 and f.counts["watchdog_stop"] == 2
    assert caplog.text.count("watchdog") == 2  # one line per transition, not per tick
    # The arm settled elsewhere while stopped: the step limit now starts from the measured state.
    f.note_fresh_chunk(0.8)
    d = f.filter(np.array([0.9, 0.0, 0.04]), now=0.8, state=np.array([0.7, 0.0, 0.04]))
    assert d.verdict is Verdict.COMMAND
    np.testing.assert_allclose(d.action, [0.8, 0.0, 0.04])
    assert f.mode is Verdict.COMMAND


def test_watchdog_counts_from_reset_before_the_first_chunk(toy):
    f = SafetyFilter(toy, SafetyConfig(hold_after_ms=100, stop_after_ms=200))
    f.reset(5.0)
    assert f.filter(None, now=5.05).interventions == ("stall_hold",)
    assert f.filter(None, now=5.15).verdict is Verdict.HOLD
    assert f.filter(None, now=5.25).verdict is Verdict.STOP


def test_default_watchdog_comes_from_the_chunk_duration():
    f = SafetyFilter(FRANKA_JOINT)
    assert f.hold_after_s == pytest.approx(FRANKA_JOINT.chunk_duration_s)
    assert f.stop_after_s == pytest.approx(3 * FRANKA_JOINT.chunk_duration_s)
    with pytest.raises(ValueError):
        SafetyConfig(hold_after_ms=500, stop_after_ms=100)


def test_long_streaks_log_once_but_count_every_tick(toy, caplog):
    f = armed(toy, state=(1.0, 0.0, 0.04))
    with caplog.at_level(logging.DEBUG, logger="chatvla.client.safety"):
        for i in range(5):
            f.filter(np.array([2.0, 0.0, 0.04]), now=i * 0.01)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f.counts["joint_limit"] == 5
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 4


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_home_pose_passes_every_profile_untouched(name):
    p = PROFILES[name]
    home = np.asarray(p.home or np.add(p.action_lower, p.action_upper) / 2)
    f = SafetyFilter(p)
    f.reset(0.0, reference=home)
    f.note_fresh_chunk(0.0)
    d = f.filter(home, now=0.0)
    assert d.verdict is Verdict.COMMAND and d.interventions == ()
