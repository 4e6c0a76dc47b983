"""Reconnect on readiness, not on a timer: while the policy client is disconnected it watches the
server's gRPC health (`grpc.health.v1.Health/Watch`) and reconnects as soon as the server *becomes*
SERVING, instead of sleeping out a blind backoff.

Why: a restarting server binds its port first, loads and warms the model, and only then reports
SERVING (NOT_SERVING until then). With a blind exponential backoff the robot finds out up to a whole
backoff step (5 s at the cap) after the server is back, which is the difference between riding out a
restart while the arm holds and the watchdog stopping it (client/safety.py). Watching costs one
long-lived call on a channel that retries the connection every `poll_s` while the server is gone.

Only a transition counts: the wait ends early on SERVING only after this wait has seen the server not
serving (NOT_SERVING, unreachable, or the watch broken). A server that is SERVING all along but whose
stream failed for another reason (it refused the session, overdue replies) keeps the backoff, so a fleet
cannot hammer a healthy-but-refusing server. The backoff delay stays the upper bound of every wait: a
server without the health service (UNIMPLEMENTED) or with a broken one is never waited on longer than
before.

grpcio-health-checking is a server-side dependency, so the two health messages are encoded here by hand
(proto3: `HealthCheckRequest{string service = 1}`, `HealthCheckResponse{ServingStatus status = 1}`).
Nothing here unpickles; a response that does not parse counts as "unknown".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum

import grpc

from chatvla.client.conversion import rpc_status
from chatvla.wire.vocabulary import HEALTH_WATCH_METHOD

# grpc.health.v1.HealthCheckResponse.ServingStatus
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3


class Readiness(str, Enum):
    SERVING = "serving"  # became SERVING during the wait: reconnect now
    TIMEOUT = "timeout"  # the wait's bound passed first
    UNSUPPORTED = "unsupported"  # no health service there (or not allowed): the caller waits blindly
    CLOSED = "closed"  # the client is closing


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """A serialized `HealthCheckRequest{service}`."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_status(data: bytes) -> int:
    """The `status` of a serialized `HealthCheckResponse`; UNKNOWN if absent or unparsable. Unknown
    fields are skipped, as protobuf parsers do."""
    i, status = 0, UNKNOWN
    try:
        while i < len(data):
            key, i = _read_varint(data, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(data, i)
                if field == 1:
                    status = value
            elif wire == 2:
                length, i = _read_varint(data, i)
                i += length
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return UNKNOWN
        return status if i == len(data) else UNKNOWN
    except IndexError:
        return UNKNOWN


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80 or shift > 63:
            return result, i
        shift += 7


# Codes that mean "no usable health service there", not "the server is down".
_UNSUPPORTED = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def wait_until_serving(
    channel: grpc.Channel,
    service: str,
    *,
    timeout_s: float,
    poll_s: float,
    closed: threading.Event,
    register: Callable[[grpc.Call | None], None] = lambda call: None,
    metadata: Sequence[tuple[str, str]] = (),
) -> Readiness:
    """Watch `service`'s health on `channel` for at most `timeout_s`; return SERVING as soon as it turns
    SERVING after being seen not serving (see module doc). `register` gets each watch call (and None
    after it), so `close()` on another thread can cancel it; `closed` ends the wait too.

    The first watch does not wait for a connection, so an unreachable server is seen as down at once;
    later ones wait for the channel to (re)connect, which it retries every `poll_s` (the caller's
    channel options)."""
    deadline = time.monotonic() + timeout_s
    saw_down = False
    watch = channel.unary_stream(HEALTH_WATCH_METHOD, request_serializer=None, response_deserializer=None)
    request = encode_request(service)
    first = True
    while not closed.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Readiness.TIMEOUT
        call = watch(request, timeout=remaining, wait_for_ready=not first, metadata=list(metadata))
        first = False
        register(call)
        try:
            if closed.is_set():
                call.cancel()
            for raw in call:
                if decode_status(raw) == SERVING:
                    if saw_down:
                        return Readiness.SERVING
                else:
                    saw_down = True
            saw_down = True  # the server ended the watch: it is going away
        except grpc.RpcError as e:
            code, _ = rpc_status(e)
            if closed.is_set():
                return Readiness.CLOSED
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Readiness.TIMEOUT
            if code in _UNSUPPORTED:
                return Readiness.UNSUPPORTED
            saw_down = True  # unreachable, or it went away mid-watch
            closed.wait(min(poll_s, max(0.0, deadline - time.monotonic())))  # never spin on instant failures
        finally:
            register(None)
            call.cancel()
    return Readiness.CLOSED
