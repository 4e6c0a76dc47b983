"""Run a load test: N virtual robots against one server, bounded in time and count, then summarise.

    config = LoadTestConfig(target="127.0.0.1:50051", robots=8, duration_s=30, recordings="recs/")
    result = run_loadtest(config)            # a dict: the JSON report (see docs/operations.md)

The run checks the target (loopback unless `allow_remote`), asks the server for its model (profile),
loads recordings for that profile (or synthesizes episodes), starts robot i at `i * ramp_up_s / N`,
stops every robot at `duration_s` (or when `max_observations` were sent), and scrapes `/metrics`
once a second for batch sizes, queue depths and server-side rejections.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from chatvla.client.config import ClientConfig, SessionConfig
from chatvla.client.connection import PolicyConnection, PolicyError
from chatvla.client.executor import ExecutorConfig
from chatvla.client.loadtest.robot import RobotStats, Sample, SharedBudget, VirtualRobot
from chatvla.client.loadtest.scrape import (
    ACTIVE_SESSIONS,
    BATCH_SIZE_SUM,
    QUEUE_DEPTH,
    REJECTED_TOTAL,
    REQUESTS_TOTAL,
    Scraper,
    batch_histogram,
    batch_series,
    deltas,
    value,
)
from chatvla.client.loadtest.sources import ReplayEpisode, SourceError, load_recordings, synthetic_episodes
from chatvla.client.loadtest.targets import check_target, check_url
from chatvla.client.policy_client import GrpcPolicyClient
from chatvla.profiles import FRANKA_JOINT, RobotProfile, get_profile
from chatvla.wire.vocabulary import BATCH_STAGES, QUEUE_STAGES, TIMING_MS_FIELDS

log = logging.getLogger(__name__)

MAX_ROBOTS = 512
MAX_DURATION_S = 3600.0
MAX_SAMPLES = 2_000_000
# Failure codes that mean the server refused work (as opposed to a network or client-side failure).
REJECTION_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "SESSION_REJECTED", "UNAUTHENTICATED", "PERMISSION_DENIED")


class LoadTestError(RuntimeError):
    """The load test cannot run (bad settings, unreachable server, no usable recordings)."""


@dataclass(frozen=True)
class LoadTestConfig:
    target: str
    robots: int = 4
    duration_s: float = 30.0
    ramp_up_s: float = 0.0
    recordings: str | None = None
    synthetic: bool = False
    token: str | None = None
    metrics_url: str | None = None  # None: http://<target host>:8080/metrics, if it answers
    allow_remote: bool = False
    max_observations: int | None = None
    deadline_ms: int = 1000
    image_encoding: str = "rgb8"
    scrape_interval_s: float = 1.0
    connect_timeout_s: float = 10.0

    def check(self) -> None:
        if not 1 <= self.robots <= MAX_ROBOTS:
            raise LoadTestError(f"--robots must be between 1 and {MAX_ROBOTS}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise LoadTestError(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds")
        if not 0 <= self.ramp_up_s < self.duration_s:
            raise LoadTestError("--ramp-up must be >= 0 and shorter than --duration")
        if self.max_observations is not None and self.max_observations < 1:
            raise LoadTestError("--max-observations must be >= 1")
        if self.recordings is None and not self.synthetic:
            raise LoadTestError("give --recordings DIR|FILE, or --synthetic to run without recordings")
        if self.image_encoding not in ("rgb8", "jpeg", "png"):
            raise LoadTestError("--image-encoding must be rgb8, jpeg or png")


def _client_config(config: LoadTestConfig, robot: str) -> ClientConfig:
    return ClientConfig(
        addresses=(config.target,), token=config.token, deadline_ms=config.deadline_ms,
        image_encoding=config.image_encoding, robot_id=robot,
    )


def server_profile(config: LoadTestConfig) -> tuple[RobotProfile, dict[str, Any]]:
    """Ask the server which model and profile it serves (GetModelInfo)."""
    any_profile = FRANKA_JOINT
    probe = GrpcPolicyClient(_client_config(config, "loadtest-probe"), SessionConfig(profile=any_profile))
    try:
        info = probe.get_model_info(timeout=config.connect_timeout_s)
    except PolicyError as e:
        raise LoadTestError(f"cannot get the model from {config.target}: {e}") from None
    try:
        profile = get_profile(info.profile.name)
    except KeyError as e:
        raise LoadTestError(str(e)) from None
    return profile, {"model_id": info.model_id, "engine": info.engine, "profile": info.profile.name,
                     "server_version": info.server_version}


def _episodes(config: LoadTestConfig, profile: RobotProfile) -> tuple[list[ReplayEpisode], str]:
    if config.recordings is not None:
        try:
            return load_recordings(config.recordings, profile), "recordings"
        except SourceError as e:
            if not config.synthetic:
                raise LoadTestError(str(e)) from None
            log.warning("%s; using synthetic episodes", e)
    return synthetic_episodes(profile), "synthetic"


def _default_metrics_url(config: LoadTestConfig) -> str:
    host, _ = check_target(config.target, allow_remote=config.allow_remote)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:8080/metrics"


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self, out: TextIO | None, duration_s: float, robots: list[VirtualRobot], t0: float) -> None:
        self.out = out
        self.duration_s = duration_s
        self.robots = robots
        self.t0 = t0
        self.tty = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self._last_plain = -1e9

    def line(self) -> str:
        el = min(time.monotonic() - self.t0, self.duration_s)
        frac = el / self.duration_s
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        stats = [r.stats for r in self.robots]
        chunks = sum(s.chunks for s in stats)
        recent = [x[2] for s in stats for x in s.samples[-20:]]
        p50 = f"{np.median(recent):.1f} ms" if recent else "-"
        errors = sum(sum(s.errors.values()) for s in stats)
        active = sum(1 for s in stats if s.started and not s.finished)
        return (f"[{bar}] {el:5.1f}/{self.duration_s:.0f} s  robots {active}/{len(stats)}  chunks {chunks} "
                f"({chunks / max(el, 1e-9):.1f}/s)  rtt p50 {p50}  stalls {sum(s.stalls for s in stats)}  "
                f"errors {errors}")

    def tick(self, final: bool = False) -> None:
        if self.out is None:
            return
        if self.tty:
            self.out.write("\r" + self.line() + ("\n" if final else ""))
            self.out.flush()
        elif final or time.monotonic() - self._last_plain >= 5.0:
            self._last_plain = time.monotonic()
            print(self.line(), file=self.out, flush=True)


def run_loadtest(
    config: LoadTestConfig,
    *,
    progress: TextIO | None = sys.stderr,
    connect: Callable[[ReplayEpisode, int], PolicyConnection] | None = None,
    executor_config: ExecutorConfig | None = None,
) -> dict[str, Any]:
    """Run and return the report (a JSON-able dict). `connect` overrides how a robot's connection is
    made (default: a GrpcPolicyClient to `config.target` for the episode's profile)."""
    config.check()
    check_target(config.target, allow_remote=config.allow_remote)
    metrics_url = config.metrics_url
    if metrics_url is not None:
        check_url(metrics_url, allow_remote=config.allow_remote)
    profile, model = server_profile(config)
    episodes, source = _episodes(config, profile)

    def default_connect(ep: ReplayEpisode, i: int) -> PolicyConnection:
        return GrpcPolicyClient(
            _client_config(config, f"loadtest-{i}"),
            SessionConfig(profile=ep.profile, instruction=ep.instruction,
                          max_in_flight=(executor_config or ExecutorConfig()).max_in_flight),
        )

    make = connect or default_connect
    t0 = time.monotonic()
    scraper = Scraper(metrics_url or _default_metrics_url(config), token=config.token,
                      interval_s=config.scrape_interval_s, t0=t0)
    scraper.start()
    if not scraper.snapshots:
        if metrics_url is not None:
            log.warning("cannot scrape %s: %s", metrics_url, scraper.last_error)
        scraper.stop()
        scraper.snapshots.clear()
        scraper_on = False
    else:
        scraper_on = True
    stop = threading.Event()
    budget = SharedBudget(config.max_observations)
    end_at = t0 + config.duration_s
    per_robot = MAX_SAMPLES // config.robots
    robots = [
        VirtualRobot(
            i, episodes, lambda ep, i=i: make(ep, i), t0=t0,
            start_at=t0 + (i * config.ramp_up_s / config.robots), end_at=end_at, stop=stop, budget=budget,
            executor_config=executor_config, max_samples=per_robot,
        )
        for i in range(config.robots)
    ]
    bar = Progress(progress, config.duration_s, robots, t0)
    for r in robots:
        r.start()
    try:
        while time.monotonic() < end_at and not stop.is_set():
            if all(r.stats.finished for r in robots):
                break
            bar.tick()
            stop.wait(0.25 if bar.tty else 0.5)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the robots")
    finally:
        stop.set()
        for r in robots:
            r.join(timeout=15)
        wall = time.monotonic() - t0
        bar.tick(final=True)
        if scraper_on:
            scraper.stop()
    errors = [f"robot {r.index}: {type(r.error).__name__}: {r.error}" for r in robots if r.error is not None]
    return summarize(
        config, [r.stats for r in robots], wall, model, source, episodes, scraper if scraper_on else None,
        errors,
    )


def _percentiles(xs: list[float] | np.ndarray) -> dict[str, float | None]:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max()),
            "mean": float(a.mean())}


