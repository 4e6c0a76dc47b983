"""`chatvla demo`: start a server on the embedded model and drive simulated robots through the paper's tasks.

Everything is real: the server is `chatvla serve` in a child process, each robot is a MuJoCo sim
behind the same client stack a real arm uses (gRPC policy client, chunk executor, safety filter,
control loop at the profile's rate). The default model, `chatvla-tiny-mm`, was trained on math
matching (read the whiteboard, add, put the card with the answer on the green square), so that is the
default task; `--task both` alternates it with toy placement, which that model was not trained on.
The report gives, per robot, the control rate achieved, stalled and safety-clamped ticks (counted as
`chatvla inspect` counts them, chatvla.client.tick_counts), latency by stage, the reasoning of every
episode and the success count. Every episode is recorded (to --record DIR, else a new temporary
directory) with a viewer next to it: an HTML page and, with the video extra installed, an MP4 (the same
files as `chatvla inspect EP --html/--video`); the report prints where. The seeded presets (`tiny`, ...)
are untrained: they fail every task, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatvla.cli.executor_flag import add_executor_flag, executor_from_flags
from chatvla.client.tick_counts import TickCounts
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT

SIM_FOR_PROFILE = {FRANKA_JOINT.name: "sim-panda", ARX_R5_BIMANUAL.name: "sim-bimanual"}
TASKS = ("math_matching", "toy_placement")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="start a server and drive simulated robots through episodes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--robots", type=int, default=2, help="simulated robots running at once (default 2)")
    p.add_argument("--episodes", type=int, default=2, help="episodes per robot, alternating the two tasks")
    p.add_argument("--episode-seconds", type=float, default=15.0,
                   help="length of one episode (default 15 s; the scripted expert needs about 11)")
    p.add_argument("--task", choices=("math_matching", "toy_placement", "both"), default="math_matching",
                   help="sim task (default math_matching, what the shipped model was trained on)")
    p.add_argument("--model", default="chatvla-tiny-mm",
                   help="model for the server: shipped model (default chatvla-tiny-mm, trained), preset or "
                   "checkpoint directory")
    p.add_argument("--engine", default="torch", help="server engine (torch, vllm, null)")
    p.add_argument("--target", help="use running servers instead of starting one: HOST:PORT, several "
                   "separated by commas, or dns:///NAME:PORT (robots are spread over the replicas)")
    p.add_argument("--token", help="bearer token for --target")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="task variants to draw: train (what the model saw) or heldout")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed of the task variants and sims (robot i, episode e use seed + 1000*i + e)")
    p.add_argument("--record", metavar="DIR", help="write each episode and its viewer to DIR (msgpack, see "
                   "docs/recording.md); without it they go to a new temporary directory")
    p.add_argument("--no-viewer", action="store_true",
                   help="write no viewer (HTML, MP4) and, without --record, no episode files")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--server-arg", action="append", default=[], help="extra `chatvla serve` flag (repeatable)")
    add_executor_flag(p)
    p.add_argument("--verbose", action="store_true", help="log every safety intervention streak")
    return p


@dataclass
class RobotReport:
    name: str
    episodes: int = 0
    successes: int = 0
    ticks: int = 0
    seconds: float = 0.0
    stalled_ticks: int = 0  # definitions: chatvla.client.tick_counts, the same as `chatvla inspect`
    startup_ticks: int = 0
    safety_clamped_ticks: int = 0
    missed_ticks: int = 0
    holds: int = 0
    safety: dict[str, int] = field(default_factory=dict)  # ticks on which each intervention fired
    chunks: int = 0
    latency: dict[str, Any] = field(default_factory=dict)
    reasoning_sample: str = ""
    outcomes: list[str] = field(default_factory=list)
    episode_files: list[str] = field(default_factory=list)
    viewers: list[str] = field(default_factory=list)
    error: str = ""

    def add_counts(self, counts: TickCounts) -> None:
        """Add one episode's tick counts (from a TickCounter on the live loop, which sees exactly what the
        episode file records, so `chatvla inspect` of that file prints the same numbers)."""
        self.stalled_ticks += counts.stalled_ticks
        self.startup_ticks += counts.startup_ticks
        self.safety_clamped_ticks += counts.safety_clamped_ticks
        for kind, n in counts.safety.items():
            self.safety[kind] = self.safety.get(kind, 0) + n

    @property
    def rate_hz(self) -> float:
        return self.ticks / self.seconds if self.seconds else 0.0


class _FirstReasoning:
    """The first reasoning text a robot received in an episode (what it read off the scene)."""

    def __init__(self) -> None:
        self.text = ""

    def on_tick(self, record: Any) -> None:
        for r in record.replies:
            if r.reasoning and not self.text:
                self.text = r.reasoning


def _robot_worker(idx: int, args: argparse.Namespace, addresses: list[str], profile_name: str,
                  out: RobotReport) -> None:
    from chatvla.client.episodes import EpisodeRecorder, LatencyObserver, episode_path, run_episode
    from chatvla.client.recording import EpisodeWriter
    from chatvla.client.robots.registry import make_robot
    from chatvla.client.sim.tasks import MathMatchingTask, make_task
    from chatvla.client.tick_counts import TickCounter

    robot = None
    try:
        lat = LatencyObserver()
        robot = make_robot(SIM_FOR_PROFILE[profile_name], seed=args.seed + 1000 * idx)
        ticks = max(1, round(args.episode_seconds * robot.profile.control_rate_hz))
        for ep in range(args.episodes):
            kind = TASKS[(idx + ep) % len(TASKS)] if args.task == "both" else args.task
            task = make_task(kind, seed=args.seed + 1000 * idx + ep, split=args.split)
            robot.reset(task)
            first = _FirstReasoning()
            counter = TickCounter()
            observers: list[Any] = [lat, first, counter]
            writer = None
            if args.record:
                path = episode_path(args.record, out.name, ep)
                out.episode_files.append(str(path))
                writer = EpisodeWriter(path, robot.profile,
                                       instruction=task.instruction,
                                       task={"kind": kind, "seed": task.seed, "split": task.split},
                                       overwrite=True)
                observers.append(EpisodeRecorder(writer))
            res = run_episode(robot, addresses, task.instruction, max_ticks=ticks, observers=observers,
                              token=args.token, robot_id=out.name, executor_config=args.executor_config,
                              success=lambda r=robot: r.check_success().success)
            if writer is not None:
                writer.close({"success": bool(res.success)})
            counts = counter.counts()
            out.add_counts(counts)
            out.episodes += 1
            out.successes += int(bool(res.success))
            out.ticks += res.ticks
            out.seconds += res.seconds
            out.missed_ticks += int(res.summary.get("missed_ticks", 0))
            out.holds += int(res.summary.get("holds", 0))
            out.outcomes.append(f"{kind}:{'ok' if res.success else 'fail'}")
            board = f"board {task.a}+{task.b}, " if isinstance(task, MathMatchingTask) else ""
            print(f"[demo] {out.name} episode {ep + 1}/{args.episodes} ({kind}): "
                  f"{'success' if res.success else 'no success'}, {res.ticks} ticks in {res.seconds:.1f} s, "
                  f"{counts.stalled_ticks} stalled ticks, {counts.safety_clamped_ticks} safety-clamped ticks; "
                  f"{board}reasoning: {quoted(first.text)}", file=sys.stderr, flush=True)
        out.chunks = lat.chunks
        out.latency = lat.percentiles()
        out.reasoning_sample = lat.reasoning[-1] if lat.reasoning else ""
    except Exception as e:  # reported per robot; the other robots carry on
        out.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if robot is not None:
            robot.close()


def _model_profile(address: str, token: str | None) -> str:
    from chatvla.cli.server_process import model_info

    return model_info(address, token).profile.name


def quoted(text: str) -> str:
    """Reasoning as a reader wants it: plain text on one line in double quotes, no escapes; '-' if none."""
    text = " ".join(text.split())
    return f'"{text}"' if text else "-"


def safety_text(counts: dict[str, int]) -> str:
    """Safety-filter interventions with their names, as `chatvla inspect` prints them."""
    items = sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} x{v}" for k, v in items) if items else "no interventions"


def _fmt_ms(d: dict[str, Any]) -> str:
    return f"{d['p50']:.0f}/{d['p99']:.0f}" if d.get("n") else "-"


def write_episode_viewers(reports: list[RobotReport]) -> str:
    """Write the viewer of every recorded episode next to its file (the same as `chatvla inspect EP --html
    EP.html --video EP.mp4`), after the robots are done so rendering never competes with a control loop.
    Returns a note for the report when videos were left out."""
    from chatvla.cli.inspect import write_viewers
    from chatvla.client.recording import read_episode
    from chatvla.client.viewer import VIDEO_EXTRA, video_available

    with_video = video_available()
    for r in reports:
        for f in r.episode_files:
            path = Path(f)
            try:
                written = write_viewers(read_episode(path, allow_truncated=True), html=path.with_suffix(".html"),
                                        video=path.with_suffix(".mp4") if with_video else None, title=path.name)
            except Exception as e:  # a viewer is a convenience: report it, keep the run's result
                print(f"[demo] no viewer for {path}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            r.viewers += [where for _, where in written]
    if with_video:
        return ""
    return f"videos not written: pip install 'chatvla-serve[{VIDEO_EXTRA}]' (imageio-ffmpeg) for an MP4 per episode"


def print_report(reports: list[RobotReport], model: str, viewer_note: str = "") -> None:
    head = (f"{'robot':<10} {'rate Hz':>8} {'ticks':>6} {'stalled':>7} {'start-up':>8} {'clamped':>7} "
            f"{'missed':>6} {'chunks':>6} "
            f"{'rtt p50/p99':>12} {'reason p50/p99':>15} {'expert p50/p99':>15} {'success':>8}")
    print(head)
    print("-" * len(head))
    for r in reports:
        lat = r.latency
        print(f"{r.name:<10} {r.rate_hz:>8.2f} {r.ticks:>6} {r.stalled_ticks:>7} {r.startup_ticks:>8} "
              f"{r.safety_clamped_ticks:>7} {r.missed_ticks:>6} {r.chunks:>6} "
              f"{_fmt_ms(lat.get('round_trip_ms', {})):>12} {_fmt_ms(lat.get('reasoning_ms', {})):>15} "
              f"{_fmt_ms(lat.get('expert_ms', {})):>15} {f'{r.successes}/{r.episodes}':>8}")
    for r in reports:
        if r.error:
            print(f"{r.name}: ERROR {r.error}")
            continue
        print(f"{r.name} safety: {safety_text(r.safety)}")
        if r.reasoning_sample:
            print(f"{r.name} reasoning sample: {quoted(r.reasoning_sample)}")
        for where in r.viewers:
            print(f"{r.name} viewer: {where}")
    print("stalled = stalled ticks (after the first action the executor had none and the arm held), start-up = "
          "ticks waiting for the first chunk, clamped = safety-clamped ticks (the safety filter changed or "
          "replaced the policy's action); counted as `chatvla inspect` counts them. Safety lists the ticks per "
          "intervention (stall_hold is the hold of a start-up or stalled tick). Latency columns are p50/p99 in "
          "ms: rtt = client round trip, reason/expert = server stages")
    if viewer_note:
        print(viewer_note)
    total = sum(r.successes for r in reports)
    n = sum(r.episodes for r in reports)
    print(f"tasks solved: {total}/{n}.{measured_note(model)}")


def measured_note(model: str) -> str:
    """What the model's own card says it completes, so a handful of demo episodes is read against the
    measured rate rather than against a sentence written for an earlier checkpoint."""
    if model.startswith("tiny"):
        return (" The seeded tiny presets are untrained (random weights): failing every task is the expected "
                "result; the default chatvla-tiny-mm is trained.")
    from chatvla.server.card import model_card

    card = model_card(model, "torch")
    figures = (card.get("eval") or {}).get("figures", []) if card.get("trained") else []
    done = {f["set"]: f for f in figures if f["metric"] == "success" and f["set"] in ("train", "heldout")}
    if not done:
        return ""
    said = " and ".join(f"{f['k']}/{f['n']} {'held-out' if name == 'heldout' else 'train-split'}"
                        for name, f in done.items())
    return (f" Its evaluation of record completed {said} episodes (docs/model.md); a few demo episodes "
            "scatter widely around such rates.")


def run(args: argparse.Namespace) -> int:
    if args.robots < 1 or args.episodes < 1 or args.episode_seconds <= 0:
        print("chatvla demo: --robots, --episodes and --episode-seconds must be positive", file=sys.stderr)
        return 2
    args.executor_config = executor_from_flags(args, "demo")
    if args.executor_config is None:
        return 2
    from chatvla.cli.simcheck import sim_unavailable

    if sim_unavailable("demo"):
        return 2
    if not args.record and not args.no_viewer:  # the viewers are made from the episode files
        args.record = tempfile.mkdtemp(prefix="chatvla-demo-")
    if args.record:
        Path(args.record).mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # an untrained model trips the limits constantly; the table counts them
        logging.getLogger("chatvla.client.safety").setLevel(logging.ERROR)

    server = None
    addresses = [a.strip() for a in args.target.split(",") if a.strip()] if args.target else []
    if not addresses:
        from chatvla.cli.server_process import ServerStartError, start_server

        print(f"[demo] starting chatvla serve --model {args.model} --engine {args.engine} ...", file=sys.stderr,
              flush=True)
        t0 = time.monotonic()
        try:
            server = start_server(["--model", args.model, "--engine", args.engine, *args.server_arg])
        except ServerStartError as e:
            print(f"chatvla demo: {e}", file=sys.stderr)
            return 1
        addresses = [server.grpc_address]
        print(f"[demo] server ready in {time.monotonic() - t0:.1f} s: grpc={server.grpc_address} "
              f"http={server.http_url}", file=sys.stderr, flush=True)
    code = 0
    try:
        profile = _model_profile(addresses[0], args.token)
        if profile not in SIM_FOR_PROFILE:
            print(f"chatvla demo: no simulator for the model's profile {profile!r}", file=sys.stderr)
            return 2
        reports = [RobotReport(name=f"robot{i}") for i in range(args.robots)]
        threads = [threading.Thread(target=_robot_worker, args=(i, args, addresses, profile, reports[i]),
                                    name=f"demo-robot{i}", daemon=True) for i in range(args.robots)]
        print(f"[demo] {args.robots} x {SIM_FOR_PROFILE[profile]} ({profile}), {args.episodes} episodes of "
              f"{args.episode_seconds:g} s each", file=sys.stderr, flush=True)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        note = "" if args.no_viewer else write_episode_viewers(reports)
        print_report(reports, args.model, note)
        if args.json:
            Path(args.json).write_text(json.dumps([{**vars(r), "rate_hz": r.rate_hz} for r in reports], indent=2))
        code = 1 if any(r.error for r in reports) else 0
    finally:
        if server is not None:
            rc = server.stop()
            print(f"[demo] server stopped (exit code {rc})", file=sys.stderr)
            if rc != 0:
                print(server.log_tail(), file=sys.stderr)
                code = code or 1
    return code
