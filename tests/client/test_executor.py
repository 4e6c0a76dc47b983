"""Timing semantics of the chunk executor, driven tick by tick with explicit times (dt = 0.1 s)."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.executor import ChunkExecutor, ExecutorConfig, executor_config_from, executor_settings


def ramp(tick: int, n: int = 8, dim: int = 3, offset: float = 0.0) -> np.ndarray:
    """A chunk whose row i holds tick + i (+ offset) in every dimension."""
    return np.repeat((tick + np.arange(n, dtype=np.float64) + offset)[:, None], dim, axis=1)


def make(toy, **cfg) -> ChunkExecutor:
    return ChunkExecutor(toy, ExecutorConfig(**cfg))


def test_row_i_belongs_to_tick_t_plus_i_and_past_rows_are_dropped(toy):
    ex = make(toy)
    assert ex.pop(0) is None  # nothing yet: start-up, not a stall
    ex.on_request_sent(1, tick=0, now=0.0)
    for t in (1, 2):
        assert ex.pop(t) is None
    m = ex.add_chunk(ramp(0), seq=1, now=0.3)
    assert (m.dropped_past, m.appended, m.fresh) == (3, 5, True)
    assert ex.pop(3)[0] == 3.0
    assert ex.pop(4)[0] == 4.0
    assert ex.stats.startup_ticks == 3 and ex.stats.stalls == 0
    assert ex.stats.latencies_s[-1] == pytest.approx(0.3)


def test_a_chunk_entirely_in_the_past_is_unused(toy):
    ex = make(toy)
    ex.on_request_sent(1, tick=0, now=0.0)
    for t in range(10):
        ex.pop(t)
    m = ex.add_chunk(ramp(0), seq=1, now=1.0)
    assert m.used == 0 and not m.fresh and ex.stats.chunks_unused == 1
    assert ex.pop(10) is None


def test_the_tick_recorded_at_send_wins_over_the_servers_echo(toy):
    ex = make(toy)
    ex.on_request_sent(7, tick=2, now=0.0)
    for t in range(4):
        ex.pop(t)
    ex.add_chunk(ramp(2), seq=7, tick=0, now=0.4)  # a buggy echo
    assert ex.pop(4)[0] == 4.0


def test_unknown_seq_uses_the_echo_but_never_a_future_tick(toy):
    ex = make(toy)
    ex.pop(0)
    m = ex.add_chunk(ramp(50), seq=99, tick=50, now=0.1)
    assert m.used == 0
    m = ex.add_chunk(ramp(0), seq=98, tick=0, now=0.1)
    assert m.used == 7 and ex.stats.chunks_unknown == 2
    assert ex.pop(1)[0] == 1.0


def test_dry_queue_is_a_stall_and_skipped_ticks_are_never_executed_late(toy):
    ex = make(toy)
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0, n=3), seq=1, now=0.0)
    assert ex.pop(0)[0] == 0.0
    assert ex.pop(2)[0] == 2.0  # tick 1 was skipped (loop overran): its action is dropped
    assert ex.stats.actions_dropped_past == 1
    assert ex.pop(3) is None
    assert ex.stats.stalls == 1
    with pytest.raises(ValueError):
        ex.pop(3)


def _queue_then_overlap(ex: ChunkExecutor) -> tuple[np.ndarray, np.ndarray]:
    """Queue ramp(0) at tick 0, execute tick 0, then merge a chunk answering tick 1 that is offset
    by +1 from the queue on every tick; returns (queue before, merged plan)."""
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0), seq=1, now=0.0)
    ex.pop(0)
    before = ex.planned()[1]
    ex.on_request_sent(2, tick=1, now=0.1)
    ex.add_chunk(ramp(1, offset=1.0), seq=2, now=0.1)
    return before, ex.planned()[1]


def test_replace_keeps_frozen_ticks_and_takes_the_new_chunk_after(toy):
    ex = make(toy, blend="replace", frozen_ticks=2)
    before, plan = _queue_then_overlap(ex)
    np.testing.assert_array_equal(plan[:2], before[:2])  # ticks 1, 2 frozen
    np.testing.assert_array_equal(plan[2:, 0], np.arange(3, 9) + 1.0)
    assert ex.stats.actions_kept_frozen == 2 and ex.stats.actions_blended == 5
    assert ex.stats.actions_appended == 8 + 1


def test_weighted_mixes_a_constant_share_of_the_queue(toy):
    ex = make(toy, blend="weighted", old_weight=0.25, frozen_ticks=1)
    before, plan = _queue_then_overlap(ex)
    assert plan[0, 0] == before[0, 0]
    overlap = slice(1, len(before))
    np.testing.assert_allclose(plan[overlap, 0], before[overlap, 0] + 0.75)
    assert plan[-1, 0] == 8.0 + 1.0  # beyond the old queue: the new chunk alone


def test_crossfade_ramps_linearly_to_the_new_chunk(toy):
    ex = make(toy, blend="crossfade", frozen_ticks=1)
    before, plan = _queue_then_overlap(ex)
    # Queue covered ticks 1..7; tick 1 frozen; ticks 2..7 (6 ticks) fade in the +1 offset.
    offset = plan[: len(before), 0] - before[:, 0]
    np.testing.assert_allclose(offset, [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert plan[-1, 0] == 9.0


def test_crossfade_with_a_short_ramp(toy):
    ex = make(toy, blend="crossfade", frozen_ticks=0, crossfade_ticks=2)
    before, plan = _queue_then_overlap(ex)
    offset = plan[: len(before), 0] - before[:, 0]
    np.testing.assert_allclose(offset, [0.5, 1, 1, 1, 1, 1, 1])


def test_frozen_ticks_missing_from_the_queue_are_filled_by_the_new_chunk(toy):
    ex = make(toy, frozen_ticks=4, blend="replace")
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0, n=2), seq=1, now=0.0)
    ex.pop(0)
    ex.on_request_sent(2, tick=1, now=0.1)
    m = ex.add_chunk(ramp(1, offset=10.0), seq=2, now=0.1)
    assert m.kept_frozen == 1  # only tick 1 was queued
    np.testing.assert_array_equal(ex.planned()[1][:3, 0], [1.0, 12.0, 13.0])


def test_crossfade_without_overlap_fades_the_offset_from_the_last_queued_tick(toy):
    ex = make(toy, blend="crossfade", frozen_ticks=2, crossfade_ticks=4)
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0, n=3), seq=1, now=0.0)
    ex.pop(0)  # queue: ticks 1, 2 (both frozen)
    ex.on_request_sent(2, tick=1, now=0.1)
    ex.add_chunk(ramp(1, offset=2.0), seq=2, now=0.1)
    plan = ex.planned()[1][:, 0]
    # Ticks 1, 2 frozen; from tick 3 the new chunk (tick + 2) starts 2 above the old line and the
    # offset fades out over 4 ticks instead of jumping.
    np.testing.assert_allclose(plan, [1, 2, 3 + 0.5, 4 + 1.0, 5 + 1.5, 6 + 2, 7 + 2, 8 + 2])


def test_after_a_stall_the_crossfade_eases_out_of_the_held_pose(toy):
    ex = make(toy, blend="crossfade", crossfade_ticks=4)
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0, n=2), seq=1, now=0.0)
    ex.pop(0)
    ex.pop(1)  # the arm now holds 1.0
    ex.on_request_sent(2, tick=2, now=0.2)
    assert ex.pop(2) is None and ex.pop(3) is None  # stalled
    ex.add_chunk(ramp(2), seq=2, now=0.4)  # rows for ticks 4.. are 4, 5, ...
    plan = ex.planned()[1][:, 0]
    # The held 1.0 is 3 below the new line at tick 4; that offset fades out over 4 ticks.
    np.testing.assert_allclose(plan[:5], [4 - 0.75 * 3, 5 - 0.5 * 3, 6 - 0.25 * 3, 7, 8])


def test_a_queue_that_just_ran_out_keeps_its_motion_into_the_next_chunk(toy):
    ex = make(toy, blend="crossfade", crossfade_ticks=4)
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0, n=2), seq=1, now=0.0)
    ex.pop(0)
    ex.pop(1)
    ex.on_request_sent(2, tick=1, now=0.1)
    ex.add_chunk(ramp(1), seq=2, now=0.2)  # lands exactly as the queue is empty, no stall
    np.testing.assert_allclose(ex.planned()[1][:, 0], np.arange(2, 9))  # same line: nothing to fade


def test_a_reply_to_an_older_observation_only_fills_uncovered_ticks(toy):
    ex = make(toy)
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.on_request_sent(2, tick=4, now=0.4)
    for t in range(5):
        ex.pop(t)
    ex.add_chunk(ramp(4, n=4, offset=100.0), seq=2, now=0.5)  # covers ticks 5..7
    m = ex.add_chunk(ramp(0, n=12), seq=1, now=0.5)  # older: ticks 5..11
    assert m.out_of_order and not m.fresh and m.appended == 4
    _, plan = ex.planned()
    np.testing.assert_array_equal(plan[:, 0], [105, 106, 107, 8, 9, 10, 11])


def test_a_newer_chunk_shorter_than_the_queue_ends_the_plan(toy):
    ex = make(toy, blend="replace", frozen_ticks=0)
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0), seq=1, now=0.0)
    ex.on_request_sent(2, tick=0, now=0.0)
    ex.add_chunk(ramp(0, n=3, offset=5.0), seq=2, now=0.0)
    np.testing.assert_array_equal(ex.planned()[1][:, 0], [5, 6, 7])


def test_wrong_chunk_shape_is_refused(toy):
    ex = make(toy)
    with pytest.raises(ValueError):
        ex.add_chunk(np.zeros((8, 2)), seq=1, now=0.0, tick=0)
    with pytest.raises(ValueError):
        ex.add_chunk(np.zeros((0, 3)), seq=1, now=0.0, tick=0)


# ---- when to ask -------------------------------------------------------------------------------
def test_lead_follows_a_high_quantile_of_measured_round_trips(toy):
    ex = make(toy, latency_quantile=0.9, margin_ticks=1, frozen_ticks=1, blend_ticks=1, min_spacing_ticks=0)
    assert ex.latency_estimate_s() == pytest.approx(0.4)  # before any reply: half a chunk
    for seq, rtt in enumerate([0.1] * 9 + [0.35], start=1):
        ex.on_request_sent(seq, tick=seq * 10, now=seq)
        ex.pop(seq * 10)
        ex.add_chunk(ramp(seq * 10), seq=seq, now=seq + rtt)
    assert ex.latency_estimate_s() == pytest.approx(np.quantile([0.1] * 9 + [0.35], 0.9))
    assert ex.latency_ticks() == 2
    assert ex.lead_ticks() == 2 + 1 + 1 + 1


def test_request_is_due_when_the_queue_gets_as_short_as_the_lead(toy):
    ex = make(toy, initial_latency_s=0.2, margin_ticks=1, frozen_ticks=1, blend_ticks=1)
    assert ex.lead_ticks() == 5
    assert ex.should_request(0, now=0.0)  # empty queue
    ex.on_request_sent(1, tick=0, now=0.0)
    assert not ex.should_request(0, now=0.0)  # one per tick, one in flight
    ex.pop(0)
    ex.pop(1)
    ex.add_chunk(ramp(0), seq=1, now=0.2)  # measured: 0.2 s = 2 ticks, so lead stays 5
    due = []
    for t in range(2, 8):
        if ex.should_request(t, now=t / 10):
            due.append(t)
        ex.pop(t)
    assert due[0] == 3  # queue holds ticks 3..7 = 5 = lead


def test_one_in_flight_until_reply_failure_or_timeout(toy):
    ex = make(toy, initial_latency_s=0.2, request_timeout_s=1.0)
    ex.on_request_sent(1, tick=0, now=0.0)
    assert not ex.should_request(1, now=0.5)
    ex.on_request_failed(1, now=0.5)
    assert ex.should_request(1, now=0.5) and ex.stats.requests_failed == 1
    ex.on_request_sent(2, tick=1, now=0.5)
    assert not ex.should_request(2, now=1.4)
    assert ex.should_request(2, now=1.6)  # presumed lost
    assert ex.stats.requests_timed_out == 1


def test_several_in_flight_are_spaced_by_what_they_will_cover(toy):
    ex = make(toy, initial_latency_s=0.5, max_in_flight=3, margin_ticks=1, frozen_ticks=0, blend_ticks=0)
    lead = ex.lead_ticks()
    assert lead == 6
    sent = []
    for t in range(12):
        if ex.should_request(t, now=t / 10):
            ex.on_request_sent(len(sent) + 1, tick=t, now=t / 10)
            sent.append(t)
        ex.pop(t)
    # Each request in flight covers 8 ticks from its own tick; the next is due 2 ticks (8 - 6) later.
    assert sent[:3] == [0, 2, 4]


def _first_request_answered(ex, server_s):
    """Request 1 at tick 0, answered at t = 0.5 s with the server's (total, queue) seconds."""
    ex.on_request_sent(1, tick=0, now=0.0)
    ex.add_chunk(ramp(0), seq=1, now=0.5, server_s=server_s)
    for t in range(5):
        ex.pop(t)


