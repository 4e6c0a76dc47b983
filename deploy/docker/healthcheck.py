"""Container health check for `chatvla serve`: exit 0 when the server is ready for robots, 1 otherwise.

Used by the Dockerfile's HEALTHCHECK (and so by docker compose). It reads the server's own settings
(defaults < the CHATVLA_CONFIG YAML file < CHATVLA_* env vars, via `chatvla.server.settings`), so it
follows port and TLS changes made that way. It cannot see flags given on the command line: in
containers configure the server through env vars or the YAML file, as the images and manifests do.

- Without TLS it calls `grpc.health.v1.Health/Check` on the gRPC port (service "" = the whole server;
  SERVING only after warm-up and until a SIGTERM starts the drain). Health calls need no token.
- With TLS (`tls_cert` set) it asks `GET /readyz` on the HTTP port over HTTPS instead, without verifying
  the certificate: it talks to its own container over loopback, and a gRPC TLS check would need a
  host name from the certificate. /readyz and gRPC health are driven by the same readiness flag.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request

_WILDCARD = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}


def local_address(host: str) -> str:
    """Where this container reaches a server bound to `host` (wildcards become loopback)."""
    host = _WILDCARD.get(host, host)
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_grpc(host: str, port: int, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"gRPC health {host}:{port}: {e.code().name} {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"gRPC health {host}:{port}: {status}"


def check_http(host: str, port: int, tls: bool, timeout: float) -> tuple[bool, str]:
    url = f"{'https' if tls else 'http'}://{host}:{port}/readyz"
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return r.status == 200, f"{url}: {r.status}"
    except urllib.error.HTTPError as e:  # 503 while loading or draining
        try:
            reason = json.loads(e.read() or b"{}").get("reason", "")
        except ValueError:
            reason = ""
        return False, f"{url}: {e.code} {reason}".rstrip()
    except (OSError, urllib.error.URLError) as e:
        return False, f"{url}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", action="store_true", help="ask /readyz on the HTTP port even without TLS")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per check [3]")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = p.parse_args(argv)
    try:
        from chatvla.server.settings import SettingsError, load_settings
    except ImportError as e:  # an image without the server extra
        print(f"healthcheck: chatvla server settings unavailable: {e}", file=sys.stderr)
        return 1
    try:
        s = load_settings()
    except SettingsError as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    if s.tls or args.http:
        ok, detail = check_http(local_address(s.http_host), s.http_port, s.tls, args.timeout)
    else:
        ok, detail = check_grpc(local_address(s.host), s.grpc_port, args.timeout)
    if not ok or not args.quiet:
        print(detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
