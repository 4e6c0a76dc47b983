"""gRPC client for `chatvla.v1.Policy.Stream`: one long-lived bidi stream per robot session.

Why it is built like this:

* The control loop must never wait for the network, so all gRPC work happens on a background thread
  (plus the request-consumer thread gRPC starts per call). `submit` only swaps the newest observation
  into a one-slot mailbox; `poll` only drains an event deque. Neither takes a lock for longer than a
  dict update, and images are encoded on the sender side, not on the control thread.
* Only the newest observation matters: if a new one is submitted before the previous left, the old one
  is reported as Aborted rather than sent late.
* Per-observation deadlines are enforced on both ends: the observation carries `deadline_ms` so the
  server drops work nobody waits for, and `poll` reports DeadlineExceeded when a reply is overdue.
  Several overdue replies in a row mean a silently dead link (no RST), so the stream is torn down and
  re-established rather than trusted.
* Reconnects follow the server's readiness: while disconnected the client watches the server's gRPC
  health (`chatvla.client.readiness`) and reconnects as soon as it becomes SERVING, so a restart costs
  the restart time and not the rest of a backoff step. The exponential backoff with jitter stays the
  bound of each wait (a server without health, a healthy server that refuses the session), and
  reconnecting stops after a fatal error (bad token, session refused): retrying those only hides the
  problem.
* Several replicas (several addresses, or a `dns:///name:port` resolving to several): each session
  opens on the replica `chatvla.client.balancing` picks for this robot (spread over the fleet, the
  same one every time while it is healthy) and stays there; when its stream ends (the replica died,
  drained, refused the session or stopped answering) the next session opens on another replica,
  with DNS re-resolved. Each session is a new stream, and every reply is matched to its observation
  by a seq that is never reused, so nothing of a dead session can land on the new one's ticks.
* Observations go on the wire as bytes made by `chatvla.client.conversion` (framed by
  `chatvla.client.framing`): each image is copied once, from the caller's array into the request,
  instead of once per message layer.
* Server errors become typed `PolicyError`s carrying the server's own message (and the offending field
  for INVALID_ARGUMENT), delivered as `RequestFailed` events, or raised from the synchronous helpers.

This module is the stream and its state machine; the configuration lives in `chatvla.client.config`,
the proto conversion in `chatvla.client.conversion`, the events and errors in
`chatvla.client.connection`. The names users import from here are re-exported (`__all__`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from chatvla.client.balancing import Balancer, Endpoint, Resolver
from chatvla.client.config import BackoffConfig, ClientConfig, SessionConfig, TlsConfig
from chatvla.client.connection import (
    Aborted,
    Clock,
    ConnectionChanged,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MonotonicClock,
    ObservationRequest,
    PermissionDenied,
    PolicyConnection,
    PolicyError,
    PolicyEvent,
    RequestFailed,
    ResourceExhausted,
    SessionRejected,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from chatvla.client.conversion import decode_chunk, encode_observation, error_from_code, rpc_status
from chatvla.client.framing import ObservationFramer
from chatvla.client.readiness import Readiness, wait_until_serving
from chatvla.profiles import RobotProfile
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import WireError
from chatvla.wire.vocabulary import AUTHORIZATION_KEY, POLICY_SERVICE, bearer_header

log = logging.getLogger(__name__)

# What users import from here; the configuration, the errors and `error_from_code` are re-exported
# from chatvla.client.config, .connection and .conversion.
__all__ = [
    "Aborted",
    "BackoffConfig",
    "ClientConfig",
    "DeadlineExceeded",
    "GrpcPolicyClient",
    "Internal",
    "InvalidArgument",
    "PermissionDenied",
    "PolicyError",
    "ResourceExhausted",
    "SessionConfig",
    "SessionRejected",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "connect",
    "error_from_code",
]

# The stream's requests are serialised by the client itself (see chatvla.client.framing), so its calls
# go through a method handle that sends bytes as they are.
_STREAM_METHOD = "/" + pb.DESCRIPTOR.services_by_name["Policy"].full_name + "/Stream"


# ---- the client ------------------------------------------------------------------------------------
@dataclass
class _Pending:
    seq: int
    request: ObservationRequest
    submitted_at: float


@dataclass
class _InFlight:
    tick: int
    sent_at: float
    deadline: float


class _Attempt:
    """One stream: its call object and a flag its request generator watches."""

    def __init__(self) -> None:
        self.call: grpc.Future | None = None
        self.done = threading.Event()
        self.session = False


class GrpcPolicyClient(PolicyConnection):
    """Streams observations to `Policy.Stream` and delivers chunks/errors as events. See module doc."""

    def __init__(
        self,
        config: ClientConfig,
        session: SessionConfig,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.clock: Clock = clock or MonotonicClock()
        self._rng = rng or random.Random()
        self._instruction = session.instruction
        self._events: deque[PolicyEvent] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: _Pending | None = None
        self._in_flight: dict[int, _InFlight] = {}
        self._seq = 0
        self._overdue_streak = 0
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._attempt: _Attempt | None = None
        self._health_call: grpc.Call | None = None  # the readiness watch while disconnected
        self._thread: threading.Thread | None = None
        self.balancer = Balancer(
            config.addresses,
            config.robot_id,
            policy=config.balance,  # type: ignore[arg-type]
            cooldown_s=config.failover_cooldown_s,
            resolver=resolver,
        )
        self._endpoint: Endpoint | None = None
        self.session_info: pb.SessionInfo | None = None
        self.fatal_error: PolicyError | None = None
        self.reconnects = 0
        self._last_attempt_had_session = False
        self._framer = ObservationFramer(config.image_encoding, config.jpeg_quality)

    # ---- public API ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def address(self) -> str:
        """The replica of the current (or last) session, as dialled."""
        return self._endpoint.address if self._endpoint is not None else self.config.addresses[0]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatvla-policy-client", daemon=True)
            self._thread.start()

    def wait_connected(self, timeout: float) -> pb.SessionInfo:
        """Block (for start-up code, never the control loop) until a session is open. Raises the fatal
        error if the server refused us, Unavailable on timeout."""
        self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fatal_error is not None:
                raise self.fatal_error
            if self._connected.wait(0.02) and self.session_info is not None:
                return self.session_info
        if self.fatal_error is not None:
            raise self.fatal_error
        raise Unavailable(f"no session with {', '.join(self.config.addresses)} within {timeout:.1f} s")

    def submit(self, request: ObservationRequest) -> int:
        now = self.clock.now()
        with self._wakeup:
            self._seq += 1
            seq = self._seq
            if self.fatal_error is not None:
                self._events.append(RequestFailed(seq, self.fatal_error, now))
                return seq
            old = self._pending
            self._pending = _Pending(seq, request, now)
            self._wakeup.notify_all()
        if old is not None:
            self._events.append(
                RequestFailed(old.seq, Aborted("superseded by a newer observation before it was sent"), now)
            )
        return seq

    def poll(self) -> list[PolicyEvent]:
        self._expire(self.clock.now())
        out: list[PolicyEvent] = []
        while True:
            try:
                out.append(self._events.popleft())
            except IndexError:
                return out

    def close(self) -> None:
        self._closed.set()
        with self._wakeup:
            self._wakeup.notify_all()
        att = self._attempt
        if att is not None:
            att.done.set()
            if att.call is not None:
                att.call.cancel()
        with self._lock:
            health = self._health_call
        if health is not None:
            health.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def set_instruction(self, text: str) -> None:
        """Used for the next session start; observations carry changes within a session."""
        self._instruction = text

    def get_model_info(self, timeout: float = 5.0) -> pb.ModelInfo:
        """Unary GetModelInfo on the first reachable replica; raises a typed PolicyError."""
        last: PolicyError | None = None
        for ep in self.balancer.failover_order():
            channel = self._channel(ep)
            try:
                stub = pb_grpc.PolicyStub(channel)
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata())
            except grpc.RpcError as e:
                last = error_from_code(e.code(), e.details() or str(e.code()))
                if last.fatal:
                    raise last from None
            finally:
                channel.close()
        assert last is not None
        raise last

    # ---- deadlines -----------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        """Runs on the caller's thread inside poll(): cheap, and needs no timer thread."""
        expired: list[tuple[int, float]] = []
        with self._lock:
            p = self._pending
            if p is not None and now - p.submitted_at > self._deadline_s(p.request):
                self._pending = None
                expired.append((p.seq, now - p.submitted_at))
            for seq, f in list(self._in_flight.items()):
                if now > f.deadline:
                    del self._in_flight[seq]
                    expired.append((seq, now - f.sent_at))
                    self._overdue_streak += 1
            tear_down = self._overdue_streak >= self.config.reconnect_after_timeouts
            if tear_down:
                self._overdue_streak = 0
        for seq, age in expired:
            err = DeadlineExceeded(f"no reply after {age * 1000:.0f} ms", seq=seq)
            self._events.append(RequestFailed(seq, err, now))
        att = self._attempt
        if tear_down and att is not None and att.call is not None:
            log.warning(
                "%d replies overdue in a row: re-establishing the stream",
                self.config.reconnect_after_timeouts,
            )
            att.call.cancel()

    def _deadline_s(self, request: ObservationRequest) -> float:
        return (request.deadline_ms or self.config.deadline_ms) / 1000.0

    # ---- connection thread ---------------------------------------------------------------------
    def _channel(self, endpoint: Endpoint, *, poll_ms: int | None = None) -> grpc.Channel:
        """A channel to `endpoint`; `poll_ms`: retry the connection that often while it fails (the
        readiness watch; gRPC's own reconnect backoff starts at 1 s and grows to 2 minutes)."""
        c = self.config
        address = endpoint.address
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", c.limits.max_message_bytes),
            ("grpc.max_send_message_length", c.limits.max_message_bytes),
            ("grpc.enable_retries", 0),  # we retry ourselves, with fresh observations
            # gRPC's minimum connect deadline (a fresh channel per attempt, so nothing else changes).
            ("grpc.min_reconnect_backoff_ms", c.connect_timeout_ms),
        ]
        if poll_ms is not None:
            options += [("grpc.initial_reconnect_backoff_ms", poll_ms), ("grpc.max_reconnect_backoff_ms", poll_ms)]
        if c.keepalive_ms > 0:
            options += [
                ("grpc.keepalive_time_ms", c.keepalive_ms),
                ("grpc.keepalive_timeout_ms", max(1000, c.keepalive_ms // 2)),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        if c.tls is None:
            return grpc.insecure_channel(address, options=options)
        server_name = c.tls.server_name or endpoint.server_name  # a resolved IP: check the DNS name
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(c.tls.root_certificates, c.tls.private_key, c.tls.certificate_chain)
        return grpc.secure_channel(address, creds, options=options)

    def _metadata(self) -> list[tuple[str, str]]:
        # The robot id travels in SessionStart.robot_id (the server labels by token, then by that).
        return [(AUTHORIZATION_KEY, bearer_header(self.config.token))] if self.config.token else []

    def _run(self) -> None:
        failures = 0
        endpoint = self.balancer.pick()
        while not self._closed.is_set():
            self._endpoint = endpoint
            address = endpoint.address
            error = self._stream_once(endpoint)
            if self._closed.is_set():
                break
            self.balancer.failed(endpoint)
            if error is not None and error.fatal:
                self.fatal_error = error
                log.error("policy client giving up on %s: %s", address, error)
                self._fail_everything(error)
                break
            if self._last_attempt_had_session:
                failures = 0
            failures += 1
            if self.config.max_reconnects is not None and failures > self.config.max_reconnects:
                self.fatal_error = Unavailable(
                    f"gave up after {self.config.max_reconnects} reconnect attempts; last: {error}"
                )
                self._fail_everything(self.fatal_error)
                break
            delay = self.config.backoff.delay(failures - 1, self._rng)
            endpoint = self.balancer.pick()
            log.info("stream to %s ended (%s); reconnecting to %s when it is serving, within %.2f s",
                     address, error, endpoint.address, delay)
            self.reconnects += 1
            self._await_reconnect(endpoint, delay)
        self._connected.clear()

    def _await_reconnect(self, endpoint: Endpoint, delay: float) -> Readiness:
        """Wait before the next session on `endpoint`: until it becomes SERVING (health watch), at most
        `delay` (the backoff). Without `follow_health`, or if it has no health service, the whole delay."""
        t0 = time.monotonic()
        outcome = Readiness.UNSUPPORTED
        if self.config.follow_health and delay > 0:
            channel = self._channel(endpoint, poll_ms=self.config.health_poll_ms)
            try:
                outcome = wait_until_serving(
                    channel, POLICY_SERVICE, timeout_s=delay, poll_s=self.config.health_poll_ms / 1e3,
                    closed=self._closed, register=self._register_health, metadata=self._metadata(),
                )
            finally:
                channel.close()
        if outcome is Readiness.UNSUPPORTED:
            self._closed.wait(max(0.0, delay - (time.monotonic() - t0)))
        elif outcome is Readiness.SERVING:
            log.info("%s is serving again after %.2f s; reconnecting", endpoint.address, time.monotonic() - t0)
        return outcome

    def _register_health(self, call: grpc.Call | None) -> None:
        with self._lock:
            self._health_call = call

    def _stream_once(self, endpoint: Endpoint) -> PolicyError | None:
        """Open one stream and serve it until it ends; return why it ended."""
        address = endpoint.address
        att = _Attempt()
        self._attempt = att
        self._last_attempt_had_session = False
        channel = self._channel(endpoint)
        error: PolicyError | None = None
        try:
            stream = channel.stream_stream(
                _STREAM_METHOD,
                request_serializer=None,  # _requests yields serialised StreamRequests
                response_deserializer=pb.StreamResponse.FromString,
                _registered_method=True,
            )
            call = stream(self._requests(att), metadata=self._metadata())
            att.call = call
            if self._closed.is_set():
                call.cancel()
            for resp in call:
                error = self._handle(resp, att, address)
                if error is not None:
                    break
            if error is None and not self._closed.is_set():
                error = Unavailable("the server ended the stream")
        except grpc.RpcError as e:
            error = error_from_code(*rpc_status(e))
            if not att.session and error.code == "INVALID_ARGUMENT":
                error = SessionRejected(error.message)
        finally:
            att.done.set()
            if att.call is not None:
                att.call.cancel()
            with self._wakeup:
                self._wakeup.notify_all()
            channel.close()
        self._last_attempt_had_session = att.session
        was_connected = self._connected.is_set()
        self._connected.clear()
        now = self.clock.now()
        lost = Unavailable(f"connection to {address} lost: {error.message if error else 'closed'}")
        with self._lock:
            dropped = list(self._in_flight)
            self._in_flight.clear()
            self._overdue_streak = 0
        for seq in dropped:
            self._events.append(RequestFailed(seq, lost, now))
        if was_connected or error is not None:
            self._events.append(ConnectionChanged(False, address, now, error=error))
        return error

    def _handle(self, resp: pb.StreamResponse, att: _Attempt, address: str) -> PolicyError | None:
        kind = resp.WhichOneof("msg")
        now = self.clock.now()
        if kind == "session":
            att.session = True
            if self._endpoint is not None:
                self.balancer.succeeded(self._endpoint)
            self.session_info = resp.session
            self._connected.set()
            self._events.append(ConnectionChanged(True, address, now, session_id=resp.session.session_id))
            log.info("session %s open on %s", resp.session.session_id, address)
            return None
        if kind == "chunk":
            return self._on_chunk(resp.chunk, now)
        if kind == "error":
            e = resp.error
            err = error_from_code(e.code, e.message, field=e.field, seq=e.seq or None)
            if not att.session:
                # An error before the session opened is an answer to the session start.
                if isinstance(err, InvalidArgument):
                    return SessionRejected(e.message, field=e.field)
                return err
            with self._lock:
                self._in_flight.pop(e.seq, None)
            self._events.append(RequestFailed(e.seq, err, now))
            if isinstance(err, Unavailable):
                # In-band UNAVAILABLE means this replica is draining or shutting down: every further
                # observation would be refused too, so move to another replica now rather than when
                # it finally ends the stream.
                return err
        return None

    def _on_chunk(self, chunk: pb.ActionChunk, now: float) -> None:
        with self._lock:
            self._in_flight.pop(chunk.seq, None)
            self._overdue_streak = 0
        try:
            reply = decode_chunk(chunk, action_dim=self.session.profile.action_dim, received_at=now)
        except WireError as e:
            self._events.append(RequestFailed(chunk.seq, Internal(f"server sent a bad chunk: {e}"), now))
            return None
        self._events.append(reply)
        return None

    def _requests(self, att: _Attempt) -> Iterator[bytes]:
        """Runs on gRPC's request-consumer thread: waits for the newest observation and encodes it.
        Yields serialised `StreamRequest`s."""
        yield pb.StreamRequest(
            start=self.session.to_proto(
                instruction=self._instruction,
                robot_id=self.config.robot_id,
                deadline_ms=self.config.deadline_ms,
            )
        ).SerializeToString()
        while True:
            with self._wakeup:
                while self._pending is None and not att.done.is_set() and not self._closed.is_set():
                    self._wakeup.wait(0.1)
                if att.done.is_set() or self._closed.is_set():
                    return
                p = self._pending
                self._pending = None
            msg = self._encode(p)
            if msg is None:
                continue
            now = self.clock.now()
            superseded = False
            with self._lock:
                gone = att.done.is_set()
                if gone:
                    # The stream ended while this was being encoded: it was never sent. Keep it for the
                    # next session (unless a newer one is already waiting) instead of tracking it as in
                    # flight on a stream that no longer exists.
                    superseded = self._pending is not None
                    if not superseded:
                        self._pending = p
                else:
                    self._in_flight[p.seq] = _InFlight(
                        p.request.tick, now, p.submitted_at + self._deadline_s(p.request)
                    )
            if gone:
                if superseded:
                    err = Aborted("superseded by a newer observation before it was sent")
                    self._events.append(RequestFailed(p.seq, err, now))
                return
            yield msg

    def _encode(self, p: _Pending) -> bytes | None:
        """The serialised `StreamRequest` for `p`, or None (and a RequestFailed event) if it cannot go."""
        r = p.request
        remaining_ms = self._deadline_s(r) * 1000 - (self.clock.now() - p.submitted_at) * 1000
        if remaining_ms <= 0:  # waited out its deadline (e.g. while reconnecting): nobody wants it now
            err = DeadlineExceeded(f"not sent within {self._deadline_s(r) * 1000:.0f} ms", seq=p.seq)
            self._events.append(RequestFailed(p.seq, err, self.clock.now()))
            return None
        try:
            cams = self.session.cameras if self.session.cameras is not None else self.session.profile.camera_names
            msg = encode_observation(
                self._framer, r, seq=p.seq, cameras=cams, deadline_ms=max(1, int(remaining_ms))
            )
        except (WireError, ValueError, TypeError) as e:
            field_name = e.field if isinstance(e, WireError) else "observation"
            self._events.append(
                RequestFailed(p.seq, InvalidArgument(str(e), field=field_name, seq=p.seq), self.clock.now())
            )
            return None
        if r.instruction:
            self._instruction = r.instruction  # a reconnect starts the new session with the latest task
        return msg

    def _fail_everything(self, error: PolicyError) -> None:
        now = self.clock.now()
        with self._lock:
            seqs = list(self._in_flight)
            self._in_flight.clear()
            if self._pending is not None:
                seqs.append(self._pending.seq)
                self._pending = None
        for seq in seqs:
            self._events.append(RequestFailed(seq, error, now))


def connect(
    addresses: Sequence[str] | str,
    profile: RobotProfile,
    *,
    instruction: str = "",
    token: str | None = None,
    tls: TlsConfig | None = None,
    **client_options: object,
) -> GrpcPolicyClient:
    """Shorthand: build and start a client for `profile` at `addresses`."""
    addrs = (addresses,) if isinstance(addresses, str) else tuple(addresses)
    client = GrpcPolicyClient(
        ClientConfig(addresses=addrs, token=token, tls=tls, **client_options),  # type: ignore[arg-type]
        SessionConfig(profile=profile, instruction=instruction),
    )
    client.start()
    return client