def summarize(
    config: LoadTestConfig, stats: list[RobotStats], wall_s: float, model: dict[str, Any], source: str,
    episodes: list[ReplayEpisode], scraper: Scraper | None, robot_errors: list[str],
) -> dict[str, Any]:
    samples: list[Sample] = sorted((x for s in stats for x in s.samples), key=lambda x: x[0])
    rtt = [x[2] for x in samples]
    latency = {"client_rtt_ms": _percentiles(rtt)}
    for j, name in enumerate(TIMING_MS_FIELDS):
        latency[f"server_{name}"] = _percentiles([x[3][j] for x in samples])
    errors: Counter = Counter()
    for s in stats:
        errors.update(s.errors)
    chunks = sum(s.chunks for s in stats)
    ramp_end = config.ramp_up_s
    steady = [x for x in samples if x[0] >= ramp_end]
    steady_s = max(1e-9, min(wall_s, config.duration_s) - ramp_end)
    ticks = sum(s.ticks for s in stats)
    report: dict[str, Any] = {
        "format": "chatvla.loadtest", "version": 1,
        "config": {k: v for k, v in asdict(config).items() if k != "token"},
        "server": model,
        "source": {"kind": source, "episodes": len(episodes), "names": [e.name for e in episodes[:50]],
                   "control_rate_hz": sorted({e.rate_hz for e in episodes})},
        "wall_s": wall_s,
        "robots": {"configured": config.robots, "started": sum(s.started for s in stats),
                   "fatal": {str(s.index): s.fatal for s in stats if s.fatal}},
        "totals": {
            "ticks": ticks, "observations_sent": sum(s.observations for s in stats), "chunks": chunks,
            "episodes_played": sum(s.episodes for s in stats),
            "stall_ticks": sum(s.stalls for s in stats), "startup_ticks": sum(s.startup_ticks for s in stats),
            "stall_fraction": (sum(s.stalls for s in stats) / ticks) if ticks else 0.0,
            "generator_late_ticks": sum(s.generator_late_ticks for s in stats),
            "reconnects": max(0, sum(s.connects for s in stats) - sum(s.started for s in stats)),
            "disconnects": sum(s.disconnects for s in stats),
            "samples_kept": len(samples),
        },
        "throughput": {
            "chunks_per_s": chunks / max(wall_s, 1e-9),
            "steady_chunks_per_s": len(steady) / steady_s,
            "observations_per_s": sum(s.observations for s in stats) / max(wall_s, 1e-9),
        },
        "latency_ms": latency,
        "errors_by_kind": dict(sorted(errors.items())),
        "rejections": sum(v for k, v in errors.items() if k in REJECTION_CODES),
        "per_robot": [
            {"robot": s.index, "chunks": s.chunks, "observations": s.observations, "stall_ticks": s.stalls,
             "errors": dict(s.errors), "rtt_p50_ms": _percentiles([x[2] for x in s.samples])["p50"]}
            for s in stats
        ],
        "robot_errors": robot_errors,
        "timeline": _timeline(samples, wall_s),
        "server_metrics": _server_metrics(scraper),
    }
    return report


