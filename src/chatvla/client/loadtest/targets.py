"""Where a load test may send traffic: loopback unless the operator explicitly allows a remote server.

A load test is a small denial-of-service by design, so the default is the safe one: `HOST:PORT` must be
a loopback address (127.0.0.0/8, ::1) or a name that resolves only to loopback addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from chatvla.client import balancing


class TargetError(ValueError):
    """A target the load test refuses (malformed, or not loopback without --allow-remote)."""


def split_host_port(target: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` -> (host, port), with the client's address parser; an unbracketed IPv6
    address is refused here (its last group would be taken for the port)."""
    t = target.strip()
    try:
        host, port = balancing.split_host_port(t)
    except ValueError as e:
        why = f"{target!r}: expected HOST:PORT with a port in 1..65535 (IPv6 as [addr]:PORT); {e}"
        raise TargetError(why) from None
    if ":" in host and not t.startswith("["):
        raise TargetError(f"{target!r}: expected HOST:PORT (IPv6 as [addr]:PORT)")
    return host, port


def is_loopback_host(host: str) -> bool:
    """True if `host` is a loopback address, or a name whose every address is loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_target(target: str, *, allow_remote: bool = False) -> tuple[str, int]:
    host, port = split_host_port(target)
    if not allow_remote and not is_loopback_host(host):
        raise TargetError(
            f"{host} is not a loopback address; a load test targets 127.0.0.1/::1 unless you pass --allow-remote "
            "(only against a server you operate)"
        )
    return host, port


def check_url(url: str, *, allow_remote: bool = False) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"{url!r}: expected an http(s)://HOST:PORT/metrics URL")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise TargetError(f"{parts.hostname} is not a loopback address (pass --allow-remote for remote servers)")
    return url
