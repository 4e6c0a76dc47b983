"""Scrape the server's Prometheus `/metrics` during a load test: batch sizes, queue depths, rejections.

Only the standard library: the load generator runs on robot-side installs, which do not have the server
extra (prometheus_client). The text format is simple enough to read for the few `chatvla_*` families
needed; anything unexpected is skipped, never trusted.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from chatvla.wire.vocabulary import (
    AUTHORIZATION_KEY,
    METRIC_ACTIVE_SESSIONS,
    METRIC_BATCH_SIZE,
    METRIC_QUEUE_DEPTH,
    METRIC_REJECTED,
    METRIC_REQUESTS,
    METRIC_STAGE_LATENCY,
    bearer_header,
    counter_total,
    histogram_sample,
)

log = logging.getLogger(__name__)

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# The exposed sample names the load test reads (tests/deploy/test_metric_names.py checks them).
BATCH_SIZE_BUCKET = histogram_sample(METRIC_BATCH_SIZE, "bucket")
BATCH_SIZE_COUNT = histogram_sample(METRIC_BATCH_SIZE, "count")
BATCH_SIZE_SUM = histogram_sample(METRIC_BATCH_SIZE, "sum")
REJECTED_TOTAL = counter_total(METRIC_REJECTED)
REQUESTS_TOTAL = counter_total(METRIC_REQUESTS)
QUEUE_DEPTH = METRIC_QUEUE_DEPTH
ACTIVE_SESSIONS = METRIC_ACTIVE_SESSIONS
# Prefixes of the sample lines kept from a scrape.
FAMILIES = (METRIC_BATCH_SIZE, METRIC_QUEUE_DEPTH, REJECTED_TOTAL, METRIC_ACTIVE_SESSIONS, REQUESTS_TOTAL,
            METRIC_STAGE_LATENCY)
MAX_BODY = 4 << 20

Labels = tuple[tuple[str, str], ...]


def parse_metrics(text: str) -> dict[str, dict[Labels, float]]:
    """{sample name: {sorted labels: value}} for the `chatvla_*` families we use."""
    out: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        if not line.startswith(FAMILIES):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        out.setdefault(m.group(1), {})[labels] = value
    return out


def value(snapshot: Mapping[str, Mapping[Labels, float]], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in snapshot.get(name, {}).items() if want <= set(k))


@dataclass
class Snapshot:
    t: float  # seconds since the run started
    metrics: dict[str, dict[Labels, float]]


@dataclass
class Scraper:
    """Polls `url` every `interval_s` on a thread until `stop()`; keeps at most `max_snapshots`."""

    url: str
    token: str | None = None
    interval_s: float = 1.0
    t0: float = field(default_factory=time.monotonic)
    max_snapshots: int = 20_000
    snapshots: list[Snapshot] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadtest-scraper", daemon=True)

    def scrape_once(self) -> Snapshot | None:
        req = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
        if self.token:
            req.add_header(AUTHORIZATION_KEY, bearer_header(self.token))
        try:
            with urllib.request.urlopen(req, timeout=max(1.0, self.interval_s)) as resp:
                body = resp.read(MAX_BODY + 1)
        except (OSError, ValueError) as e:
            self.errors += 1
            self.last_error = str(e)
            return None
        if len(body) > MAX_BODY:
            self.errors += 1
            self.last_error = "metrics page too large"
            return None
        snap = Snapshot(time.monotonic() - self.t0, parse_metrics(body.decode("utf-8", "replace")))
        if len(self.snapshots) < self.max_snapshots:
            self.snapshots.append(snap)
        return snap

    def start(self) -> None:
        self.scrape_once()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.scrape_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.scrape_once()


def batch_series(snaps: list[Snapshot], stage: str) -> list[tuple[float, float, float]]:
    """(t, mean batch size, batches) per scrape interval for `stage`, from histogram sum/count deltas."""
    out = []
    for a, b in itertools.pairwise(snaps):
        dc = value(b.metrics, BATCH_SIZE_COUNT, stage=stage) - value(a.metrics, BATCH_SIZE_COUNT, stage=stage)
        ds = value(b.metrics, BATCH_SIZE_SUM, stage=stage) - value(a.metrics, BATCH_SIZE_SUM, stage=stage)
        if dc > 0:
            out.append((b.t, ds / dc, dc))
    return out


def batch_histogram(snaps: list[Snapshot], stage: str) -> dict[str, float]:
    """Batches per size bucket (`le` upper bound, non-cumulative) over the whole run."""
    if len(snaps) < 2:
        return {}
    first, last = snaps[0].metrics, snaps[-1].metrics

    def buckets(m: Mapping[str, Mapping[Labels, float]]) -> dict[str, float]:
        return {dict(k)["le"]: v for k, v in m.get(BATCH_SIZE_BUCKET, {}).items()
                if dict(k).get("stage") == stage and "le" in dict(k)}

    b0, b1 = buckets(first), buckets(last)
    order = sorted(b1, key=lambda le: float("inf") if le == "+Inf" else float(le))
    out, prev = {}, 0.0
    for le in order:
        cum = b1[le] - b0.get(le, 0.0)
        out[le] = max(0.0, cum - prev)
        prev = cum
    return out


def deltas(snaps: list[Snapshot], name: str, label: str) -> dict[str, float]:
    """Counter increase over the run per value of `label` (e.g. rejected reasons)."""
    if len(snaps) < 2:
        return {}
    a, b = snaps[0].metrics.get(name, {}), snaps[-1].metrics.get(name, {})
    out: dict[str, float] = {}
    for k, v in b.items():
        key = dict(k).get(label, "")
        d = v - a.get(k, 0.0)
        if d:
            out[key] = out.get(key, 0.0) + d
    return out
