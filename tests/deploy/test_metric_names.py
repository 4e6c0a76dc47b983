"""Every metric, label and label value that the alerts, the dashboard, the adapter rules and the HPA use
is one the server defines (src/chatvla/server/metrics.py and the code that sets the labels).

A renamed metric or label otherwise fails silently: an alert that never fires, an empty panel, an HPA
stuck at `<unknown>`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from deploykit import (
    DEPLOY,
    K8S,
    TARGET_LABELS,
    load_yaml,
    promql_matchers,
    promql_names,
    server_label_values,
    server_metrics,
)

DASHBOARD = DEPLOY / "grafana/dashboards/chatvla-serve.json"
ADAPTER = K8S / "monitoring/prometheus-adapter-values.yaml"


def rule_exprs(path: Path) -> dict[str, str]:
    doc = load_yaml(path)
    groups = doc["spec"]["groups"] if "spec" in doc else doc["groups"]
    return {f"{r.get('alert') or r.get('record')}": r["expr"] for g in groups for r in g["rules"]}


def dashboard_exprs() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out[f"panel {p['id']} {p['title']!r} {t['refId']}"] = t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out[f"variable {v['name']}"] = q
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
