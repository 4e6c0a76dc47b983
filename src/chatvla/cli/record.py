"""`chatvla record`: record episodes (observation, chunk received, action executed, per tick) to files.

Two policies:
- `server` (default): the robot runs the full client stack against a policy server (`--target`),
  exactly as in production; every tick is written as it happens.
- `oracle` (simulated robots only): the sim's scripted pick-and-place solves the task; useful as
  demonstrations and as realistic observation streams for `chatvla loadtest`.

Robots: `sim-panda`, `sim-bimanual`, or a real adapter (`panda`, `franky`, `arx_r5`) with its
options given as `--robot-option KEY=VALUE` (e.g. `host=172.16.0.2`). Real adapters need camera
sources; without a camera driver the recording's images are a flat grey placeholder (say so loudly).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ("math_matching", "toy_placement")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("record", help="record episodes from a sim or a real robot", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--robot", required=True, help="sim-panda, sim-bimanual, panda, franky or arx_r5")
    p.add_argument("--robot-option", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor option of the robot adapter (repeatable)")
    p.add_argument("--out", required=True, help="directory for the episode files")
    p.add_argument("--policy", choices=("server", "oracle"), default="server",
                   help="who drives the robot: server (a policy server at --target) or oracle (the sim's "
                   "scripted expert, simulated robots only)")
    p.add_argument("--target", help="policy server HOST:PORT, several separated by commas, or dns:///NAME:PORT")
    p.add_argument("--token", help="bearer token for the server")
    p.add_argument("--robot-id", help="name for logs and replica choice (default: the robot name)")
    p.add_argument("--episodes", type=int, default=1, help="episodes to record, one file each")
    p.add_argument("--seconds", type=float, default=10.0, help="episode length in seconds with the server policy "
                   "(the oracle runs until its plan ends)")
    p.add_argument("--task", choices=(*TASKS, "both"), default="both", help="sim task (alternates if both)")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="sim task variants to draw: train or heldout")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sim task (episode e uses seed + e)")
    p.add_argument("--instruction", help="instruction for a real robot (sims take the task's)")
    p.add_argument("--image-encoding", choices=("jpeg", "rgb8"), default="jpeg",
                   help="how camera frames are stored: jpeg (small) or rgb8 (lossless)")
    p.add_argument("--images-every", type=int, default=1, help="store images on every Nth tick only")
    return p


def _options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--robot-option needs KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = value
    return out


def _record_oracle(robot: Any, writer: Any) -> bool:
    """Step the sim through the oracle's plan, writing every tick; returns task success."""
    import numpy as np

    from chatvla.client.sim import solve_task

    plan = solve_task(robot)
    dt = robot.profile.dt
    for tick, action in enumerate(plan):
        obs = robot.observe()
        robot.command(np.asarray(action, dtype=np.float32))
        writer.append(tick=tick, timestamp=tick * dt, state=obs.state, action=action, images=obs.images)
    return bool(robot.check_success().success)


def run(args: argparse.Namespace) -> int:
    from chatvla.client.episodes import EpisodeRecorder, episode_path, run_episode
    from chatvla.client.recording import EpisodeWriter
    from chatvla.client.robots.base import RobotError
    from chatvla.client.robots.registry import make_robot

    is_sim = args.robot.startswith("sim-")
    if args.policy == "oracle" and not is_sim:
        print("chatvla record: --policy oracle needs a simulated robot (sim-panda, sim-bimanual)", file=sys.stderr)
        return 2
    if args.policy == "server" and not args.target:
        print("chatvla record: --policy server needs --target HOST:PORT (start one with `chatvla serve`)",
              file=sys.stderr)
        return 2
    if not is_sim and not args.instruction:
        print("chatvla record: a real robot needs --instruction", file=sys.stderr)
        return 2
    try:
        options = _options(args.robot_option)
        if not is_sim and "cameras" not in options:
            from chatvla.client.robots.cameras import StaticCamera
            from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT, get_profile

            default = ARX_R5_BIMANUAL.name if args.robot == "arx_r5" else FRANKA_JOINT.name
            profile = get_profile(options.get("profile", default))
            options["cameras"] = {c.name: StaticCamera(c.height, c.width) for c in profile.cameras}
            print("chatvla record: WARNING no camera driver configured: images are a flat grey placeholder",
                  file=sys.stderr)
        robot = make_robot(args.robot, **options)
        robot.connect()
    except (RobotError, ValueError, TypeError) as e:
        print(f"chatvla record: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for ep in range(args.episodes):
            task_meta: dict[str, Any] = {}
            instruction = args.instruction or ""
            if is_sim:
                from chatvla.client.sim.tasks import make_task

                kind = TASKS[ep % 2] if args.task == "both" else args.task
                task = make_task(kind, seed=args.seed + ep, split=args.split)
                robot.reset(task)
                instruction = task.instruction
                task_meta = {"kind": kind, "seed": task.seed, "split": task.split, "policy": args.policy}
            path = episode_path(out, args.robot, ep)
            writer = EpisodeWriter(path, robot.profile, instruction=instruction, task=task_meta,
                                   image_encoding=args.image_encoding, overwrite=True)
            t0 = time.monotonic()
            if args.policy == "oracle":
                success: bool | None = _record_oracle(robot, writer)
            else:
                res = run_episode(robot, [a.strip() for a in args.target.split(",")], instruction,
                                  robot_id=args.robot_id or args.robot,
                                  max_ticks=max(1, round(args.seconds * robot.profile.control_rate_hz)),
                                  observers=[EpisodeRecorder(writer, images_every=args.images_every)],
                                  token=args.token,
                                  success=(lambda: robot.check_success().success) if is_sim else None)
                success = res.success
            writer.close({"success": success})
            print(f"wrote {path} ({writer.ticks_written} ticks, {time.monotonic() - t0:.1f} s, success={success})")
    except Exception as e:  # the robot must be left stopped whatever happened
        print(f"chatvla record: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        robot.close()
    return 0
