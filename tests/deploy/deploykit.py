"""Helpers for the deployment tests: repo paths, the validator tools, the server's metric and setting
names, PromQL name/label extraction, kustomize rendering.

The validators (hadolint, docker compose, kubectl kustomize, kubernetes-validate, promtool) are looked
up in `.venv-tools/bin` (where scripts/validate_deploy.sh installs them) and then on PATH; a test that
needs a missing one skips and says how to get it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
TOOLS_BIN = Path(os.environ.get("CHATVLA_TOOLS_VENV", REPO / ".venv-tools")) / "bin"
INSTALL_HINT = "run `bash scripts/validate_deploy.sh` once to install the validators into .venv-tools"

OVERLAYS = ("gpu", "cpu-demo")


def tool(name: str) -> str | None:
    """Path of a validator: .venv-tools/bin first, then PATH."""
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} not installed: {INSTALL_HINT}")
    return path


def run(cmd: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------------------
# The server's metrics, read from chatvla.server.metrics (the operations contract).


@dataclass(frozen=True)
class MetricDef:
    name: str  # family name as exposed (counters without _total)
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]

    @property
    def samples(self) -> tuple[str, ...]:
        if self.type == "counter":
            return (self.name + "_total",)
        if self.type == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_count", "_sum"))
        if self.type == "info":
            return (self.name + "_info",)
        return (self.name,)


# The contract as written in issue 3, for a checkout whose server module cannot be imported.
DOCUMENTED_METRICS = (
    MetricDef("chatvla_requests", "counter", ("transport", "outcome")),
    MetricDef("chatvla_stage_latency_seconds", "histogram", ("stage",)),
    MetricDef("chatvla_batch_size", "histogram", ("stage",)),
    MetricDef("chatvla_queue_depth", "gauge", ("stage",)),
    MetricDef("chatvla_active_sessions", "gauge", ()),
    MetricDef("chatvla_reasoning_tokens", "counter", ()),
    MetricDef("chatvla_rejected", "counter", ("reason",)),
    MetricDef("chatvla_reasoning_refresh", "counter", ("reason",)),
    MetricDef("chatvla_build", "info", ("version", "model", "engine", "profile")),
)


def server_metrics() -> dict[str, MetricDef]:
    """Every `chatvla_*` metric the server defines, by exposed sample name."""
    try:
        from prometheus_client.metrics import MetricWrapperBase

        from chatvla.server.metrics import Metrics
    except ImportError:
        return {s: d for d in DOCUMENTED_METRICS for s in d.samples}
    m = Metrics()
    defs: list[MetricDef] = []
    for value in vars(m).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            defs.append(MetricDef(family.name, family.type, tuple(value._labelnames)))
    return {s: d for d in defs for s in d.samples}


# Labels Prometheus adds at scrape time (compose static targets, ServiceMonitor targets) and `le`.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "endpoint", "container", "le"})

_NAME = re.compile(r"\bchatvla_[a-z0-9_]+\b")
_SELECTOR = re.compile(r"\b(chatvla_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def promql_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def promql_matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every matcher inside a `chatvla_*{...}` selector."""
    out = []
    for metric, body in _SELECTOR.findall(expr):
        for label, op, value in _MATCHER.findall(body):
            out.append((metric, label, op, value))
    return out


def server_label_values() -> dict[str, set[str]]:
    """Label values the server code emits, for the labels alerts and dashboards filter on."""
    from chatvla.server.errors import Code
    from chatvla.server.scheduler import SESSIONS_LIMIT
    from chatvla.wire.vocabulary import STAGE_LABELS, TRANSPORTS

    src = "\n".join(p.read_text() for p in (REPO / "src/chatvla/server").rglob("*.py"))
    codes = {c.value for c in Code}
    return {
        "stage": set(STAGE_LABELS) | set(re.findall(r'stage="(\w+)"', src)),
        "reason": codes | set(re.findall(r'reason="(\w+)"', src)) | {"stateless", SESSIONS_LIMIT},
        "outcome": codes | {"ok"},
        "transport": set(TRANSPORTS),
    }


# --------------------------------------------------------------------------------------------------
# Server settings: the env var and YAML key names `chatvla serve` accepts.


def settings_names() -> tuple[set[str], set[str]]:
    """(YAML keys, env var names) of `chatvla serve`."""
    from chatvla.server.settings import CONFIG_ENV, ServerSettings, env_name

    keys = set(ServerSettings.model_fields)
    return keys, {env_name(k) for k in keys} | {CONFIG_ENV}


def allocator_env() -> dict[str, str]:
    """The glibc allocator env every server launcher sets: the values `chatvla serve` pins itself."""
    from chatvla.cli.serve import MALLOC_THRESHOLDS

    return {name: str(value) for name, (_, value) in MALLOC_THRESHOLDS.items()}


# --------------------------------------------------------------------------------------------------
# kustomize


def kustomize_cmd() -> list[str]:
    if k := tool("kustomize"):
        return [k, "build"]
    if k := tool("kubectl"):
        return [k, "kustomize"]
    pytest.skip(f"neither kustomize nor kubectl (for `kubectl kustomize`) is installed: {INSTALL_HINT}")


def render(path: Path) -> list[dict]:
    proc = run([*kustomize_cmd(), str(path)])
    assert proc.returncode == 0, f"kustomize {path}: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
