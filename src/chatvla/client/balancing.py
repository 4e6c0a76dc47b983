"""Client-side balancing over policy server replicas: which replica a robot streams to, and where it
goes when that replica dies or drains.

Why it is built like this:

* Robots spread over replicas without a coordinator, and a robot keeps its replica: the order of the
  replicas is rendezvous (highest-random-weight) hashing of (robot key, replica address). Every robot
  ranks the replicas its own way, so a fleet spreads evenly; the same robot ranks them the same way
  every time, so it lands on the same replica episode after episode; adding or removing a replica
  moves only the robots that ranked it first (about 1/N of them), not everyone.
* A session stays where it opened: the client asks for a replica only to open a session, so a
  healthy stream is never moved. The balancer is consulted again only after a stream ended (the
  replica died, drained, refused the session or stopped answering).
* Failover goes down the robot's own ranking, skipping replicas that failed recently ("cooling
  down"), so the robots of a dead replica spread over the survivors instead of piling onto one. When
  every replica is cooling down, the one that failed longest ago is retried (round robin).
* DNS: a `dns:///host:port` target (the spelling gRPC itself uses, e.g. a Kubernetes headless
  Service) is resolved here, with `socket.getaddrinfo`, to every A/AAAA record, each its own replica.
  It is re-resolved every time a replica is picked, so a failover sees replicas that were added and
  no longer dials removed ones. If resolution fails, the last good answer is used; with none, the
  target is handed to gRPC as is and fails like any unreachable address. Other targets
  (`host:port`, `[v6]:port`, `ipv4:`/`unix:` URIs) are one replica each and are passed to gRPC
  untouched, exactly as before this module existed.

No I/O except the resolver, no threads: the policy client calls it from its connection thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

BalancePolicy = Literal["spread", "ordered"]
BALANCE_POLICIES: tuple[str, ...] = ("spread", "ordered")

# host, port -> IP address strings (what getaddrinfo's sockaddr[0] holds), in the resolver's order.
Resolver = Callable[[str, int], Sequence[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every A and AAAA record of `host` (through the system resolver: /etc/hosts, DNS, ...)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Endpoint:
    """One replica as gRPC dials it. `target` is the configured address it came from; `server_name`
    is the DNS name a resolved IP stands for (what a TLS certificate names), None if not resolved."""

    address: str
    target: str
    server_name: str | None = None


@dataclass(frozen=True)
class _Target:
    text: str
    host: str | None = None  # set for `dns:` targets only
    port: int = 0


def split_host_port(address: str) -> tuple[str, int]:
    """Split `host:port` / `[v6]:port`; the port is required (there is no sensible default)."""
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {address!r}: expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address!r} needs a port (host:port)")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host, int(port_text)


def parse_target(text: str) -> _Target:
    """`dns:///host:port`, `dns:host:port` or `dns://authority/host:port` are resolved here (the DNS
    authority is ignored: the system resolver answers); anything else is one replica, as is."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"bad server address {text!r}")
    text = text.strip()
    if not text.lower().startswith("dns:"):
        return _Target(text)
    rest = text[4:]
    if rest.startswith("//"):
        _authority, slash, rest = rest[2:].partition("/")
        if not slash:
            raise ValueError(f"bad target {text!r}: expected dns:///host:port")
    host, port = split_host_port(rest)
    return _Target(text, host, port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def rendezvous_score(key: str, address: str) -> int:
    """The weight of `address` for `key`: a stable 64-bit hash (not Python's salted `hash`)."""
    digest = hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """`endpoints` in `key`'s rendezvous order, best first."""
    return sorted(endpoints, key=lambda e: (-rendezvous_score(key, e.address), e.address))


class Balancer:
    """Picks the replica for the next session of one robot and remembers which ones failed.

    `key` is what spreads robots (the robot id); empty means a random key per balancer, which still
    spreads a fleet but gives no stickiness from one client to the next. `policy="ordered"` keeps the
    configured order instead (a primary and its backups). `clock` is only for the cool-down."""

    def __init__(
        self,
        targets: Sequence[str],
        key: str = "",
        *,
        policy: BalancePolicy = "spread",
        cooldown_s: float = 10.0,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(targets, str):
            raise TypeError("targets must be a sequence of strings, not one string")
        if policy not in BALANCE_POLICIES:
            raise ValueError(f"balance policy must be one of {BALANCE_POLICIES}, got {policy!r}")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must be >= 0")
        self.targets = tuple(parse_target(t) for t in targets)
        if not self.targets:
            raise ValueError("at least one server address is needed")
        self.key = key or uuid.uuid4().hex
        self.policy = policy
        self.cooldown_s = cooldown_s
        self.resolver: Resolver = resolver or system_resolver
        self.clock = clock
        self._known: dict[str, tuple[str, ...]] = {}  # dns target -> last good answer
        self._failed_at: dict[str, float] = {}  # address -> when it last failed
        self.current: Endpoint | None = None  # where the open (or last) session lives

    # ---- replicas ------------------------------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        """Every replica right now (DNS targets resolved afresh), in configured order, no duplicates."""
        out: list[Endpoint] = []
        seen: set[str] = set()
        for t in self.targets:
            for ep in self._expand(t):
                if ep.address not in seen:
                    seen.add(ep.address)
                    out.append(ep)
        return out

    def _expand(self, t: _Target) -> list[Endpoint]:
        if t.host is None:
            return [Endpoint(t.text, t.text)]
        try:
            ipaddress.ip_address(t.host)
            return [Endpoint(format_address(t.host, t.port), t.text)]  # an IP literal: nothing to resolve
        except ValueError:
            pass
        try:
            ips = tuple(dict.fromkeys(self.resolver(t.host, t.port)))  # dedupe, keep order
            if not ips:
                raise OSError("no addresses")
            if ips != self._known.get(t.text):
                log.info("%s resolves to %d replica(s): %s", t.text, len(ips), ", ".join(ips))
            self._known[t.text] = ips
        except OSError as e:  # socket.gaierror is an OSError
            ips = self._known.get(t.text, ())
            log.warning("cannot resolve %s (%s); using %s", t.text, e,
                        f"the last answer ({len(ips)} replicas)" if ips else "the name as is")
            if not ips:
                return [Endpoint(t.text, t.text)]
        return [Endpoint(format_address(ip, t.port), t.text, t.host) for ip in sorted(ips)]

    def ranked(self, endpoints: Sequence[Endpoint] | None = None) -> list[Endpoint]:
        """Replicas in this robot's order of preference, ignoring health."""
        eps = list(self.endpoints() if endpoints is None else endpoints)
        return eps if self.policy == "ordered" else rank(self.key, eps)

    def failover_order(self) -> list[Endpoint]:
        """Where to open the next session, best first: healthy replicas in preference order, then
        the ones cooling down, longest-failed first."""
        now = self.clock()
        healthy, cooling = [], []
        for ep in self.ranked():
            failed = self._failed_at.get(ep.address)
            (cooling if failed is not None and now - failed < self.cooldown_s else healthy).append(ep)
        cooling.sort(key=lambda e: self._failed_at[e.address])
        return healthy + cooling

    # ---- what the client calls -----------------------------------------------------------------
    def pick(self) -> Endpoint:
        """The replica for the next session (re-resolves DNS targets)."""
        ep = self.failover_order()[0]
        self.current = ep
        return ep

    def failed(self, ep: Endpoint) -> None:
        """`ep`'s stream ended or could not open: avoid it for `cooldown_s`."""
        self._failed_at[ep.address] = self.clock()

    def succeeded(self, ep: Endpoint) -> None:
        """A session opened on `ep`: it is healthy again."""
        self._failed_at.pop(ep.address, None)
        self.current = ep
