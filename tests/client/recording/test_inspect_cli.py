"""`chatvla inspect`: the summary a person reads after a run, the JSON form, and the PNG plot."""

from __future__ import annotations

import json

from chatvla.cli.main import main


def test_text_summary_and_plot(episode_file, tmp_path, capsys):
    path, _ = episode_file
    png = tmp_path / "actions.png"
    assert main(["inspect", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "closed cleanly" in out
    assert "franka_joint: joint_position, action 8" in out
    assert "ticks        40 (tick 0..39, 0 missing), 2.60 s, achieved 15.0 Hz" in out
    assert "chunks       5 received, arrival lag p50 2.0 / max 2 ticks" in out
    assert "stalls       2 stalled ticks (5.0%), 0 start-up ticks" in out
    assert "safety       1 safety-clamped ticks; step_limit x1" in out
    assert "answer is 7" in out
    assert "reasoning    5 chunks carry text; samples:" in out
    assert "  joint1 " in out and "  gripper " in out
    assert '"success": false' in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_json_summary(episode_file, capsys):
    path, acts = episode_file
    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["ticks"] == 40 and s["chunks_received"] == 5 and s["stall_ticks"] == 2
    assert s["startup_ticks"] == 0 and s["safety_clamped_ticks"] == 1
    assert s["interventions"] == {"step_limit": 1}
    assert len(s["reasoning_samples"]) == 3
    j1 = s["action_ranges"][0]
    assert j1["name"] == "joint1"
    assert abs(j1["min"] - float(acts[:, 0].min())) < 1e-6 and abs(j1["max"] - float(acts[:, 0].max())) < 1e-6
    assert s["server_ms_mean"]["expert"] == 12.0


def test_crashed_file_is_still_inspected(tmp_path, make_episode, capsys):
    path = tmp_path / "crash.chatvla"
    make_episode(path, n=10, close=False)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NOT closed" in out and "truncated tail" in out and "ticks        9 " in out


def test_invalid_file_names_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.chatvla"
    bad.write_bytes(b"not an episode")
    assert main(["inspect", str(bad)]) == 1
    assert "bad magic" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "no such file" in capsys.readouterr().err