def test_a_pipelined_request_waits_until_the_server_is_done_with_ours_when_it_reports_compute(toy):
    # The server spent the whole 0.5 s computing: a request sent sooner would queue behind ours.
    ex = make(toy, initial_latency_s=0.5, max_in_flight=2, margin_ticks=1, frozen_ticks=0, blend_ticks=0)
    _first_request_answered(ex, server_s=(0.5, 0.0))
    assert ex.should_request(5, now=0.5)
    ex.on_request_sent(2, tick=5, now=0.5)
    assert not ex.should_request(6, now=0.6)  # coverage would call for it, the server is still busy
    assert not ex.should_request(9, now=0.9)
    assert ex.should_request(10, now=1.0)  # 0.5 s after request 2: the server is free again


def test_a_pipelined_request_goes_at_once_when_the_latency_is_the_network(toy):
    # 0.1 s of server work, 0.4 s on the wire (0.2 each way): the next request may travel meanwhile.
    ex = make(toy, initial_latency_s=0.5, max_in_flight=2, margin_ticks=1, frozen_ticks=0, blend_ticks=0)
    _first_request_answered(ex, server_s=(0.1, 0.0))
    ex.on_request_sent(2, tick=5, now=0.5)
    assert ex.should_request(7, now=0.7)


def test_queue_time_behind_other_robots_does_not_count_as_our_servers_work(toy):
    ex = make(toy, initial_latency_s=0.5, max_in_flight=2, margin_ticks=1, frozen_ticks=0, blend_ticks=0)
    _first_request_answered(ex, server_s=(0.45, 0.35))  # 0.1 s of work, 0.35 s queued
    ex.on_request_sent(2, tick=5, now=0.5)
    assert ex.should_request(7, now=0.7)


