"""deploy/docker/healthcheck.py (the images' HEALTHCHECK) against a real `chatvla serve --engine null`
process configured the way the images configure it: CHATVLA_* env vars and a CHATVLA_CONFIG file."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from deploykit import DEPLOY

SCRIPT = DEPLOY / "docker/healthcheck.py"
READY = "chatvla-serve ready:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATVLA_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def server(tmp_path) -> Iterator[callable]:
    procs: list[subprocess.Popen] = []

    def start(**settings: str) -> dict[str, str]:
        config = tmp_path / "server.yaml"  # like the images: listen on all interfaces via the settings file
        config.write_text("host: 0.0.0.0\nhttp_host: 0.0.0.0\nengine: null\n")
        env = base_env(
            CHATVLA_CONFIG=str(config), CHATVLA_GRPC_PORT=str(free_port()), CHATVLA_HTTP_PORT=str(free_port()),
            **settings,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatvla.cli.main", "serve"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith(READY), f"server did not start: {line!r} {proc.stderr.read() if proc.poll() else ''}"
        return env

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_ready_server_is_healthy_over_grpc_and_http(server):
    env = server()
    r = healthcheck(env)
    assert r.returncode == 0, r.stderr
    assert "gRPC health" in r.stdout and "SERVING" in r.stdout
    r = healthcheck(env, "--http")
    assert r.returncode == 0 and "/readyz: 200" in r.stdout, r.stderr
    assert healthcheck(env, "--quiet").stdout == ""


def test_tls_server_is_checked_over_https(server, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=chatvla", "-addext", "subjectAltName=DNS:chatvla,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    env = server(CHATVLA_TLS_CERT=str(cert), CHATVLA_TLS_KEY=str(key))
    r = healthcheck(env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("https://127.0.0.1:") and "/readyz: 200" in r.stdout


def test_nothing_listening_is_unhealthy():
    env = base_env(CHATVLA_GRPC_PORT=str(free_port()), CHATVLA_HTTP_PORT=str(free_port()))
    r = healthcheck(env, "--timeout", "1")
    assert r.returncode == 1 and "gRPC health" in r.stderr
    r = healthcheck(env, "--http", "--timeout", "1")
    assert r.returncode == 1 and "/readyz" in r.stderr


def test_bad_settings_are_unhealthy_with_the_reason():
    r = healthcheck(base_env(CHATVLA_GRPC_PORT="not-a-port"))
    assert r.returncode == 1 and "CHATVLA_GRPC_PORT" in r.stderr


def test_wildcard_hosts_map_to_loopback():
    spec = importlib.util.spec_from_file_location("healthcheck", SCRIPT)  # a script, not a package module
    assert spec is not None and spec.loader is not None
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    assert hc.local_address("0.0.0.0") == "127.0.0.1"
    assert hc.local_address("::") == "[::1]"
    assert hc.local_address("10.1.2.3") == "10.1.2.3"
    assert hc.local_address("fd00::5") == "[fd00::5]"
