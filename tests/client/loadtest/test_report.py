"""The HTML load-test report, rendered from a hand-made report (no server): no empty header row, counts as
integers, breakdowns as tables, both batch-size lines visible, the histogram in its series' colour."""

from __future__ import annotations

import re

from chatvla.client.loadtest.report import STAGE_STYLE, render_html


def lat(p50: float) -> dict[str, float]:
    return {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 2, "max": p50 * 3}


def report() -> dict:
    series = [[0.5 * i, 2.0, 4.0] for i in range(1, 7)]  # reasoning and expert batches coincide
    return {
        "config": {"target": "127.0.0.1:50051", "robots": 2, "ramp_up_s": 1.0, "duration_s": 3.0},
        "server": {"model_id": "test", "engine": "null", "profile": "franka_joint"},
        "robots": {"started": 2},
        "wall_s": 3.2,
        "source": {"kind": "synthetic", "episodes": 2},
        "totals": {"chunks": 40, "observations_sent": 41, "stall_ticks": 0, "ticks": 90, "stall_fraction": 0.0,
                   "generator_late_ticks": 0},
        "throughput": {"chunks_per_s": 12.5, "steady_chunks_per_s": 13.0, "observations_per_s": 12.8},
        "latency_ms": {"client_rtt_ms": lat(20.0), "server_total_ms": lat(15.0)},
        "rejections": 3.0,
        "errors_by_kind": {"RESOURCE_EXHAUSTED": 3.0},
        "timeline": {"t_s": [0, 1, 2, 3], "rtt_p50_ms": [20.0, 21.0, None, 19.0],
                     "rtt_p99_ms": [40.0, 41.0, None, 39.0],
                     "points": [[0.1 * i, 20.0 + i % 3, 15.0] for i in range(30)]},
        "server_metrics": {
            "snapshots": 7,
            "batch_reasoning": {"mean": 2.0, "batches": 24.0, "series": series,
                                "histogram": {"1.0": 4.0, "2.0": 16.0, "4.0": 4.0, "+Inf": 0.0}},
            "batch_expert": {"mean": 2.0, "batches": 24.0, "series": series, "histogram": {}},
            "rejected_by_reason": {"queue_full": 2.0, "sessions_limit": 1.0},
            "queue_depth_max": {"preprocess": 1.0, "reasoning": 3.0, "expert": 0.0},
        },
    }


def test_report_has_no_empty_header_row_and_integer_counts() -> None:
    page = render_html(report())
    assert "<th></th>" not in page and not re.search(r"<tr>(<th>\s*</th>)+</tr>", page)
    # breakdowns are tables of integer counts, not dicts of floats
    assert "{" not in page.split("<style>")[0] + page.split("</style>")[1].split("<svg")[0]
    for name, n in (("RESOURCE_EXHAUSTED", 3), ("queue_full", 2), ("sessions_limit", 1), ("reasoning", 3)):
        assert f"<td>{name}</td><td>{n}</td>" in page
    assert "<td>rejections</td><td>3</td>" in page
    assert not re.search(r"<td>\d+\.0</td>", page)


def test_batch_lines_are_both_visible_and_the_histogram_matches_its_line() -> None:
    page = render_html(report())
    section = page.split("Server batch sizes over time")[1]
    lines = re.findall(r'<polyline fill="none" ([^>]*) points=', section)
    reasoning, expert = STAGE_STYLE["reasoning"], STAGE_STYLE["expert"]
    assert any(f'stroke="{reasoning["color"]}"' in s for s in lines)
    dashed = [s for s in lines if "stroke-dasharray" in s]
    assert dashed and all(f'stroke="{expert["color"]}"' in s for s in dashed)  # drawn over the wide band
    assert reasoning["color"] != expert["color"] and reasoning["width"] > expert["width"]
    bars = re.findall(r'<rect [^>]*height="[^"]*" fill="([^"]+)"/>', section)
    assert bars and set(bars) == {reasoning["color"]}
