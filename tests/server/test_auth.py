"""Bearer tokens on both transports, the token file format, and TLS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverkit import infer_request, start

from chatvla.server.auth import TokenFileError, TokenStore, bearer, hash_token, main
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-for-panda"


@pytest.fixture
def tokens_file(tmp_path):
    p = tmp_path / "tokens"
    p.write_text(f"# robots\npanda-01 {hash_token(TOKEN)}\narx-02 {hash_token('other')}  # bimanual\n")
    return p


def test_token_store_parses_and_names_robots(tokens_file):
    store = TokenStore.from_file(tokens_file)
    assert store.robot_for(TOKEN) == "panda-01"
    assert store.robot_for("other") == "arx-02"
    assert store.robot_for("wrong") is None and store.robot_for(None) is None


@pytest.mark.parametrize("text", ["panda-01 md5:abcd", "panda-01", "p sha256:XYZ", "", "# only a comment"])
def test_token_store_rejects_bad_files(text):
    with pytest.raises(TokenFileError):
        TokenStore.parse(text.splitlines())


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None


def test_hash_helper_prints_a_token_file_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(TOKEN + "\n"))
    assert main(["panda-01", "--stdin"]) == 0
    line = capsys.readouterr().out.strip()
    assert TokenStore.parse([line]).robot_for(TOKEN) == "panda-01"
    assert main(["arx-02"]) == 0
    captured = capsys.readouterr()
    token = captured.err.rsplit(" ", 1)[1].strip()
    assert TokenStore.parse([captured.out.strip()]).robot_for(token) == "arx-02"


async def test_grpc_requires_a_valid_token(serve, tokens_file):
    srv = await serve(tokens_file=tokens_file)
    for md in (None, (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await srv.stub.Infer(infer_request(), metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await srv.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = srv.stub.Stream()
    await call.write(start())
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", f"Bearer {TOKEN}"),)
    assert (await srv.stub.Infer(infer_request(), metadata=good)).chunk.seq == 0
    call = srv.stub.Stream(metadata=good)
    await call.write(start(robot_id="claims-to-be-someone-else"))
    assert (await call.read()).session.session_id
    session = next(iter(srv.app.state.pipeline.sessions.values()))
    assert session.robot == "panda-01"  # the token names the robot, not the client's claim
    call.cancel()
    # health stays open for probes
    health = health_pb2_grpc.HealthStub(srv.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    assert srv.sample("chatvla_rejected_total", reason="unauthenticated") == 5


async def test_http_requires_a_valid_token(serve, tokens_file):
    srv = await serve(tokens_file=tokens_file)
    for path in ("/v1/model", "/metrics"):
        r = await srv.http.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await srv.http.get(path, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = await srv.http.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
    r = await srv.http.post("/v1/infer", json={})
    assert r.status_code == 401
    r = await srv.http.post("/v1/infer", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422  # authenticated, then validated
    for path in ("/healthz", "/readyz", "/"):
        assert (await srv.http.get(path)).status_code == 200


@pytest.fixture
def tls_pair(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_on_both_ports(serve, tls_pair):
    cert, key = tls_pair
    srv = await serve(tls_cert=cert, tls_key=key)
    assert srv.app.http_url.startswith("https://")
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(srv.app.grpc_address, creds) as ch:
        info = await pb_grpc.PolicyStub(ch).GetModelInfo(pb.GetModelInfoRequest())
        assert info.engine == "null"
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as client:
        assert (await client.get(srv.app.http_url + "/healthz")).status_code == 200
    with pytest.raises(grpc.aio.AioRpcError):  # plaintext is refused
        await srv.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)


def _clear_text_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "travel in clear" in r.getMessage()]


async def test_plaintext_grpc_on_a_non_loopback_address_warns(serve, tokens_file, tls_pair, caplog):
    caplog.set_level("WARNING")
    await serve(tokens_file=tokens_file, openpi_port=0)  # loopback: quiet
    assert not _clear_text_warnings(caplog)
    await serve(tokens_file=tokens_file, host="0.0.0.0", openpi_port=0)
    [msg] = _clear_text_warnings(caplog)
    assert "gRPC and openpi" in msg and "0.0.0.0" in msg and "bearer tokens" in msg
    caplog.clear()
    cert, key = tls_pair
    await serve(tokens_file=tokens_file, host="0.0.0.0", tls_cert=cert, tls_key=key)  # TLS: quiet
    assert not _clear_text_warnings(caplog)
