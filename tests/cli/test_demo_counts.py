"""`chatvla demo` and `chatvla inspect` count stalled and safety-clamped ticks the same way.

They used to disagree on the same episode (demo 0 stalls, inspect 7: the demo took the executor's counter,
which leaves out start-up, inspect counted start-up ticks as stalls). Here one control loop on a fake clock
feeds both what the demo counts live (TickCounter -> RobotReport) and the episode file `chatvla inspect`
reads; with a slow first reply (start-up ticks) and a slow reply later (stalled ticks), both must print the
same numbers, and the stalled ticks must be the executor's own stall counter.
"""

from __future__ import annotations

import json

from chatvla.cli.demo import RobotReport, print_report, write_episode_viewers
from chatvla.cli.main import main
from chatvla.client.episodes import EpisodeRecorder
from chatvla.client.executor import ChunkExecutor
from chatvla.client.fakes import FakeClock, FakePolicyConnection, FakeRobot, TrackingPolicy
from chatvla.client.recording import EpisodeWriter
from chatvla.client.runtime import ControlLoop
from chatvla.client.safety import SafetyConfig, SafetyFilter
from chatvla.client.tick_counts import TickCounter
from chatvla.client.viewer import video_available
from chatvla.profiles import FRANKA_JOINT


def _latency(seq: int, _req: object) -> float:
    if seq == 1:
        return 0.45  # the first chunk is slow: start-up ticks
    return 2.5 if seq in (3, 4, 5) else 0.05  # then a slow stretch: the queue runs dry


def test_demo_and_inspect_report_the_same_counts(tmp_path, capsys):
    clock = FakeClock()
    executor = ChunkExecutor(FRANKA_JOINT)
    counter = TickCounter()
    path = tmp_path / "robot0-ep000.chatvla"
    writer = EpisodeWriter(path, FRANKA_JOINT, instruction="place the card", overwrite=True)
    loop = ControlLoop(
        FakeRobot(FRANKA_JOINT, clock=clock),
        FakePolicyConnection(clock, TrackingPolicy(FRANKA_JOINT, noise=0.3), latency=_latency),
        executor,
        SafetyFilter(FRANKA_JOINT, SafetyConfig(step_scale=0.3)),  # tight step limit: some ticks get clamped
        clock=clock,
        observers=[counter, EpisodeRecorder(writer)],
    )
    loop.run(max_ticks=90)
    writer.close({"success": False})

    report = RobotReport(name="robot0", episodes=1, ticks=90, seconds=6.0)
    report.add_counts(counter.counts())
    assert report.startup_ticks > 0 and report.stalled_ticks > 0 and report.safety_clamped_ticks > 0
    assert report.stalled_ticks == executor.stats.stalls  # "stalled" is the executor's stall, start-up excluded

    assert main(["inspect", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["stall_ticks"], s["startup_ticks"], s["safety_clamped_ticks"]) == (
        report.stalled_ticks, report.startup_ticks, report.safety_clamped_ticks)
    assert s["interventions"] == report.safety

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{report.stalled_ticks} stalled ticks" in text
    assert f"{report.safety_clamped_ticks} safety-clamped ticks" in text
    print_report([report], "chatvla-tiny-mm")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("robot0 "))
    cells = row.split()
    assert cells[3:6] == [str(report.stalled_ticks), str(report.startup_ticks), str(report.safety_clamped_ticks)]

    report.episode_files.append(str(path))
    note = write_episode_viewers([report])  # what the demo does after its robots are done
    html = path.with_suffix(".html")
    assert html.exists() and report.viewers[0] == str(html)
    assert f"{report.stalled_ticks} stalled ticks" in html.read_text()  # the page's counts are the same too
    if video_available():
        assert note == "" and report.viewers == [str(html), str(path.with_suffix(".mp4"))]
    else:
        assert "chatvla-serve[video]" in note and len(report.viewers) == 1
    print_report([report], "chatvla-tiny-mm", note)
    assert f"robot0 viewer: {html}" in capsys.readouterr().out
