"""`chatvla record`: record episodes (observation, chunk received, action executed, per tick) to files.

Two policies:
- `server` (default): the robot runs the full client stack against a policy server (`--target`),
  exactly as in production; every tick is written as it happens.
- `oracle` (simulated robots only): the sim's scripted pick-and-place solves the task; useful as
  demonstrations and as realistic observation streams for `chatvla loadtest`. With `--oracle-miss M`
  its first grasp lands M metres beside the object (direction drawn from the task seed), lifts the empty
  gripper and then tries again from there: demonstrations of recovering from a miss. The episode's task
  header records the tick the retry starts at (`retry_from`); `chatvla train` learns from the retry only.

Robots: `sim-panda`, `sim-bimanual`, or a real adapter (`panda`, `franky`, `arx_r5`) with its
options given as `--robot-option KEY=VALUE` (e.g. `host=172.16.0.2`). Real adapters need one camera
source per camera of their profile, given as `--camera NAME=SOURCE[@WIDTHxHEIGHT][@FPS]`:

  --camera front=opencv:0 --camera wrist=opencv:/dev/video2@640x480@30   (pip install 'chatvla-serve[camera]')
  --camera cam_top=realsense:123456789012@848x480@30                     (pip install 'chatvla-serve[realsense]')
  --camera wrist=static                                                  (grey placeholder)

A camera whose newest frame is older than --camera-max-age (default: 5 frame periods, at least 0.25 s)
stops the robot with an error naming it. Without any --camera the images are a flat grey placeholder
(a dry run; said loudly).
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
    p.add_argument("--camera", action="append", default=[], metavar="NAME=SOURCE",
                   help="camera source of a real robot, one per profile camera (repeatable): opencv:INDEX|PATH, "
                   "realsense[:SERIAL] or static, optionally @WIDTHxHEIGHT and @FPS")
    p.add_argument("--camera-max-age", type=float, metavar="SECONDS",
                   help="stop the robot when a camera's newest frame is older than this (default: 5 frame "
                   "periods of the camera, at least 0.25 s)")
    p.add_argument("--out", required=True, help="directory for the episode files")
    p.add_argument("--policy", choices=("server", "oracle"), default="server",
                   help="who drives the robot: server (a policy server at --target) or oracle (the sim's "
                   "scripted expert, simulated robots only)")
    p.add_argument("--oracle-miss", type=float, default=0.0, metavar="METRES",
                   help="with --policy oracle: miss the first grasp by this distance, then retry (recovery "
                   "demonstrations; default 0: no miss)")
    p.add_argument("--target", help="policy server HOST:PORT, several separated by commas, or dns:///NAME:PORT")
    p.add_argument("--token", help="bearer token for the server")
    p.add_argument("--robot-id", help="name for logs and replica choice (default: the robot name)")
    p.add_argument("--episodes", type=int, default=1,
                   help="episodes to record, one file each (task seeds --seed .. --seed+N-1; with --policy oracle a "
                   "layout the scripted arm cannot reach is skipped, and said)")
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


def _cameras(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """The cameras of a real robot: from --camera specs, else grey placeholders (a dry run)."""
    from chatvla.client.robots.camera_drivers.sources import open_cameras, parse_camera_source
    from chatvla.client.robots.cameras import static_cameras
    from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT, get_profile

    default = ARX_R5_BIMANUAL.name if args.robot == "arx_r5" else FRANKA_JOINT.name
    profile = options.get("profile", default)
    if isinstance(profile, str):
        try:
            profile = get_profile(profile)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if "profile" in options:
            options["profile"] = profile  # the adapters take a RobotProfile, the command line gives its name
    if args.camera:
        sources = [parse_camera_source(spec) for spec in args.camera]
        return open_cameras(sources, profile, max_age_s=args.camera_max_age)
    print("chatvla record: WARNING no --camera given: images are a flat grey placeholder", file=sys.stderr)
    return static_cameras(profile)


def _record_oracle(robot: Any, writer: Any, plan: Any) -> bool:
    """Step the sim through the oracle's plan, writing every tick; returns task success."""
    import numpy as np

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
    if args.oracle_miss and (args.policy != "oracle" or not 0.0 < args.oracle_miss <= 0.2):
        print("chatvla record: --oracle-miss takes a distance in metres in (0, 0.2] and needs --policy oracle",
              file=sys.stderr)
        return 2
    if args.policy == "server" and not args.target:
        print("chatvla record: --policy server needs --target HOST:PORT (start one with `chatvla serve`)",
              file=sys.stderr)
        return 2
    if not is_sim and not args.instruction:
        print("chatvla record: a real robot needs --instruction", file=sys.stderr)
        return 2
    if args.camera and is_sim:
        print("chatvla record: --camera is for real robots (simulated robots render their own cameras)",
              file=sys.stderr)
        return 2
    if args.camera_max_age is not None and args.camera_max_age <= 0:
        print("chatvla record: --camera-max-age must be positive", file=sys.stderr)
        return 2
    cameras: dict[str, Any] = {}
    try:
        options = _options(args.robot_option)
        if not is_sim and "cameras" not in options:
            cameras = _cameras(args, options)
            options["cameras"] = cameras
        robot = make_robot(args.robot, **options)
        robot.connect()
    except (RobotError, ValueError, TypeError) as e:
        from chatvla.client.robots.camera_drivers.sources import close_cameras

        close_cameras(cameras)  # a robot that failed to connect never closes them; their grab threads must stop
        print(f"chatvla record: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = 0
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
            plan = None
            if args.policy == "oracle":
                from chatvla.client.sim import PlanningError, solve_task, solve_task_with_retry

                try:
                    if args.oracle_miss:
                        plan, task_meta["retry_from"] = solve_task_with_retry(robot, args.oracle_miss)
                    else:
                        plan = solve_task(robot)
                except PlanningError as e:  # a layout the scripted arm cannot reach: no demonstration
                    skipped += 1
                    print(f"skipped episode {ep} (task seed {args.seed + ep}): the oracle found no plan ({e})",
                          file=sys.stderr)
                    continue
            path = episode_path(out, args.robot, ep)
            writer = EpisodeWriter(path, robot.profile, instruction=instruction, task=task_meta,
                                   image_encoding=args.image_encoding, overwrite=True)
            t0 = time.monotonic()
            if args.policy == "oracle":
                success: bool | None = _record_oracle(robot, writer, plan)
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
    if skipped:
        print(f"recorded {args.episodes - skipped} of {args.episodes} episodes: {skipped} layouts had no oracle plan",
              file=sys.stderr)
    return 0
