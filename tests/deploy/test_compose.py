"""docker-compose.yml (+ deploy/compose/auth.yml): parses, points only at files that exist, configures the
server with settings it accepts, and passes `docker compose config` when a compose CLI is installed."""

from __future__ import annotations

import re

import pytest
from deploykit import DEPLOY, REPO, allocator_env, load_yaml, run, settings_names, tool

COMPOSE = REPO / "docker-compose.yml"
AUTH = DEPLOY / "compose/auth.yml"
SERVERS = {"server": "server-gpu", "server-cpu": "server-cpu"}  # service -> Dockerfile target
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def defaults(value: object) -> str:
    """A compose value with every ${VAR:-default} replaced by its default (as with nothing exported)."""
    return _VAR.sub(lambda m: m.group(2) or "", str(value))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def test_profiles(compose):
    services = compose["services"]
    assert services["server"]["profiles"] == ["gpu"]
    assert services["server-cpu"]["profiles"] == ["cpu"]
    assert services["robot-sim"]["profiles"] == ["sim"]
    for always in ("prometheus", "grafana"):
        assert "profiles" not in services[always]


def test_gpu_reservation(compose):
    (device,) = compose["services"]["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_referenced_files_exist(compose):
    """Every literal bind-mount source and build context; ${VAR}-chosen paths (models, secrets) are the
    user's to provide."""
    for doc in (compose, load_yaml(AUTH)):
        for name, svc in doc["services"].items():
            for v in svc.get("volumes", []):
                source = v["source"] if isinstance(v, dict) else v.split(":", 1)[0]
                if source.startswith((".", "/")) and "${" not in source:
                    assert (REPO / source).exists(), f"{name}: {source} does not exist"
            if "build" in svc:
                assert (REPO / svc["build"]["context"] / "Dockerfile").exists()
    for secret in load_yaml(AUTH)["secrets"].values():
        assert secret["file"].startswith("${CHATVLA_SECRETS_DIR"), "secret files must come from the user's directory"


def test_build_targets_exist(compose):
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M | re.I))
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert svc["build"]["target"] in targets, f"{name}: no Dockerfile target {svc['build']['target']}"


@pytest.mark.parametrize("service", sorted(SERVERS))
def test_server_settings_are_accepted(compose, service):
    """The image's settings file + the compose environment (+ auth.yml's) load as `chatvla serve` settings."""
    from chatvla.server.settings import load_settings

    _, env_names = settings_names()
    env = {k: defaults(v) for k, v in compose["services"][service]["environment"].items()}
    env.update(load_yaml(AUTH)["services"][service]["environment"])
    chatvla_env = {k for k in env if k.startswith("CHATVLA_")}
    assert chatvla_env <= env_names, f"not `chatvla serve` settings: {sorted(chatvla_env - env_names)}"
    config = DEPLOY / "docker" / f"{SERVERS[service]}.yaml"
    s = load_settings(env=env, config_file=config)
    assert (s.host, s.http_host) == ("0.0.0.0", "0.0.0.0")
    assert s.tls and s.tokens_file is not None
    ports = {p.rsplit(":", 1)[1] for p in compose["services"][service]["ports"]}
    assert ports == {str(s.grpc_port), str(s.http_port)}
    grace = int(compose["services"][service]["stop_grace_period"].rstrip("s"))
    assert grace >= 2 * s.drain_timeout_s + 10, "stop_grace_period cuts the SIGTERM drain short"
    assert "chatvla" in compose["services"][service]["networks"]["default"]["aliases"]


@pytest.mark.parametrize("service", sorted(SERVERS))
def test_server_pins_the_allocator(compose, service):
    env = {k: defaults(v) for k, v in compose["services"][service]["environment"].items()}
    assert {k: env.get(k) for k in allocator_env()} == allocator_env()


def test_prometheus_scrapes_the_server_alias(compose):
    for name in ("prometheus.yml", "prometheus-auth.yml"):
        cfg = load_yaml(DEPLOY / "prometheus" / name)
        job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "chatvla-serve")
        assert job["static_configs"][0]["targets"] == ["chatvla:8080"]
        assert job["metrics_path"] == "/metrics"


def test_third_party_images_are_pinned(compose):
    for name, svc in compose["services"].items():
        if "build" not in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


def compose_cli() -> list[str]:
    if exe := tool("docker-compose"):
        return [exe]
    if (docker := tool("docker")) and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    pytest.skip("no compose CLI (docker compose plugin or docker-compose): run scripts/validate_deploy.sh")


@pytest.mark.parametrize(
    "args",
    [
        ["--profile", "gpu", "--profile", "sim"],
        ["--profile", "cpu", "--profile", "sim"],
        ["-f", "docker-compose.yml", "-f", "deploy/compose/auth.yml", "--profile", "gpu", "--profile", "cpu"],
    ],
    ids=["gpu+sim", "cpu+sim", "auth"],
)
def test_docker_compose_config(args):
    proc = run([*compose_cli(), *args, "config", "--quiet"])
    assert proc.returncode == 0, proc.stderr
