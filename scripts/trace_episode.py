"""Trace closed-loop episodes tick by tick: each chunk's reasoning against the truth, and where the
gripper is relative to the answer card.

    python scripts/trace_episode.py [--model chatvla-tiny-mm] [--episodes 0,1] [--mode own|correct]

Starts a `chatvla serve` process, runs `chatvla eval`'s train-mode episodes (same seeds) with one
simulated Panda and prints, whenever a chunk arrives (and every second otherwise): the tick, the tool
centre's offset from the answer card in cm (task frame: x away from the robot, y to its left, z up),
the gripper width, and the chunk's reasoning next to the text a correct model would write for the
scene at that moment. `--mode correct` supplies that correct text as the reasoning override instead,
so the expert's following can be watched apart from the reading. Diagnostic output for people, no
JSON: the figures that are compared across models come from `chatvla eval`.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import numpy as np

from chatvla.cli.server_process import start_server
from chatvla.client.episodes import run_episode
from chatvla.client.sim.robot import make_sim_panda
from chatvla.client.sim.tasks.math_matching import MathMatchingTask, card_name
from chatvla.training.evaluate import ReasoningSteer, episode_task
from chatvla.training.labels import override_text, reasoning_for


class Tracer:
    """A tick observer that prints."""

    def __init__(self, robot: Any, task: MathMatchingTask, every: int) -> None:
        self.robot, self.task, self.every = robot, task, every

    def on_tick(self, record: Any) -> None:
        if not record.replies and record.tick % self.every:
            return
        poses = self.robot.object_poses()
        card = poses[card_name(self.task.answer)].pos
        tcp = self.robot.tcp_pose()[0] - np.array([*self.robot.rig.task_origin, 0.0])
        d = 100 * (tcp - card)
        dry = " (queue dry)" if record.proposed is None else ""
        print(f"t{record.tick:3d}  tcp-card ({d[0]:5.1f}, {d[1]:5.1f}, {d[2]:5.1f}) cm  "
              f"gripper {record.observation.state[-1]:.3f}{dry}")
        for r in record.replies:
            if r.reasoning:
                print(f"      said: {r.reasoning}\n      true: {reasoning_for(self.task, poses)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="chatvla-tiny-mm")
    ap.add_argument("--episodes", default="0", help="comma-separated train-mode episode indices")
    ap.add_argument("--mode", choices=("own", "correct"), default="own")
    ap.add_argument("--seconds", type=float, default=16.0)
    args = ap.parse_args()
    server = start_server(["--model", args.model])
    robot = make_sim_panda()
    try:
        for i in (int(x) for x in args.episodes.split(",")):
            task = episode_task("train", i)
            assert isinstance(task, MathMatchingTask)
            robot.reset(task)
            tracer = Tracer(robot, task, every=round(1 / robot.profile.dt))
            steer = ReasoningSteer(robot, partial(override_text, task, task.answer)) if args.mode == "correct" else None
            print(f"=== episode {i}: {task.a}+{task.b}={task.answer}")
            ticks = round(args.seconds / robot.profile.dt)
            run_episode(robot, [server.grpc_address], task.instruction, max_ticks=ticks,
                        observers=[tracer] if steer is None else [steer, tracer], robot_id=f"trace-{i}",
                        on_loop=steer.attach if steer is not None else None)
            print("result:", robot.check_success())
    finally:
        robot.close()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
