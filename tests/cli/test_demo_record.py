"""`chatvla demo` and `chatvla record` end to end: a real server process, sims, the full client stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatvla.cli.server_process import READY_PREFIX, parse_ready_line, ready_fields, start_server
from chatvla.client.recording import read_episode

pytest.importorskip("mujoco")
pytestmark = pytest.mark.sim


def _render_ok() -> bool:
    from chatvla.client.sim.render import rendering_available

    return bool(rendering_available()[0])


def test_ready_prefix_matches_the_server():
    from chatvla.server.app import READY_PREFIX as SERVER_PREFIX

    assert READY_PREFIX == SERVER_PREFIX
    grpc, http = parse_ready_line(f"{READY_PREFIX} grpc=127.0.0.1:5 http=http://127.0.0.1:6 model=m engine=e")
    assert (grpc, http) == ("127.0.0.1:5", "http://127.0.0.1:6")
    line = f"{READY_PREFIX} grpc=127.0.0.1:5 http=http://127.0.0.1:6 openpi=ws://127.0.0.1:7 model=m"
    assert ready_fields(line)["openpi"] == "ws://127.0.0.1:7"  # start_server hands it on (benchmarks/hostile.py)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatvla.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_demo_runs_robots_through_both_tasks_and_exits_cleanly(tmp_path):
    if not _render_ok():
        pytest.skip("no headless GL")
    r = _cli("demo", "--model", "tiny", "--task", "both", "--robots", "2", "--episodes", "1", "--episode-seconds",
             "2", "--record", str(tmp_path), "--json", str(tmp_path / "report.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "robot0" in out and "robot1" in out and "tasks solved:" in out
    assert "untrained" in out  # the tiny model's failures are reported as expected, not hidden
    assert "server stopped (exit code 0)" in r.stderr
    assert "math_matching" in r.stderr and "toy_placement" in r.stderr
    files = sorted(tmp_path.glob("*.chatvla"))
    assert len(files) == 2
    ep = read_episode(files[0])
    assert ep.records and any(rec.chunk is not None for rec in ep.records)
    for f in files:  # every episode has its viewer next to it, and the report says where
        assert f.with_suffix(".html").exists() and f"viewer: {f.with_suffix('.html')}" in out
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert all(row["rate_hz"] > 0 and row["chunks"] > 0 for row in report)


def test_record_oracle_writes_successful_demonstrations(tmp_path):
    if not _render_ok():
        pytest.skip("no headless GL")
    r = _cli("record", "--robot", "sim-panda", "--policy", "oracle", "--out", str(tmp_path), "--episodes", "2",
             "--seed", "3")
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("*.chatvla"))
    assert len(files) == 2
    for f in files:
        ep = read_episode(f)
        assert ep.footer.outcome["success"] is True
        assert ep.header.task["policy"] == "oracle"
        assert all(rec.action is not None for rec in ep.records)


def test_record_oracle_skips_a_layout_it_cannot_plan_and_records_the_rest(tmp_path):
    """Toy-placement seed 13 on the bimanual rig puts the toy where neither arm's IK reaches (found by a
    400-episode recording that used to stop there with a PlanningError)."""
    if not _render_ok():
        pytest.skip("no headless GL")
    r = _cli("record", "--robot", "sim-bimanual", "--policy", "oracle", "--task", "toy_placement",
             "--out", str(tmp_path), "--episodes", "2", "--seed", "12")
    assert r.returncode == 0, r.stderr
    assert "skipped episode 1 (task seed 13): the oracle found no plan" in r.stderr
    assert "recorded 1 of 2 episodes" in r.stderr
    assert [f.name for f in sorted(tmp_path.glob("*.chatvla"))] == ["sim-bimanual-ep000.chatvla"]


def test_record_against_a_server(tmp_path):
    if not _render_ok():
        pytest.skip("no headless GL")
    server = start_server(["--engine", "null", "--engine-option", "reason_ms=5"], timeout_s=120)
    try:
        r = _cli("record", "--robot", "sim-panda", "--target", server.grpc_address, "--out", str(tmp_path),
                 "--seconds", "2", "--task", "toy_placement")
    finally:
        assert server.stop() == 0
    assert r.returncode == 0, r.stderr
    ep = read_episode(next(tmp_path.glob("*.chatvla")))
    chunks = [rec.chunk for rec in ep.records if rec.chunk is not None]
    assert chunks and chunks[0].actions.shape == (16, 8)
    assert ep.header.instruction.startswith("Put the")


def test_record_refuses_bad_combinations(tmp_path):
    r = _cli("record", "--robot", "franky", "--policy", "oracle", "--out", str(tmp_path))
    assert r.returncode == 2 and "simulated robot" in r.stderr
    r = _cli("record", "--robot", "sim-panda", "--out", str(tmp_path))
    assert r.returncode == 2 and "--target" in r.stderr
    r = _cli("record", "--robot", "sim-panda", "--target", "127.0.0.1:1", "--oracle-miss", "0.03", "--out",
             str(tmp_path))
    assert r.returncode == 2 and "--oracle-miss" in r.stderr and "--policy oracle" in r.stderr
    r = _cli("record", "--robot", "sim-panda", "--policy", "oracle", "--oracle-miss", "0.5", "--out", str(tmp_path))
    assert r.returncode == 2 and "(0, 0.2]" in r.stderr


def test_record_oracle_miss_writes_recovery_demonstrations_that_say_where_the_retry_starts(tmp_path):
    if not _render_ok():
        pytest.skip("no headless GL")
    r = _cli("record", "--robot", "sim-panda", "--policy", "oracle", "--task", "math_matching", "--oracle-miss",
             "0.05", "--out", str(tmp_path), "--seed", "0")
    assert r.returncode == 0, r.stderr
    ep = read_episode(next(tmp_path.glob("*.chatvla")))
    assert ep.footer.outcome["success"] is True
    retry = ep.header.task["retry_from"]
    assert isinstance(retry, int) and 0 < retry < len(ep.records)
    grip = list(ep.header.profile.gripper_indices)
    assert all(v == 0.0 for v in ep.records[retry - 1].action[grip])  # the miss closed the gripper ...
    assert all(v > 0.0 for v in ep.records[retry + 5].action[grip])  # ... and the retry opens it again
