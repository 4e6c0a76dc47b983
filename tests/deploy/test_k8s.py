"""deploy/k8s: the settings files load as `chatvla serve` settings (always); the overlays render with
kustomize and hang together (probes on the configured ports, drain timing, Services, HPA, PDB, Secrets
only referenced) when kubectl or kustomize is installed; kubernetes-validate on the rendered manifests
when it is installed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml
from deploykit import (
    K8S,
    OVERLAYS,
    allocator_env,
    by_kind,
    load_yaml,
    one,
    render,
    require_tool,
    run,
    settings_names,
)

CONFIGS = {"base": K8S / "base/config.yaml", **{o: K8S / f"overlays/{o}/config.yaml" for o in OVERLAYS}}
POLICY_SERVICE = "chatvla.v1.Policy"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_files_are_valid_settings(name):
    from chatvla.server.settings import load_settings

    keys, _ = settings_names()
    data = load_yaml(CONFIGS[name])
    assert set(data) <= keys, f"unknown settings: {sorted(set(data) - keys)}"
    s = load_settings(env={}, config_file=CONFIGS[name])
    assert s.host == "0.0.0.0" and s.http_host == "0.0.0.0", "pods must listen on all interfaces"
    assert s.tokens_file is not None, "the fleet always requires tokens"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def rendered_settings(docs: list[dict]):
    from chatvla.server.settings import load_settings

    cm = one(docs, "ConfigMap")
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    _, env_names = settings_names()
    chatvla_env = {k for k in env if k.startswith("CHATVLA_")}
    assert chatvla_env <= env_names, f"not `chatvla serve` settings: {sorted(chatvla_env - env_names)}"
    path = Path(env.pop("CHATVLA_CONFIG"))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(path.parent) == mounts["config"] and path.name in cm["data"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(cm["data"][path.name])
    try:
        return load_settings(env=env, config_file=f.name), container, env
    finally:
        os.unlink(f.name)


def test_probes_and_ports_match_the_settings(overlay):
    _, docs = overlay
    s, container, env = rendered_settings(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": s.grpc_port, "http": s.http_port}
    ready, live = container["readinessProbe"], container["livenessProbe"]
    if s.tls:
        # the kubelet's gRPC probe cannot do TLS: /readyz over HTTPS carries the same readiness flag
        assert ready["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTPS"}
        assert live["httpGet"]["scheme"] == "HTTPS"
        assert {"tls.crt", "tls.key"} == {Path(env["CHATVLA_TLS_CERT"]).name, Path(env["CHATVLA_TLS_KEY"]).name}
    else:
        assert ready["grpc"] == {"port": s.grpc_port, "service": POLICY_SERVICE}
    assert live["httpGet"]["path"] == "/healthz", "liveness must hold while loading and draining"


def test_server_pins_the_allocator(overlay):
    """The same glibc thresholds as the image, also for a pod running an image built elsewhere."""
    _, docs = overlay
    _, _, env = rendered_settings(docs)
    assert {k: env.get(k) for k in allocator_env()} == allocator_env()


def test_termination_grace_covers_prestop_and_drain(overlay):
    _, docs = overlay
    s, container, _ = rendered_settings(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + 2 * s.drain_timeout_s + 10
    assert pod["terminationGracePeriodSeconds"] >= needed, f"grace < preStop + 2 x drain + 10 = {needed}"


def test_services(overlay):
    _, docs = overlay
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {svc["metadata"]["name"]: svc for svc in by_kind(docs, "Service")}
    assert set(services) == {"chatvla", "chatvla-headless"}
    headless = services["chatvla-headless"]["spec"]
    assert headless["clusterIP"] == "None", "client-side balancing needs one DNS record per replica"
    assert headless.get("publishNotReadyAddresses", False) is False, "loading/draining replicas must not resolve"
    assert [p["targetPort"] for p in headless["ports"]] == ["grpc"]
    assert {p["name"] for p in services["chatvla"]["spec"]["ports"]} == {"grpc", "http"}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_pdb_and_hpa_target_the_deployment(overlay):
    _, docs = overlay
    s, _, _ = rendered_settings(docs)
    deployment = one(docs, "Deployment")
    pdb, hpa = one(docs, "PodDisruptionBudget"), one(docs, "HorizontalPodAutoscaler")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chatvla-serve"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]}
    assert targets["chatvla_active_sessions"] < s.max_sessions, "HPA target beyond what a replica admits"
    assert targets["chatvla_queue_depth"] < s.max_queue


def test_secrets_are_referenced_never_shipped(overlay):
    name, docs = overlay
    assert not by_kind(docs, "Secret"), "no Secret objects in git: document how to create them"
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tokens"]["secret"]["secretName"] == "chatvla-tokens"
    assert not volumes["tokens"]["secret"].get("optional"), "a missing token Secret must keep the pod from starting"
    if name == "gpu":
        assert volumes["tls"]["secret"]["secretName"] == "chatvla-tls"


def test_security_context(overlay):
    _, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False


def test_resources(overlay):
    name, docs = overlay
    c = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits)
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == "1"
        volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    else:
        assert "nvidia.com/gpu" not in limits


def test_prometheus_operator_component_renders_with_tls(tmp_path):
    """components/prometheus-operator + components/tls: the ServiceMonitor scrapes over HTTPS with a token."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: chatvla\n"
        f"resources: [{rel}/base]\n"
        f"components: [{rel}/components/prometheus-operator, {rel}/components/tls]\n"
    )
    docs = render(tmp_path)
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"]["name"] == "chatvla-metrics-token"
    assert one(docs, "PrometheusRule")["spec"]["groups"]


def test_kubernetes_validate(tmp_path):
    validator = require_tool("kubernetes-validate")
    files = []
    for name in OVERLAYS:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(render(K8S / "overlays" / name)))
        files.append(str(path))
    proc = run([validator, "--strict", "--quiet", *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