def test_config_validation():
    with pytest.raises(ValueError):
        ExecutorConfig(blend="average")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ExecutorConfig(old_weight=1.5)
    with pytest.raises(ValueError):
        ExecutorConfig(frozen_ticks=-1)
    with pytest.raises(ValueError):
        ExecutorConfig(max_in_flight=0)


def test_settings_from_a_command_line_take_each_fields_type():
    config = executor_config_from(["blend=replace", "frozen-ticks=1", "old_weight=0.25", "request_timeout_s=0.5"])
    assert (config.blend, config.frozen_ticks, config.old_weight, config.request_timeout_s) == ("replace", 1, 0.25, 0.5)
    assert executor_settings(config) == {"blend": "replace", "frozen_ticks": 1, "old_weight": 0.25,
                                         "request_timeout_s": 0.5}
    assert executor_settings(executor_config_from([])) == {}  # nothing given: the defaults, nothing to report
    cleared = executor_config_from(["initial_latency_s=none"], base=ExecutorConfig(initial_latency_s=0.3))
    assert cleared.initial_latency_s is None


@pytest.mark.parametrize(("setting", "says"), [
    ("frozen=1", "NAME one of blend,"),  # not a field: the message lists the fields
    ("blend_ticks", "NAME=VALUE"),
    ("frozen_ticks=two", "'two' is not a valid int"),
    ("frozen_ticks=none", "'none' is not a valid int"),  # only optional fields clear
    ("blend=average", "blend must be one of"),  # the config's own range checks still apply
    ("margin_ticks=-1", "tick counts must be >= 0"),
])
def test_a_bad_setting_is_named(setting, says):
    with pytest.raises(ValueError, match=says):
        executor_config_from([setting])
