"""Every metric, label and label value that the alerts, the dashboard, the adapter rules and the HPA use
is one the server defines (src/chatvla/server/metrics.py and the code that sets the labels).

A renamed metric or label otherwise fails silently: an alert that never fires, an empty panel, an HPA
stuck at `<unknown>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from deploykit import (
    DEPLOY,
    K8S,
    REPO,
    TARGET_LABELS,
    load_yaml,
    promql_matchers,
    promql_names,
    server_label_values,
    server_metrics,
)

from chatvla.wire.vocabulary import BATCH_STAGES, METRICS, QUEUE_STAGES

DASHBOARDS = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))
ADAPTER = K8S / "monitoring/prometheus-adapter-values.yaml"


def rule_exprs(path: Path) -> dict[str, str]:
    doc = load_yaml(path)
    groups = doc["spec"]["groups"] if "spec" in doc else doc["groups"]
    return {f"{r.get('alert') or r.get('record')}": r["expr"] for g in groups for r in g["rules"]}


def dashboard_exprs() -> dict[str, str]:
    out = {}
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for p in dash["panels"]:
            for t in p.get("targets", []):
                out[f"{path.name} panel {p['id']} {p['title']!r} {t['refId']}"] = t["expr"]
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                out[f"{path.name} variable {v['name']}"] = q
    return out


def adapter_exprs() -> dict[str, str]:
    out = {}
    for i, rule in enumerate(load_yaml(ADAPTER)["rules"]["custom"]):
        series = re.match(r"\s*(\w+)", rule["seriesQuery"]).group(1)
        out[f"rule {i} seriesQuery"] = rule["seriesQuery"]
        query = rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'pod="x"')
        out[f"rule {i} metricsQuery"] = query.replace("<<.GroupBy>>", "pod")
    return out


SOURCES = {
    "alerts.yml": lambda: rule_exprs(DEPLOY / "prometheus/alerts.yml"),
    "prometheusrule.yaml": lambda: rule_exprs(K8S / "components/prometheus-operator/prometheusrule.yaml"),
    "grafana dashboard": dashboard_exprs,
    "prometheus-adapter rules": adapter_exprs,
}


def test_the_server_defines_the_documented_metrics():
    names = {d.name for d in server_metrics().values()}
    assert {
        "chatvla_requests", "chatvla_stage_latency_seconds", "chatvla_batch_size", "chatvla_queue_depth",
        "chatvla_active_sessions", "chatvla_reasoning_tokens", "chatvla_rejected", "chatvla_reasoning_refresh",
    } <= names


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_metric_names_labels_and_values_exist(source):
    defined = server_metrics()
    values = server_label_values()
    exprs = SOURCES[source]()
    assert exprs, f"{source}: no expressions found"
    errors = []
    for where, expr in exprs.items():
        for name in sorted(promql_names(expr) - set(defined)):
            errors.append(f"{where}: metric {name} is not defined by the server")
        for metric, label, op, value in promql_matchers(expr):
            if metric not in defined:
                continue
            if label not in set(defined[metric].labels) | TARGET_LABELS:
                errors.append(f"{where}: {metric} has no label {label!r} (it has {defined[metric].labels})")
            elif label in values and "$" not in value and op in ("=", "=~"):
                errors += [
                    f"{where}: the server never sets {label}={v!r} (it sets {sorted(values[label])})"
                    for v in value.split("|") if v not in values[label]
                ]
    assert not errors, "\n".join(errors)


def test_the_dashboard_covers_what_operators_need():
    exprs = "\n".join(dashboard_exprs().values())
    for needed in (
        "chatvla_stage_latency_seconds_bucket",  # latency by stage
        "chatvla_batch_size",
        "chatvla_queue_depth",
        "chatvla_active_sessions",
        "chatvla_rejected_total",
    ):
        assert needed in exprs, f"no dashboard panel uses {needed}"
    assert re.search(r"by \((le, )?stage\)", exprs), "no panel breaks latency/batches down by stage"


def test_hpa_metrics_are_served_by_the_adapter():
    served = {r["name"]["as"] for r in load_yaml(ADAPTER)["rules"]["custom"]}
    hpa = load_yaml(K8S / "base/hpa.yaml")
    used = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert used, "the HPA scales on no serving metric"
    assert used <= served, f"HPA metrics {sorted(used - served)} have no prometheus-adapter rule"
    for rule in load_yaml(ADAPTER)["rules"]["custom"]:
        assert re.fullmatch(rule["name"]["matches"], re.match(r"\s*(\w+)", rule["seriesQuery"]).group(1))
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"]), "per-pod metrics need pod/namespace"


# --- the vocabulary (chatvla.wire.vocabulary) and its consumers -------------------------------------------------
_SAMPLE_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_info")


def _family(sample: str) -> str:
    for suffix in _SAMPLE_SUFFIXES:
        if sample.endswith(suffix) and sample.removesuffix(suffix) in METRICS:
            return sample.removesuffix(suffix)
    return sample


def test_the_vocabulary_names_every_server_metric():
    assert DASHBOARDS, "no Grafana dashboard found"
    assert {d.name for d in server_metrics().values()} == set(METRICS)


def test_the_dashboards_use_only_vocabulary_metrics():
    errors = [
        f"{where}: {name} is not a metric of chatvla.wire.vocabulary"
        for where, expr in dashboard_exprs().items()
        for name in sorted(promql_names(expr))
        if _family(name) not in METRICS
    ]
    assert not errors, "\n".join(errors)


def test_the_load_test_reads_names_the_server_exposes():
    from chatvla.client.loadtest import scrape

    samples = set(server_metrics())
    families = {d.name for d in server_metrics().values()}
    read = {
        "BATCH_SIZE_BUCKET": scrape.BATCH_SIZE_BUCKET, "BATCH_SIZE_COUNT": scrape.BATCH_SIZE_COUNT,
        "BATCH_SIZE_SUM": scrape.BATCH_SIZE_SUM, "REJECTED_TOTAL": scrape.REJECTED_TOTAL,
        "REQUESTS_TOTAL": scrape.REQUESTS_TOTAL, "QUEUE_DEPTH": scrape.QUEUE_DEPTH,
        "ACTIVE_SESSIONS": scrape.ACTIVE_SESSIONS,
    }
    errors = [f"scrape.{k} = {v!r} is not a sample the server exposes" for k, v in read.items() if v not in samples]
    errors += [
        f"scrape.FAMILIES has {f!r}, not a server metric" for f in scrape.FAMILIES if f not in samples | families
    ]
    # No metric name written by hand anywhere in the load test: every one comes from the vocabulary.
    for path in sorted((REPO / "src/chatvla/client/loadtest").glob("*.py")):
        for name in sorted(re.findall(r'["\'](chatvla_[a-z0-9_]+)["\']', path.read_text())):
            errors.append(f"{path.name}: metric name {name!r} written by hand; import it from the vocabulary")
    stages = server_label_values()["stage"]
    errors += [f"the load test reads stage={s!r}, which the server never sets"
               for s in (*BATCH_STAGES, *QUEUE_STAGES) if s not in stages]
    assert not errors, "\n".join(errors)


def test_the_load_test_parses_the_servers_exposition():
    pytest.importorskip("prometheus_client")
    from chatvla.client.loadtest import scrape
    from chatvla.server.metrics import Metrics

    m = Metrics()
    for stage in BATCH_STAGES:
        m.batch_size.labels(stage=stage).observe(2)
    m.requests.labels(transport="grpc", outcome="ok").inc()
    m.rejected.labels(reason="overloaded").inc()
    m.active_sessions.set(1)
    parsed = scrape.parse_metrics(m.exposition().decode())
    for name in (scrape.BATCH_SIZE_BUCKET, scrape.BATCH_SIZE_COUNT, scrape.BATCH_SIZE_SUM, scrape.REJECTED_TOTAL,
                 scrape.REQUESTS_TOTAL, scrape.QUEUE_DEPTH, scrape.ACTIVE_SESSIONS):
        assert name in parsed, f"{name} not in the server's /metrics"
    for stage in BATCH_STAGES:
        assert scrape.value(parsed, scrape.BATCH_SIZE_COUNT, stage=stage) == 1
        assert scrape.batch_series([scrape.Snapshot(0, {}), scrape.Snapshot(1, parsed)], stage) == [(1, 2.0, 1.0)]
    assert {dict(k)["stage"] for k in parsed[scrape.QUEUE_DEPTH]} == set(QUEUE_STAGES)
    assert scrape.value(parsed, scrape.REQUESTS_TOTAL, outcome="ok") == 1
    assert scrape.value(parsed, scrape.ACTIVE_SESSIONS) == 1
