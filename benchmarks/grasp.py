"""Where does a closed-loop episode fail: in the text, or in the grasp that follows a right text?

    python benchmarks/grasp.py [--model chatvla-tiny-mm] [--episodes 20] [--first 1000] [--name grasp]

One simulated Panda (no other robot competing for the CPU) against a `chatvla serve` process, on
`chatvla eval`'s train-mode episodes `--first` on (default 1000-1019: not the 0-49 the model card
reports). Each episode runs twice:

  own      the model writes its own reasoning, as in `chatvla eval`
  true     every observation carries the true text for the scene at that tick (the answer card's
           current place, the square's), so only the expert and the grasp are measured

Per episode and mode: success, and at the first tick the fingers pass 7 cm (closing on the 6 cm card,
or on nothing) the tool centre's offset from the card's centre along its short side (which the
closing fingers take out) and its long side (which they do not), in cm, and the angle between the
closing direction and the short side (degrees; 0 = square to the card). A grasp that fails after a
right text points at the expert; a gap between the modes points at the text. Prints a table per mode and writes
benchmarks/results/grasp.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_result

from chatvla.cli.server_process import start_server
from chatvla.client.episodes import run_episode
from chatvla.client.sim.robot import make_sim_panda
from chatvla.client.sim.tasks.math_matching import MathMatchingTask, card_name
from chatvla.training.evaluate import ReasoningSteer, episode_task
from chatvla.training.labels import override_text

CLOSED_ON_SOMETHING = 0.07  # metres between the fingers: below the 8 cm opening, above the 6 cm card
MODES = ("own", "true")


class GraspWatch:
    """A tick observer that records where the fingers first close."""

    def __init__(self, robot: Any, task: MathMatchingTask) -> None:
        self.robot, self.task = robot, task
        self.closing: dict[str, float] | None = None

    def on_tick(self, record: Any) -> None:
        if self.closing is None and record.observation.state[-1] < CLOSED_ON_SOMETHING:
            self.closing = closing_geometry(self.robot, self.task)
            self.closing["tick"] = record.tick


def closing_geometry(robot: Any, task: MathMatchingTask) -> dict[str, float]:
    """The tool centre against the answer card when the fingers close: offsets in the card's frame
    (cm) and the angle between the closing direction and the card's short side (degrees, 0-90)."""
    pose = robot.object_poses()[card_name(task.answer)]
    pos, rot = robot.tcp_pose()
    d = pos - np.array([*robot.rig.task_origin, 0.0]) - pose.pos
    short, long_ = pose.rot[:2, 0], pose.rot[:2, 1]  # the card's x axis is its 6 cm side
    closing = rot[:2, robot.rig.tcp_closing_axis]
    cos = abs(float(short @ closing)) / max(float(np.linalg.norm(closing)), 1e-9)
    return {"along_short_cm": 100 * float(d[:2] @ short), "along_long_cm": 100 * float(d[:2] @ long_),
            "height_cm": 100 * float(d[2]), "yaw_error_deg": math.degrees(math.acos(min(1.0, cos)))}


def run(model: str, first: int, episodes: int, seconds: float) -> list[dict[str, Any]]:
    server = start_server(["--model", model])
    robot = make_sim_panda()
    rows: list[dict[str, Any]] = []
    try:
        for mode in MODES:
            for i in range(first, first + episodes):
                task = episode_task("train", i)
                assert isinstance(task, MathMatchingTask)
                robot.reset(task)
                watch = GraspWatch(robot, task)
                steer = ReasoningSteer(robot, partial(override_text, task, task.answer)) if mode == "true" else None
                run_episode(robot, [server.grpc_address], task.instruction,
                            max_ticks=round(seconds / robot.profile.dt),
                            observers=[watch] if steer is None else [steer, watch],
                            robot_id=f"grasp-{mode}-{i}", on_loop=steer.attach if steer is not None else None)
                row = {"mode": mode, "episode": i, "success": bool(robot.check_success().success),
                       **{k: round(v, 2) for k, v in (watch.closing or {}).items()}}
                rows.append(row)
                print(f"[grasp] {mode} #{i}: {'success' if row['success'] else 'fail'}", file=sys.stderr, flush=True)
    finally:
        robot.close()
        server.stop()
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: successes, and the median closing geometry of successes and failures."""
    out = []
    for mode in MODES:
        for won in (True, False):
            rs = [r for r in rows if r["mode"] == mode and r["success"] == won and "yaw_error_deg" in r]
            out.append({
                "mode": mode, "outcome": "success" if won else "fail",
                "episodes": sum(1 for r in rows if r["mode"] == mode and r["success"] == won),
                "closed": len(rs),
                "median_off_centre_long_cm": median([abs(r["along_long_cm"]) for r in rs]) if rs else None,
                "median_yaw_error_deg": median([r["yaw_error_deg"] for r in rs]) if rs else None,
                "yaw_error_over_15deg": sum(r["yaw_error_deg"] > 15 for r in rs),
            })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="chatvla-tiny-mm")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--first", type=int, default=1000, help="first train-mode episode index (default 1000)")
    ap.add_argument("--seconds", type=float, default=16.0)
    ap.add_argument("--name", default="grasp")
    args = ap.parse_args()
    if args.episodes < 1 or args.first < 0 or args.seconds <= 0:
        print("grasp.py: --episodes and --seconds must be positive, --first >= 0", file=sys.stderr)
        return 2
    rows = run(args.model, args.first, args.episodes, args.seconds)
    summ = summary(rows)
    print(table(summ))
    path = write_result(args.name, {"model": args.model, "first": args.first, "episodes": args.episodes,
                                    "seconds": args.seconds, "robots": 1, "summary": summ, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
