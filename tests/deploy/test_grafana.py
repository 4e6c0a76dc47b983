"""The provisioned Grafana dashboard: JSON schema (deploy/grafana/dashboard.schema.json), layout and
references, and provisioning that points where docker-compose.yml mounts things."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from deploykit import DEPLOY, REPO, TOOLS_BIN, load_yaml, run

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards/chatvla-serve.json"
SCHEMA = GRAFANA / "dashboard.schema.json"


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_matches_schema():
    try:
        import jsonschema  # not a project dependency; the tool venv has it
    except ImportError:
        python = TOOLS_BIN / "python"
        if not python.exists():
            pytest.skip("jsonschema is not installed here or in .venv-tools: run scripts/validate_deploy.sh")
        code = (
            "import json, sys, jsonschema; s = json.load(open(sys.argv[1])); "
            "jsonschema.Draft202012Validator.check_schema(s); v = jsonschema.Draft202012Validator(s); "
            "errs = [f'{list(e.path)}: {e.message}' for e in v.iter_errors(json.load(open(sys.argv[2])))]; "
            "print('\\n'.join(errs)); sys.exit(1 if errs else 0)"
        )
        proc = run([str(python), "-c", code, str(SCHEMA), str(DASHBOARD)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(
        json.loads(DASHBOARD.read_text()))]
    assert not errors, "\n".join(errors)


def test_panel_ids_unique_and_layout_fits_without_overlap(dash):
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} runs past the 24-column grid"
        cells[p["id"]] = {(x, y) for x, y in itertools.product(range(g["x"], g["x"] + g["w"]),
                                                              range(g["y"], g["y"] + g["h"]))}
    for a, b in itertools.combinations(cells, 2):
        assert not cells[a] & cells[b], f"panels {a} and {b} overlap"


def test_targets_use_the_datasource_variable_and_unique_refids(dash):
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for p in dash["panels"]:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"panel {p['title']!r}: duplicate refIds"
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r} pins a datasource"
            for used in re.findall(r"\$(\w+)", t["expr"]):
                assert used in variables or used.startswith("__"), f"panel {p['title']!r}: unknown ${used}"


def test_provisioning_matches_compose_mounts():
    compose = load_yaml(REPO / "docker-compose.yml")
    mounts = dict(m.rsplit(":", 2)[:2] for m in compose["services"]["grafana"]["volumes"] if m.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    provider = load_yaml(GRAFANA / "provisioning/dashboards/chatvla.yml")["providers"][0]
    assert provider["options"]["path"] == dashboards_dir
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    (ds,) = load_yaml(GRAFANA / "provisioning/datasources/prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
