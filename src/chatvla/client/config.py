"""How the robot-PC client reaches the server and what its session start says: addresses, token and
TLS, reconnect backoff, deadlines, image encoding, balancing (`ClientConfig`, `TlsConfig`,
`BackoffConfig`), and the robot's own side of the session (`SessionConfig`). Plain frozen dataclasses,
checked when built; chatvla.client.policy_client runs a stream with them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from chatvla.client.balancing import BALANCE_POLICIES, parse_target
from chatvla.profiles import RobotProfile
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import Limits


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes. `root_certificates=None` trusts the system roots; key + chain enable mutual TLS;
    `server_name` overrides the name checked against the certificate (e.g. when dialling an IP)."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        def read(p: str | Path | None) -> bytes | None:
            return None if p is None else Path(p).read_bytes()

        return cls(read(ca), read(key), read(cert), server_name)


@dataclass(frozen=True)
class BackoffConfig:
    """Delay before reconnect attempt `n` (0-based): `initial_s * multiplier**n`, capped at `max_s`,
    times a uniform factor in [1 - jitter, 1 + jitter]."""

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.3

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and multiplier >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server. `addresses` are replicas: `host:port`, or `dns:///name:port` for every
    address a name resolves to. `balance="spread"` spreads robots over them by `robot_id` (rendezvous
    hashing), `"ordered"` tries them in the given order (a primary and its backups). See
    chatvla.client.balancing."""

    addresses: tuple[str, ...]
    token: str | None = None  # sent as `authorization: Bearer <token>`
    tls: TlsConfig | None = None
    deadline_ms: int = 1000  # per observation, unless the request sets one
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    max_reconnects: int | None = None  # consecutive failed attempts before giving up; None = never
    # Consecutive overdue replies after which the stream is presumed dead and re-established.
    reconnect_after_timeouts: int = 3
    image_encoding: str = "rgb8"  # rgb8 | jpeg | png
    jpeg_quality: int = 90
    limits: Limits = field(default_factory=Limits)
    keepalive_ms: int = 0  # 0 = off; the server must permit pings at this interval
    robot_id: str = ""
    balance: str = "spread"  # spread | ordered
    failover_cooldown_s: float = 10.0  # a replica whose stream failed is avoided this long
    # Bound on opening a connection (TCP + TLS). gRPC's own is 20 s, far too long to find out that a
    # replica's address has gone dark (no RST) while the arm holds.
    connect_timeout_ms: int = 3000
    # While disconnected, watch the server's gRPC health and reconnect as soon as it becomes SERVING
    # (chatvla.client.readiness) instead of sleeping out the whole backoff delay, which stays the bound
    # of each wait. The watch channel retries the connection every `health_poll_ms` (gRPC's floor: 100).
    follow_health: bool = True
    health_poll_ms: int = 100

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("at least one server address is needed")
        if isinstance(self.addresses, str):
            raise TypeError("addresses must be a tuple of strings, not one string")
        if self.deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        for address in self.addresses:
            parse_target(address)
        if self.balance not in BALANCE_POLICIES:
            raise ValueError(f"balance must be one of {BALANCE_POLICIES}, got {self.balance!r}")
        if self.failover_cooldown_s < 0 or self.connect_timeout_ms <= 0:
            raise ValueError("failover_cooldown_s must be >= 0 and connect_timeout_ms positive")
        if self.health_poll_ms < 100:
            raise ValueError("health_poll_ms must be >= 100 (gRPC retries a connection at most that often)")


@dataclass(frozen=True)
class SessionConfig:
    """What the session start says about this robot. Unset fields come from the profile."""

    profile: RobotProfile
    instruction: str = ""
    cameras: tuple[str, ...] | None = None
    control_rate_hz: float | None = None
    reasoning_every_n: int = 0  # 0 = server default
    reasoning_every_seconds: float = 0.0
    max_in_flight: int = 0  # observations the server may compute at once for this robot; 0 = its default

    def to_proto(self, *, instruction: str, robot_id: str, deadline_ms: int) -> pb.SessionStart:
        return pb.SessionStart(
            robot_profile=self.profile.name,
            cameras=list(self.cameras if self.cameras is not None else self.profile.camera_names),
            control_rate_hz=self.control_rate_hz or self.profile.control_rate_hz,
            instruction=instruction,
            robot_id=robot_id,
            reasoning=pb.ReasoningPolicy(every_n=self.reasoning_every_n, every_seconds=self.reasoning_every_seconds),
            default_deadline_ms=deadline_ms,
            max_in_flight=self.max_in_flight,
        )
