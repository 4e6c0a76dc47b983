"""GrpcPolicyClient against a scripted Policy servicer on real loopback gRPC.

Time limits here only stop a hung test; nothing asserts how fast something was."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from chatvla.client.config import BackoffConfig, ClientConfig, SessionConfig, TlsConfig
from chatvla.client.connection import (
    Aborted,
    ChunkReply,
    ConnectionChanged,
    DeadlineExceeded,
    InvalidArgument,
    ObservationRequest,
    RequestFailed,
    ResourceExhausted,
    SessionRejected,
    Unauthenticated,
    Unavailable,
)
from chatvla.client.conversion import error_from_code, rpc_status
from chatvla.client.policy_client import GrpcPolicyClient
from chatvla.v1 import policy_pb2 as pb

pytestmark = pytest.mark.timeout(60)

FAST = BackoffConfig(initial_s=0.01, max_s=0.05, jitter=0.2)


def obs(toy, tick: int, instruction: str | None = None) -> ObservationRequest:
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    return ObservationRequest(
        tick=tick,
        images={"front": img},
        state=np.array([0.1, -0.2, 0.04], dtype=np.float32),
        instruction=instruction,
    )


def make_client(toy, addresses, *, token="s3cret", **cfg) -> GrpcPolicyClient:
    cfg.setdefault("backoff", FAST)
    config = ClientConfig(addresses=tuple(addresses), token=token, robot_id="arm-7", **cfg)
    session = SessionConfig(profile=toy, instruction="stack the cups", reasoning_every_n=4)
    return GrpcPolicyClient(config, session, rng=random.Random(1))


class Events:
    """Collects polled events so tests can wait for a kind without losing the others."""

    def __init__(self, client: GrpcPolicyClient) -> None:
        self.client = client
        self.all: list = []

    def of(self, kind: type) -> list:
        self.all.extend(self.client.poll())
        return [e for e in self.all if isinstance(e, kind)]


@pytest.fixture
def client_factory(toy):
    made: list[GrpcPolicyClient] = []

    def factory(addresses, **kw) -> GrpcPolicyClient:
        c = make_client(toy, addresses, **kw)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


def test_session_start_auth_and_a_chunk_round_trip(toy, grpc_server, client_factory, h):
    client = client_factory([grpc_server.address])
    info = client.wait_connected(5)
    assert info.session_id == "s1"
    log = grpc_server.servicer.log
    start = log.starts[0]
    assert start.robot_profile == "toy" and list(start.cameras) == ["front"]
    assert start.control_rate_hz == 10.0 and start.instruction == "stack the cups"
    assert start.robot_id == "arm-7" and start.reasoning.every_n == 4
    assert log.metadata[0]["authorization"] == "Bearer s3cret"

    ev = Events(client)
    seq = client.submit(obs(toy, tick=42, instruction="now the red one"))
    h.wait_for(lambda: ev.of(ChunkReply), what="a chunk")
    (reply,) = ev.of(ChunkReply)
    assert (reply.seq, reply.tick) == (seq, 42)
    np.testing.assert_array_equal(reply.actions[:, 0], 42 + np.arange(8))
    assert reply.actions.dtype == np.float32 and reply.reasoning == f"answering {seq}"
    assert reply.timings["total_ms"] == 1.0
    sent = log.observations[0]
    assert sent.seq == seq and sent.tick == 42 and sent.instruction == "now the red one"
    assert 0 < sent.deadline_ms <= 1000
    np.testing.assert_array_equal(log.images[0]["front"], obs(toy, 0).images["front"])
    assert ev.of(ConnectionChanged)[0].connected


def test_in_band_errors_become_typed_failures_with_the_servers_message(toy, grpc_server, client_factory, h):
    grpc_server.servicer.script = lambda o: h.Reply(
        "error", code=pb.INVALID_ARGUMENT, message="state has 2 values, need 3", field="observation.state"
    )
    client = client_factory([grpc_server.address])
    client.wait_connected(5)
    ev = Events(client)
    seq = client.submit(obs(toy, 0))
    h.wait_for(lambda: ev.of(RequestFailed), what="the error")
    (failed,) = ev.of(RequestFailed)
    assert failed.seq == seq and isinstance(failed.error, InvalidArgument)
    assert failed.error.message == "state has 2 values, need 3" and failed.error.field == "observation.state"
    assert client.connected  # the stream carries on
    grpc_server.servicer.script = lambda o: h.Reply()
    client.submit(obs(toy, 1))
    h.wait_for(lambda: ev.of(ChunkReply), what="a chunk after the error")


def test_reasoning_override_goes_on_the_wire_per_observation(toy, grpc_server, client_factory, h):
    client = client_factory([grpc_server.address])
    client.wait_connected(5)
    ev = Events(client)
    client.submit(dataclasses.replace(obs(toy, 0), reasoning="Pick card 49."))
    h.wait_for(lambda: len(ev.of(ChunkReply)) == 1, what="the first chunk")
    client.submit(obs(toy, 1))
    h.wait_for(lambda: len(ev.of(ChunkReply)) == 2, what="the second chunk")
    sent = grpc_server.servicer.log.observations
    assert [o.reasoning for o in sent] == ["Pick card 49.", ""]  # empty = not set: the model decodes


def test_run_episode_sends_the_override_with_every_observation(toy, h):
    from chatvla.client.episodes import run_episode
    from chatvla.client.fakes import FakeRobot

    fast = type(toy)(**{**toy.__dict__, "control_rate_hz": 100.0})
    server = h.FakeServer(h.ScriptedPolicy(fast)).start()
    try:
        res = run_episode(FakeRobot(fast), [server.address], "stack the cups", max_ticks=30,
                          connect_timeout_s=5, reasoning_override="Pick card 49.")
    finally:
        server.kill()
    assert res.ticks == 30
    sent = server.servicer.log.observations
    assert sent and all(o.reasoning == "Pick card 49." for o in sent)


def test_overdue_reply_is_reported_and_still_delivered_late(toy, grpc_server, client_factory, h):
    grpc_server.servicer.script = lambda o: h.Reply(delay=0.3 if o.seq == 1 else 0.0)
    client = client_factory([grpc_server.address], deadline_ms=50)
    client.wait_connected(5)
    ev = Events(client)
    client.submit(obs(toy, 0))
    h.wait_for(lambda: ev.of(RequestFailed), what="deadline")
    assert isinstance(ev.of(RequestFailed)[0].error, DeadlineExceeded)
    h.wait_for(lambda: ev.of(ChunkReply), what="the late chunk")  # the executor decides what is still useful
    assert grpc_server.servicer.log.observations[0].deadline_ms <= 50


def test_wrong_token_is_fatal_and_not_retried(toy, grpc_server, client_factory):
    client = client_factory([grpc_server.address], token="wrong")
    with pytest.raises(Unauthenticated, match="missing or wrong bearer token"):
        client.wait_connected(5)
    assert grpc_server.servicer.log.streams == 0 and len(grpc_server.servicer.log.metadata) == 1
    seq = client.submit(obs(toy, 0))  # never raises, never blocks: reports the fatal error
    failed = [e for e in client.poll() if isinstance(e, RequestFailed) and e.seq == seq]
    assert failed and isinstance(failed[0].error, Unauthenticated)


def test_a_refused_session_start_is_fatal(toy, grpc_server, client_factory):
    grpc_server.servicer.reject_start = (pb.INVALID_ARGUMENT, "unknown robot profile 'toy'", "start.robot_profile")
    client = client_factory([grpc_server.address])
    with pytest.raises(SessionRejected, match="unknown robot profile") as exc:
        client.wait_connected(5)
    assert exc.value.field == "start.robot_profile"


def test_server_death_fails_in_flight_and_the_client_reconnects(toy, grpc_server, client_factory, h):
    grpc_server.servicer.script = lambda o: h.Reply("hang") if o.seq == 2 else h.Reply()
    client = client_factory([grpc_server.address])
    client.wait_connected(5)
    ev = Events(client)
    client.submit(obs(toy, 0))
    h.wait_for(lambda: ev.of(ChunkReply), what="first chunk")
    hung = client.submit(obs(toy, 1))
    h.wait_for(lambda: len(grpc_server.servicer.log.observations) == 2, what="the hung observation")
    grpc_server.kill()
    h.wait_for(lambda: any(e.seq == hung for e in ev.of(RequestFailed)), what="in-flight failure")
    assert isinstance(next(e for e in ev.of(RequestFailed) if e.seq == hung).error, Unavailable)
    h.wait_for(lambda: any(not e.connected for e in ev.of(ConnectionChanged)), what="disconnect event")
    grpc_server.servicer.script = lambda o: h.Reply()
    grpc_server.start()  # same port
    h.wait_for(lambda: client.connected, timeout=10, what="reconnect")
    assert client.reconnects >= 1 and grpc_server.servicer.log.streams == 2
    # The new session starts with the newest instruction the robot sent.
    before = len(ev.of(ChunkReply))
    client.submit(obs(toy, 5))
    h.wait_for(lambda: len(ev.of(ChunkReply)) > before, what="chunk after reconnect")


def test_submit_never_blocks_and_newer_observations_supersede_unsent_ones(toy, grpc_server, client_factory, h):
    grpc_server.servicer.script = lambda o: h.Reply("hang")
    client = client_factory([grpc_server.address], deadline_ms=60_000)
    client.wait_connected(5)
    seqs = [client.submit(obs(toy, t)) for t in range(500)]
    assert seqs == list(range(1, 501))
    h.wait_for(lambda: len(grpc_server.servicer.log.observations) >= 1, what="first observation")
    events = client.poll()
    aborted = {e.seq for e in events if isinstance(e, RequestFailed) and isinstance(e.error, Aborted)}
    failures = [e for e in events if isinstance(e, RequestFailed)]
    assert len(failures) == len(aborted) and seqs[-1] not in aborted
    # Every observation was either superseded before it left, or went out (into gRPC's flow-control
    # window, the server is not reading), or is the one still waiting.
    with client._lock:
        outstanding = set(client._in_flight) | ({client._pending.seq} if client._pending else set())
    assert aborted | outstanding == set(seqs) and not aborted & outstanding


def test_failover_to_the_next_address(toy, grpc_server, client_factory):
    dead = "127.0.0.1:1"  # nothing listens on port 1
    client = client_factory([dead, grpc_server.address])
    assert client.wait_connected(10).session_id
    assert client.address == grpc_server.address


def test_gives_up_after_max_reconnects(toy, client_factory):
    client = client_factory(["127.0.0.1:1"], max_reconnects=2)
    with pytest.raises(Unavailable, match="gave up after 2"):
        client.wait_connected(10)


def test_get_model_info_and_its_typed_errors(toy, grpc_server, client_factory):
    assert client_factory([grpc_server.address]).get_model_info(5).model_id == "scripted"
    with pytest.raises(Unauthenticated):
        client_factory([grpc_server.address], token=None).get_model_info(5)


def _self_signed(tmp: Path) -> tuple[bytes, bytes]:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=chatvla-test",
            "-addext", "subjectAltName=DNS:chatvla-test,IP:127.0.0.1",
            "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return (tmp / "key.pem").read_bytes(), (tmp / "cert.pem").read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls_with_token(toy, tmp_path, client_factory, h):
    key, cert = _self_signed(tmp_path)
    server = h.FakeServer(h.ScriptedPolicy(toy, token="s3cret"), grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    try:
        tls = TlsConfig.from_files(ca=tmp_path / "cert.pem", server_name="chatvla-test")
        client = client_factory([server.address], tls=tls)
        client.wait_connected(10)
        ev = Events(client)
        client.submit(obs(toy, 3))
        h.wait_for(lambda: ev.of(ChunkReply), what="chunk over TLS")
        # Without our CA the handshake fails: the client keeps retrying, never connects.
        plain = client_factory([server.address], tls=TlsConfig(server_name="chatvla-test"), max_reconnects=1)
        with pytest.raises(Unavailable):
            plain.wait_connected(10)
    finally:
        server.kill()


def test_backoff_grows_is_capped_and_jittered():
    b = BackoffConfig(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.25)
    rng = random.Random(0)
    for attempt, base in [(0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (50, 1.0)]:
        delays = [b.delay(attempt, rng) for _ in range(200)]
        assert min(delays) >= base * 0.75 and max(delays) <= base * 1.25
        assert max(delays) - min(delays) > base * 0.2  # actually jittered
    with pytest.raises(ValueError):
        BackoffConfig(initial_s=0)


def test_status_codes_map_to_typed_errors():
    assert isinstance(error_from_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"), ResourceExhausted)
    assert isinstance(error_from_code(grpc.StatusCode.UNAUTHENTICATED, "no"), Unauthenticated)
    assert error_from_code(grpc.StatusCode.UNAUTHENTICATED, "no").fatal
    assert isinstance(error_from_code(pb.DEADLINE_EXCEEDED, "late"), DeadlineExceeded)
    e = error_from_code(pb.INVALID_ARGUMENT, "bad", field="images[front]", seq=4)
    assert (e.message, e.field, e.seq) == ("bad", "images[front]", 4)
    assert "images[front]" in str(e)


def test_the_public_names_stay_importable_from_policy_client():
    """docs/deployment.md imports the configuration from chatvla.client.policy_client: it re-exports it."""
    from chatvla.client import config, connection, conversion, policy_client

    assert policy_client.ClientConfig is config.ClientConfig
    assert policy_client.SessionConfig is config.SessionConfig
    assert policy_client.TlsConfig is config.TlsConfig
    assert policy_client.BackoffConfig is config.BackoffConfig
    assert policy_client.Unavailable is connection.Unavailable
    assert policy_client.error_from_code is conversion.error_from_code
    assert all(hasattr(policy_client, name) for name in policy_client.__all__)


def test_config_validation(toy):
    with pytest.raises(ValueError):
        ClientConfig(addresses=())
    with pytest.raises(TypeError):
        ClientConfig(addresses="127.0.0.1:1")  # type: ignore[arg-type]


def test_control_loop_over_real_grpc_executes_only_current_ticks(counter, h):
    """The whole robot side on wall time: a 100 Hz loop on its own thread fed by the gRPC client."""
    from chatvla.client.executor import ChunkExecutor
    from chatvla.client.fakes import FakeRobot
    from chatvla.client.runtime import ControlLoop
    from chatvla.client.safety import SafetyFilter

    fast = type(counter)(**{**counter.__dict__, "control_rate_hz": 100.0, "chunk_size": 20})
    server = h.FakeServer(h.ScriptedPolicy(fast)).start()
    client = GrpcPolicyClient(ClientConfig(addresses=(server.address,), backoff=FAST), SessionConfig(fast))
    records = []

    class Rec:
        def on_tick(self, r):
            records.append(r)

    loop = ControlLoop(FakeRobot(fast), client, ChunkExecutor(fast), SafetyFilter(fast), observers=[Rec()])
    try:
        client.start()
        client.wait_connected(5)
        loop.start()
        h.wait_for(lambda: sum(len(r.merges) for r in list(records)) >= 5, timeout=20, what="5 merged chunks")
    finally:
        loop.stop()
        client.close()
        server.kill()
    assert loop.error is None and not loop.running
    executed = [(r.tick, r.proposed[0]) for r in records if r.proposed is not None]
    assert executed and all(abs(v - t) < 1e-6 for t, v in executed)


def test_a_failed_call_is_read_for_its_status_and_anything_else_is_unknown() -> None:
    class FailedCall(grpc.RpcError, grpc.Call):  # what grpc raises from a call: an error that is a Call
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return "queue full"

        def initial_metadata(self): ...
        def trailing_metadata(self): ...
        def is_active(self): ...
        def time_remaining(self): ...
        def cancel(self): ...
        def add_callback(self, callback): ...

    assert rpc_status(FailedCall()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert rpc_status(grpc.RpcError()) == (grpc.StatusCode.UNKNOWN, str(grpc.StatusCode.UNKNOWN))
