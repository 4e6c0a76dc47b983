"""`chatvla loadtest`: replay recorded episodes from N virtual robots against a server, then report.

    chatvla loadtest --recordings recs/ --robots 16 --duration 60 --target 127.0.0.1:50051 \\
        --ramp-up 10 --metrics-url http://127.0.0.1:8080/metrics --report-dir loadtest-report
    chatvla loadtest --synthetic --robots 4 --duration 20 --target 127.0.0.1:50051

Targets loopback only unless --allow-remote. Exit codes: 0 the run completed (read the report for
errors), 1 it could not run (server unreachable, no usable recordings), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from chatvla.client.loadtest.runner import MAX_DURATION_S, MAX_ROBOTS

    p = subparsers.add_parser(
        "loadtest", help="replay recordings from many virtual robots against a server",
        description="N virtual robots replay recorded episodes (or synthetic ones) through the real policy "
        "client and chunk executor, at each recording's control rate, against one server; writes a JSON and "
        "an HTML report (latency percentiles per stage, CDF, latency over time, batch sizes).",
    )
    src = p.add_argument_group("what to replay")
    src.add_argument("--recordings", metavar="DIR|FILE", help="episode file, or a directory of *.chatvla files")
    src.add_argument("--synthetic", action="store_true",
                     help="synthesize episodes for the server's profile (also the fallback if --recordings "
                     "has none)")
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the server's gRPC address (default 127.0.0.1:50051; loopback only unless --allow-remote)")
    p.add_argument("--robots", type=int, default=4, help=f"virtual robots (1..{MAX_ROBOTS}, default 4)")
    p.add_argument("--duration", type=float, default=30.0,
                   help=f"seconds the run lasts, ramp-up included (max {MAX_DURATION_S:.0f}, default 30)")
    p.add_argument("--ramp-up", type=float, default=0.0, help="seconds over which robots start (default 0)")
    p.add_argument("--max-observations", type=int, default=None,
                   help="stop early after this many observations in total")
    p.add_argument("--token", default=None, help="bearer token (or env CHATVLA_TOKEN)")
    p.add_argument("--deadline-ms", type=int, default=1000, help="per-observation deadline (default 1000)")
    p.add_argument("--image-encoding", choices=["rgb8", "jpeg", "png"], default="rgb8",
                   help="how the client sends images (default rgb8)")
    p.add_argument("--metrics-url", default=None,
                   help="the server's Prometheus page for batch sizes (default http://<target host>:8080/metrics)")
    p.add_argument("--report-dir", default=None, help="where report.json and report.html go "
                   "(default loadtest-YYYYmmdd-HHMMSS)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback target (only a server you operate)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def run(args: argparse.Namespace) -> int:
    import os

    from chatvla.client.loadtest.runner import (
        LoadTestConfig,
        LoadTestError,
        run_loadtest,
        summary_lines,
        write_reports,
    )
    from chatvla.client.loadtest.sources import SourceError
    from chatvla.client.loadtest.targets import TargetError, check_target, check_url

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    config = LoadTestConfig(
        target=args.target, robots=args.robots, duration_s=args.duration, ramp_up_s=args.ramp_up,
        recordings=args.recordings, synthetic=args.synthetic, token=args.token or os.environ.get("CHATVLA_TOKEN"),
        metrics_url=args.metrics_url, allow_remote=args.allow_remote, max_observations=args.max_observations,
        deadline_ms=args.deadline_ms, image_encoding=args.image_encoding,
    )
    try:
        config.check()
        check_target(config.target, allow_remote=config.allow_remote)
        if config.metrics_url:
            check_url(config.metrics_url, allow_remote=config.allow_remote)
    except (LoadTestError, TargetError) as e:
        print(f"chatvla loadtest: {e}", file=sys.stderr)
        return 2
    try:
        report = run_loadtest(config, progress=None if args.quiet else sys.stderr)
    except (LoadTestError, SourceError, TargetError) as e:
        print(f"chatvla loadtest: {e}", file=sys.stderr)
        return 1
    directory = args.report_dir or time.strftime("loadtest-%Y%m%d-%H%M%S")
    json_path, html_path = write_reports(report, directory)
    for line in summary_lines(report):
        print(line)
    print(f"report: {json_path} {html_path}")
    return 0
