"""Restart ride-out: the policy client reconnects when the restarted server becomes SERVING (it watches
gRPC health while disconnected), not when a blind backoff happens to expire; and the health codec."""

from __future__ import annotations

import asyncio
import time

from chatvla.client.config import BackoffConfig, ClientConfig, SessionConfig
from chatvla.client.policy_client import GrpcPolicyClient
from chatvla.client.readiness import NOT_SERVING, SERVING, UNKNOWN, decode_status, encode_request
from chatvla.engines.null import NullEngine
from chatvla.profiles import FRANKA_JOINT
from chatvla.server.app import ServerApp
from chatvla.server.settings import ServerSettings
from chatvla.wire.vocabulary import POLICY_SERVICE

BACKOFF_S = 5.0  # one fixed step (no jitter): a blind reconnect comes exactly this long after the failure
WARMUP_S = 0.5  # the restarted server is bound but NOT_SERVING this long


class SlowWarmup(NullEngine):
    """Bound and answering health (NOT_SERVING) for a while before it is ready, like a loading model."""

    def warmup(self) -> None:
        time.sleep(WARMUP_S)
        super().warmup()


def settings(port: int) -> ServerSettings:
    return ServerSettings(engine="null", model="test", grpc_port=port, http_port=0, drain_timeout_s=2.0)


async def until(cond, timeout: float, what: str) -> float:
    """Poll `cond` (a state, not a speed) until true; the time it became true."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return time.monotonic()


def test_health_messages_round_trip():
    from grpc_health.v1 import health_pb2  # the server side's generated messages, as the reference

    assert health_pb2.HealthCheckRequest.FromString(encode_request(POLICY_SERVICE)).service == POLICY_SERVICE
    for status in (SERVING, NOT_SERVING):
        assert decode_status(health_pb2.HealthCheckResponse(status=status).SerializeToString()) == status
    assert decode_status(b"") == UNKNOWN  # proto3 default
    assert decode_status(b"\x08") == UNKNOWN  # truncated
    assert decode_status(b"\x12\x02ab\x08\x01") == SERVING  # an unknown field first is skipped


async def test_reconnect_follows_readiness_after_a_restart_on_the_same_port():
    first = ServerApp(settings(0), engine=NullEngine())
    await first.start()
    port = first.grpc.port
    client = GrpcPolicyClient(
        ClientConfig(addresses=(f"127.0.0.1:{port}",),
                     backoff=BackoffConfig(initial_s=BACKOFF_S, max_s=BACKOFF_S, jitter=0.0)),
        SessionConfig(profile=FRANKA_JOINT, instruction="pick up the red block"),
    )
    second: ServerApp | None = None
    try:
        await asyncio.to_thread(client.wait_connected, 10.0)
        failed_at = time.monotonic()
        await first.shutdown()  # streams end UNAVAILABLE; the port is free again
        await until(lambda: not client.connected, 10, "the client to notice")
        await asyncio.sleep(0.3)  # nothing listens on the port for a while
        second = ServerApp(settings(port), engine=SlowWarmup())
        await second.start()  # returns once it is SERVING
        serving_at = time.monotonic()
        connected_at = await until(lambda: client.connected, 2 * BACKOFF_S, "the reconnect")
        # The reconnect follows SERVING (the watch channel retries every 100 ms), where the blind backoff
        # would have waited until failed_at + BACKOFF_S (checked once with follow_health=False: 4.0 s
        # after SERVING, so this assertion fails without the watch).
        assert connected_at - serving_at < 1.5, connected_at - serving_at
        assert connected_at - failed_at < BACKOFF_S - 0.5, connected_at - failed_at
        assert client.session_info is not None and client.fatal_error is None
    finally:
        client.close()
        if second is not None:
            await second.shutdown()


def test_close_ends_the_readiness_watch_at_once():
    """Closing while the client watches a server that is down does not wait out the watch."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = GrpcPolicyClient(
        ClientConfig(addresses=(f"127.0.0.1:{port}",), backoff=BackoffConfig(initial_s=30.0, max_s=30.0)),
        SessionConfig(profile=FRANKA_JOINT, instruction="go"),
    )
    client.start()
    end = time.monotonic() + 10
    while client._health_call is None:  # the first stream failed; the watch is running
        assert time.monotonic() < end, "the client never started watching"
        time.sleep(0.01)
    t0 = time.monotonic()
    client.close()
    assert time.monotonic() - t0 < 2.0
    assert client._thread is not None and not client._thread.is_alive()
