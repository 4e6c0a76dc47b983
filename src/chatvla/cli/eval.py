"""`chatvla eval`: closed-loop episodes of a sim task through the real stack (math matching on
simulated Pandas, or `--task toy_placement` on the simulated bimanual rig).

Starts `chatvla serve --model MODEL` in a child process (or uses --target), then drives simulated
robots with the robot-side client (gRPC policy client, chunk executor, safety filter, control loop at
15 Hz) on three sets of episodes: `train` (training numbers, new layouts), `heldout` (held-out
answers), `override` (every observation carries a reasoning naming a wrong card on the table; counts
how often that card is placed). Writes eval.json, filmstrip.png and report.html into --out, and the
summary JSON to --json if given (e.g. benchmarks/results/eval_math_matching.json).

    chatvla eval --task toy_placement --model runs/toy --json benchmarks/results/eval_toy_placement.json

runs the same three modes on toy placement: training toys on new layouts, held-out toys, and an override
that names another relation (counts how often the subject ends where that text says).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chatvla.cli.executor_flag import add_executor_flag, executor_from_flags
from chatvla.client.lockstep import DEFAULT_LATENCY_TICKS

DESCRIPTIONS = {
    "math_matching": "math matching on sim-panda (franka_joint) through chatvla serve + the gRPC client; "
                     "success = the task's own check at the end of the episode",
    "toy_placement": "toy placement on sim-bimanual (arx_r5_bimanual) through chatvla serve + the gRPC client; "
                     "success = the task's own check at the end of the episode",
}


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="closed-loop evaluation of a model on the sim tasks", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="math_matching", choices=("math_matching", "toy_placement"),
                   help="math_matching on sim-panda (default) or toy_placement on sim-bimanual")
    p.add_argument("--model",
                   help="checkpoint directory or preset served for the evaluation (default for math_matching: the "
                   "shipped model; toy_placement needs one trained with `chatvla train --task toy_placement`)")
    p.add_argument("--target", help="evaluate a running server instead (HOST:PORT)")
    p.add_argument("--token", help="bearer token for --target")
    p.add_argument("--episodes", type=int, default=50, help="episodes per mode (default 50)")
    p.add_argument("--first", type=int, default=0, metavar="INDEX",
                   help="index of each mode's first episode (default 0). The reported figures use 0-49; choosing a "
                   "setting on, say, --first 1000 keeps that choice off the episodes it is then reported on")
    p.add_argument("--modes", default="train,heldout,override",
                   help="comma-separated: train, heldout, override (default all three)")
    p.add_argument("--robots", type=int, default=2, help="simulated robots running at once (default 2)")
    p.add_argument("--seconds", type=float, default=20.0, help="episode length (default 20 s; the oracle needs ~11)")
    p.add_argument("--film", type=int, default=2, help="episodes per mode in the filmstrip (default 2)")
    p.add_argument("--out", default="eval-report", help="directory for eval.json, filmstrip.png, report.html")
    p.add_argument("--json", metavar="FILE", help="also write the summary (with per-episode results) here")
    p.add_argument("--server-arg", action="append", default=[], help="extra `chatvla serve` flag (repeatable)")
    add_executor_flag(p)
    clock = p.add_mutually_exclusive_group()
    clock.add_argument("--latency-ticks", type=int, default=DEFAULT_LATENCY_TICKS, metavar="N",
                   help="run on simulated time, each chunk landing N control ticks after its observation "
                   f"(default {DEFAULT_LATENCY_TICKS}, 133 ms at 15 Hz): the figures then depend on the model, "
                   "not on how busy this machine is; the simulation waits for a slower server")
    clock.add_argument("--real-time", action="store_true",
                   help="run on wall time instead, with the latency the server gives (what a real arm sees; "
                   "on a loaded machine the figures move with its load)")
    return p


WEIGHT_FILES = ("config.json", "stats.json", "model.safetensors", "expert/model.safetensors")


def weights_digest(model: str) -> str | None:
    """sha256 (first 16 hex digits) over a checkpoint directory's config, statistics and weights, or
    None for a seeded preset: a name such as `chatvla-tiny-mm` says nothing about which weights a
    result file measured once the shipped checkpoint has been replaced."""
    import hashlib

    from chatvla.model.presets import PRESETS, SHIPPED

    if model in PRESETS and model not in SHIPPED:  # `load_model` takes a preset name before a directory
        return None
    root = SHIPPED.get(model, Path(model))
    if not (root / "config.json").is_file():
        return None
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    from chatvla.training.evaluate import MODES

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        print(f"chatvla eval: unknown mode(s) {bad}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    if args.model is None and not args.target:
        if args.task != "math_matching":
            print(f"chatvla eval: --task {args.task} needs --model (a checkpoint trained for it) or --target",
                  file=sys.stderr)
            return 2
        args.model = "chatvla-tiny-mm"
    if args.episodes < 1 or args.robots < 1 or args.seconds <= 0:
        print("chatvla eval: --episodes, --robots and --seconds must be positive", file=sys.stderr)
        return 2
    if args.first < 0 or args.latency_ticks < 0:
        print("chatvla eval: --first and --latency-ticks must be 0 or more", file=sys.stderr)
        return 2
    from chatvla.client.executor import executor_settings

    executor = executor_from_flags(args, "eval")
    if executor is None:
        return 2
    from chatvla.cli.simcheck import sim_unavailable

    if sim_unavailable("eval"):
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("chatvla.client.safety").setLevel(logging.ERROR)  # counted per episode instead
    from chatvla.training.eval_report import filmstrip, html_report
    from chatvla.training.evaluate import outcomes_json, run_eval, summarise

    server = None
    addresses = [a.strip() for a in args.target.split(",")] if args.target else []
    if not addresses:
        from chatvla.cli.server_process import ServerStartError, start_server

        print(f"[eval] starting chatvla serve --model {args.model} ...", file=sys.stderr, flush=True)
        try:
            server = start_server(["--model", args.model, *args.server_arg])
        except ServerStartError as e:
            print(f"chatvla eval: {e}", file=sys.stderr)
            return 1
        addresses = [server.grpc_address]
    t0 = time.monotonic()
    try:
        policy = _served_policy(addresses[0], args.token)
        outcomes, films = run_eval(addresses, modes, args.episodes, robots=args.robots, seconds=args.seconds,
                                   film_episodes=args.film, token=args.token, kind=args.task,
                                   first=args.first, latency_ticks=None if args.real_time else args.latency_ticks,
                                   executor_config=executor)
    finally:
        if server is not None:
            rc = server.stop()
            if rc != 0:
                print(server.log_tail(), file=sys.stderr)
    summary = summarise(outcomes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model if not args.target else args.target, "episodes_per_mode": args.episodes,
            "robots": args.robots, "episode_seconds": args.seconds, "wall_seconds": round(time.monotonic() - t0, 1),
            "command": "chatvla " + " ".join(sys.argv[1:]),
            "description": DESCRIPTIONS[args.task]}
    if policy is not None and policy != {"every_n": 1, "every_seconds": 0.0}:
        meta["reasoning_policy"] = policy  # what the sessions got (absent: new text every observation)
    digest = None if args.target else weights_digest(args.model)
    if digest:
        meta["weights_sha256"] = digest  # which weights these figures belong to, whatever the name
    if args.first:
        meta["first_episode"] = args.first
    changed = executor_settings(executor)
    if changed:
        meta["executor"] = changed  # what differs from the robots' defaults
    meta["clock"] = ("wall" if args.real_time
                     else f"simulated, chunks land {args.latency_ticks} ticks after their observation")
    if args.task != "math_matching":  # math matching's eval.json keeps its fields (the model card quotes them)
        meta["task"] = args.task
    eps = outcomes_json(outcomes)
    doc = {"meta": meta, "summary": summary, "episodes": eps}
    (out / "eval.json").write_text(json.dumps(doc, indent=1) + "\n")
    film = filmstrip(films, out / "filmstrip.png")
    html_report(summary, meta, eps, film, out / "report.html")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    for mode, s in summary.items():
        line = (f"{mode:<9} success {s['success']['k']}/{s['success']['n']} ({s['success']['rate']:.0%}, "
                f"95% CI {s['success']['ci95'][0]:.0%}-{s['success']['ci95'][1]:.0%})")
        if "reasoning_correct_first" in s:
            line += f"; reasoning correct {s['reasoning_correct_first']['rate']:.0%}"
        if "override_followed" in s:
            what = "override card placed" if args.task == "math_matching" else "override followed"
            line += f"; {what} {s['override_followed']['k']}/{s['override_followed']['n']}"
        if s.get("episodes_with_failed_requests"):  # the server answered errors: the arm held meanwhile
            line += f"; {s['episodes_with_failed_requests']} episodes had failed requests (see eval.json)"
        print(line)
    print(f"report: {out / 'report.html'}")
    errors = sum(1 for o in outcomes if o.error)
    return 1 if errors == len(outcomes) else 0


def _served_policy(address: str, token: str | None) -> dict[str, float] | None:
    """The reasoning policy the server gives sessions that ask for none (the eval's robots ask for
    none): from its flags or its checkpoint, so the JSON says which one the figures were measured
    with. None if the server does not say."""
    import grpc

    from chatvla.cli.server_process import model_info

    try:
        info = model_info(address, token)
    except grpc.RpcError:
        return None
    if not info.HasField("default_reasoning"):
        return None
    r = info.default_reasoning
    return {"every_n": int(r.every_n), "every_seconds": float(r.every_seconds)}
