"""Prometheus metrics of one server process, on a registry of its own.

A dedicated `CollectorRegistry` (not the global default) keeps two servers in one process — tests,
benchmarks — from double-registering, and keeps library metrics out of our exposition. It does carry
the process metrics (`process_resident_memory_bytes`, `process_cpu_seconds_total`, open files: an
operator's first questions) and `chatvla_build_info` (version, model, engine, profile). Counters and
histograms expose no `*_created` series: they double the series count and no dashboard reads them. The names
are part of the operations contract (dashboards, alerts, the load test): they and the stage labels are
defined in chatvla.wire.vocabulary; change them only together with the docs.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from chatvla.wire.vocabulary import (
    METRIC_ACTIVE_SESSIONS,
    METRIC_BATCH_SIZE,
    METRIC_BUILD,
    METRIC_QUEUE_DEPTH,
    METRIC_REASONING_REFRESH,
    METRIC_REASONING_TOKENS,
    METRIC_REJECTED,
    METRIC_REQUESTS,
    METRIC_STAGE_LATENCY,
    QUEUE_STAGES,
)

# Stage latencies span sub-millisecond queueing to multi-second reasoning on a CPU.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


disable_created_metrics()  # process-wide: this module is the only one that defines metrics


class Metrics:
    """The `chatvla_*` metric family. Labels are fixed small sets, never robot ids (cardinality)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            METRIC_REQUESTS, "Observations answered, by transport and outcome.",
            ["transport", "outcome"], registry=r,
        )
        self.stage_latency = Histogram(
            METRIC_STAGE_LATENCY,
            "Time per observation in each stage (queue = waiting, total = receipt to chunk ready).",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            METRIC_BATCH_SIZE, "Observations per batch run by a stage.", ["stage"],
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            METRIC_QUEUE_DEPTH, "Observations waiting for a stage.", ["stage"], registry=r,
        )
        self.active_sessions = Gauge(METRIC_ACTIVE_SESSIONS, "Open Stream sessions.", registry=r)
        self.reasoning_tokens = Counter(
            METRIC_REASONING_TOKENS, "Reasoning tokens decoded (pre-filled cached text is not counted).",
            registry=r,
        )
        self.rejected = Counter(
            METRIC_REJECTED, "Observations or calls refused before completion, by reason.", ["reason"],
            registry=r,
        )
        self.reasoning_refresh = Counter(
            METRIC_REASONING_REFRESH,
            "New reasoning written for a session observation, by the policy condition that fired.",
            ["reason"], registry=r,
        )
        self.build = Info(METRIC_BUILD, "The serving process: package version, model, engine, robot profile.",
                          registry=r)
        ProcessCollector(registry=r)
        for stage in QUEUE_STAGES:
            self.queue_depth.labels(stage=stage).set(0)

    def set_build(self, model_id: str, engine: str, profile: str) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("chatvla-serve")
        except PackageNotFoundError:
            v = "unknown"
        self.build.info({"version": v, "model": model_id, "engine": engine, "profile": profile})

    def exposition(self) -> bytes:
        """The text format served at /metrics."""
        return generate_latest(self.registry)