def _timeline(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """Per-second client RTT p50/p99 and chunk counts, plus up to 4000 raw points for plots."""
    seconds = max(1, int(np.ceil(wall_s)))
    bins: list[list[float]] = [[] for _ in range(seconds)]
    for x in samples:
        b = min(seconds - 1, max(0, int(x[0])))
        bins[b].append(x[2])
    step = max(1, len(samples) // 4000)
    return {
        "t_s": list(range(seconds)),
        "chunks": [len(b) for b in bins],
        "rtt_p50_ms": [float(np.percentile(b, 50)) if b else None for b in bins],
        "rtt_p99_ms": [float(np.percentile(b, 99)) if b else None for b in bins],
        "points": [[round(x[0], 3), round(x[2], 3), round(x[3][-1], 3)] for x in samples[::step]],
    }


def _server_metrics(scraper: Scraper | None) -> dict[str, Any] | None:
    if scraper is None or len(scraper.snapshots) < 2:
        return None if scraper is None else {"url": scraper.url, "snapshots": len(scraper.snapshots)}
    snaps = scraper.snapshots
    out: dict[str, Any] = {"url": scraper.url, "snapshots": len(snaps), "scrape_errors": scraper.errors}
    for stage in BATCH_STAGES:
        series = batch_series(snaps, stage)
        hist = batch_histogram(snaps, stage)
        total = sum(hist.values())
        mean = None
        if total:
            sums = value(snaps[-1].metrics, BATCH_SIZE_SUM, stage=stage) - value(
                snaps[0].metrics, BATCH_SIZE_SUM, stage=stage)
            mean = sums / total
        out[f"batch_{stage}"] = {"mean": mean, "batches": _int(total), "histogram": _ints(hist),
                                 "series": [[round(t, 2), round(m, 3), _int(n)] for t, m, n in series]}
    out["rejected_by_reason"] = _ints(deltas(snaps, REJECTED_TOTAL, "reason"))
    out["requests_by_outcome"] = _ints(deltas(snaps, REQUESTS_TOTAL, "outcome"))
    out["queue_depth_max"] = {
        stage: _int(max(value(s.metrics, QUEUE_DEPTH, stage=stage) for s in snaps))
        for stage in QUEUE_STAGES
    }
    out["active_sessions_max"] = _int(max(value(s.metrics, ACTIVE_SESSIONS) for s in snaps))
    return out


def _int(v: float) -> int:
    """Prometheus samples are floats; counts, depths and batch counts are whole numbers in the report."""
    return round(v)


def _ints(d: dict[str, float]) -> dict[str, int]:
    return {k: _int(v) for k, v in d.items()}


def write_reports(report: dict[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """`report.json` and `report.html` in `directory` (created)."""
    import json

    from chatvla.client.loadtest.report import render_html

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    jp, hp = d / "report.json", d / "report.html"
    jp.write_text(json.dumps(report, indent=1, default=float) + "\n")
    hp.write_text(render_html(report))
    return jp, hp


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short text summary for the terminal."""
    lat, tot, thr = report["latency_ms"], report["totals"], report["throughput"]

    def row(name: str, d: dict[str, float | None]) -> str:
        f = lambda v: "-" if v is None else f"{v:8.2f}"  # noqa: E731
        return f"  {name:24s} {f(d['p50'])} {f(d['p90'])} {f(d['p99'])} {f(d['max'])}"

    lines = [
        f"server {report['server'].get('model_id')} ({report['server'].get('engine')}, "
        f"{report['server'].get('profile')}); {report['robots']['started']} robots, {report['wall_s']:.1f} s, "
        f"source {report['source']['kind']} ({report['source']['episodes']} episodes)",
        f"  {'latency (ms)':24s} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}",
        row("client round trip", lat["client_rtt_ms"]),
    ]
    lines += [row(f"server {k[7:-3]}", v) for k, v in lat.items() if k.startswith("server_")]
    lines.append(
        f"chunks {tot['chunks']} ({thr['chunks_per_s']:.1f}/s, steady {thr['steady_chunks_per_s']:.1f}/s), "
        f"observations {tot['observations_sent']}, stall ticks {tot['stall_ticks']}/{tot['ticks']} "
        f"({100 * tot['stall_fraction']:.1f}%), generator late ticks {tot['generator_late_ticks']}"
    )
    lines.append(f"rejections {report['rejections']}, errors by kind {report['errors_by_kind'] or '{}'}")
    sm = report.get("server_metrics")
    if sm and sm.get("batch_reasoning"):
        br, be = sm["batch_reasoning"]["mean"], sm["batch_expert"]["mean"]
        lines.append(
            "server batches: reasoning mean " + ("-" if br is None else f"{br:.2f}")
            + ", expert mean " + ("-" if be is None else f"{be:.2f}")
            + f", rejected {sm.get('rejected_by_reason') or '{}'}"
        )
    elif sm is None:
        lines.append("server metrics: not scraped (pass --metrics-url http://HOST:PORT/metrics)")
    return lines


__all__ = [
    "LoadTestConfig", "LoadTestError", "run_loadtest", "summarize", "summary_lines", "write_reports",
]
