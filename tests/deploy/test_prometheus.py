"""Prometheus configs and alert rules: promtool (config syntax, rule syntax, alert unit tests) when it is
installed, and the Kubernetes PrometheusRule kept identical to deploy/prometheus/alerts.yml."""

from __future__ import annotations

import shutil

import yaml
from deploykit import DEPLOY, K8S, load_yaml, require_tool, run

PROM = DEPLOY / "prometheus"
RULE = K8S / "components/prometheus-operator/prometheusrule.yaml"


def test_prometheusrule_carries_alerts_yml_verbatim():
    alerts = load_yaml(PROM / "alerts.yml")["groups"]
    rule = load_yaml(RULE)
    assert rule["kind"] == "PrometheusRule"
    groups = {g["name"]: g for g in rule["spec"]["groups"]}
    for g in alerts:
        assert groups.get(g["name"]) == g, f"group {g['name']} differs between alerts.yml and {RULE.name}"


def test_every_alert_has_severity_summary_and_for():
    for path in (PROM / "alerts.yml", RULE):
        doc = load_yaml(path)
        for g in doc["spec"]["groups"] if "spec" in doc else doc["groups"]:
            for r in g["rules"]:
                assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
                assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]
                assert "for" in r, f"{r['alert']}: alerts without `for` page on a single bad scrape"


def test_scrape_configs_use_relative_paths():
    """Paths resolve next to the config file, so the same file works in compose and in promtool."""
    for name in ("prometheus.yml", "prometheus-auth.yml"):
        cfg = load_yaml(PROM / name)
        assert cfg["rule_files"] == ["alerts.yml"]
        for job in cfg["scrape_configs"]:
            auth = job.get("authorization", {})
            for f in (auth.get("credentials_file"), job.get("tls_config", {}).get("ca_file")):
                assert f is None or not f.startswith("/"), f"{name}: {f} should be relative"


def test_promtool_check_config(tmp_path):
    promtool = require_tool("promtool")
    for name in ("prometheus.yml", "prometheus-auth.yml"):
        work = tmp_path / name.removesuffix(".yml")
        work.mkdir()
        shutil.copy(PROM / name, work / name)
        shutil.copy(PROM / "alerts.yml", work / "alerts.yml")
        (work / "secrets").mkdir()  # placeholders for the files deploy/compose/auth.yml mounts
        (work / "secrets/metrics_token").write_text("placeholder\n")
        (work / "secrets/ca.crt").write_text("placeholder\n")
        proc = run([promtool, "check", "config", str(work / name)])
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules(tmp_path):
    promtool = require_tool("promtool")
    groups = load_yaml(RULE)["spec"]["groups"]
    (tmp_path / "k8s-rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    proc = run([promtool, "check", "rules", str(PROM / "alerts.yml"), str(tmp_path / "k8s-rules.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_alert_unit_tests():
    promtool = require_tool("promtool")
    proc = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
