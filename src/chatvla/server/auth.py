"""Bearer-token authentication for both transports.

The server never stores tokens, only their SHA-256 (a token file leaking does not leak access), and
each hash names the robot it belongs to, so logs and sessions know who is calling. Tokens are long
random strings, so an unsalted fast hash is enough (no dictionary to attack). A token file is lines
of `robot_name sha256:<hex>`; `#` starts a comment. Make a line with:

    python -m chatvla.server.auth panda-01            # prints a new token and the file line
    printf %s "$TOKEN" | python -m chatvla.server.auth panda-01 --stdin   # hash an existing token

gRPC health checks stay open (load balancers and kubelets probe without credentials), as do the
HTTP liveness/readiness probes and the static debug page; everything else needs a valid token.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from chatvla.wire.vocabulary import AUTHORIZATION_KEY, BEARER_SCHEME

TOKEN_PREFIX = "sha256:"
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the line."""


def hash_token(token: str) -> str:
    return TOKEN_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    """Robot name per token hash."""

    entries: tuple[tuple[str, str], ...]  # (robot, "sha256:<hex>")

    @classmethod
    def from_file(cls, path: str | Path) -> TokenStore:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise TokenFileError(f"{path}: {e}") from None
        return cls.parse(text.splitlines(), str(path))

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "tokens") -> TokenStore:
        entries: list[tuple[str, str]] = []
        seen: set[str] = set()
        for n, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].startswith(TOKEN_PREFIX):
                raise TokenFileError(f"{source}:{n}: expected 'robot_name sha256:<hex>'")
            robot, digest = parts
            hexpart = digest[len(TOKEN_PREFIX):]
            if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
                raise TokenFileError(f"{source}:{n}: the hash must be 64 lowercase hex digits")
            if digest in seen:
                raise TokenFileError(f"{source}:{n}: the same token hash appears twice")
            seen.add(digest)
            entries.append((robot, digest))
        if not entries:
            raise TokenFileError(f"{source}: no tokens; an empty file would lock every robot out")
        return cls(tuple(entries))

    def robot_for(self, token: str | None) -> str | None:
        """The robot a token belongs to, or None. Compares against every entry in constant time."""
        if not token:
            return None
        digest = hash_token(token)
        found = None
        for robot, h in self.entries:
            if hmac.compare_digest(h, digest):
                found = robot
        return found


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == BEARER_SCHEME.lower() else None


def metadata_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION_KEY:
            return bearer(value.decode() if isinstance(value, bytes) else value)
    return None


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses any RPC without a valid bearer token (except health checks) with UNAUTHENTICATED."""

    def __init__(self, store: TokenStore, on_reject: Callable[[], None] | None = None) -> None:
        self.store = store
        self._on_reject = on_reject or (lambda: None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        if self.store.robot_for(metadata_token(details.invocation_metadata)) is not None:
            return handler
        self._on_reject()
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m chatvla.server.auth", description="Make a token-file line for a robot."
    )
    ap.add_argument("robot", help="the robot's name (shown in logs and sessions)")
    ap.add_argument("--stdin", action="store_true", help="hash the token read from stdin instead of making one")
    args = ap.parse_args(argv)
    if any(c.isspace() for c in args.robot) or not args.robot:
        ap.error("robot names cannot contain whitespace")
    if args.stdin:
        token = sys.stdin.read().strip()
        if not token:
            ap.error("no token on stdin")
    else:
        token = secrets.token_urlsafe(32)
        print(f"token (give this to the robot, keep it secret): {token}", file=sys.stderr)
    print(f"{args.robot} {hash_token(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
