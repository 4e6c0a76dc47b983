"""The openpi websocket endpoint: the handshake (probes, readiness, Api-Key), one pipeline session per
connection, metadata first, then strict alternation of observation and answer; errors as openpi reports
them (one text frame, then close 1011). The package docstring describes the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import ssl
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

import chatvla
from chatvla.engines.base import EngineInfo
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, ObservationRequest, SessionConfig
from chatvla.server.state import ServerState
from chatvla.server.transports.openpi.codec import pack_message, unpack_message
from chatvla.server.transports.openpi.mappings import PRESETS, MappingError, OpenpiMapping, apply_mapping, load_mapping
from chatvla.server.validation import InputSpec
from chatvla.wire.vocabulary import (
    API_KEY_SCHEME,
    AUTHORIZATION_KEY,
    BEARER_SCHEME,
    TIMING_COUNT_FIELDS,
    TIMING_MS_FIELDS,
)

log = logging.getLogger("chatvla.server.openpi")

TRANSPORT = "openpi_ws"
ERROR_CLOSE_REASON = "Internal server error. Error message included in previous frame."
REASONING_KEY = "reasoning"


def observation_from_openpi(
    data: bytes, mapping: OpenpiMapping, spec: InputSpec, seq: int, session_instruction: str
) -> ObservationRequest:
    """Validate one openpi observation frame and map it to our observation (runs in the pool)."""
    return apply_mapping(unpack_message(data, spec.limits), mapping, spec, seq, session_instruction)


# --- responses --------------------------------------------------------------------------------------------------
def response_message(r: ChunkResult, prev_total_ms: float | None) -> dict[str, Any]:
    t = r.timings
    compute = t.preprocess_ms + t.reasoning_ms + t.expert_ms
    server_timing: dict[str, float] = {
        "infer_ms": float(t.total_ms),
        **{k: float(getattr(t, k)) for k in TIMING_MS_FIELDS},
        **{k: int(getattr(t, k)) for k in TIMING_COUNT_FIELDS},
    }
    if prev_total_ms is not None:
        server_timing["prev_total_ms"] = float(prev_total_ms)
    return {
        "actions": np.ascontiguousarray(r.actions, dtype=np.float32),
        "policy_timing": {"infer_ms": float(compute)},
        "server_timing": server_timing,
        REASONING_KEY: r.reasoning,
        "reasoning_refreshed": bool(r.reasoning_refreshed),
    }


def error_text(e: ServeError) -> str:
    return f"{e.code.name}: {e}"


# --- the server -----------------------------------------------------------------------------------------------
def api_key(headers: Headers) -> str | None:
    """The token of `Authorization: Api-Key <token>` (openpi-client); `Bearer <token>` is accepted too."""
    values = headers.get_all(AUTHORIZATION_KEY)
    if len(values) != 1:  # none, or ambiguous: two Authorization headers authenticate nobody
        return None
    value = values[0]
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() in (API_KEY_SCHEME.lower(), BEARER_SCHEME.lower()) else None


class OpenpiEndpoint:
    """Serves openpi's protocol on top of the shared pipeline."""

    def __init__(self, state: ServerState, mapping_spec: str | None) -> None:
        self.state = state
        self.mapping_spec = mapping_spec
        self.mapping: OpenpiMapping | None = None
        self.metadata: dict[str, Any] = {}
        # connection -> robot name from its token, from the handshake until the handler takes it
        self._robots: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        self._connections: set[ServerConnection] = set()

    def bind(self, info: EngineInfo) -> None:
        """Resolve the key mapping for the model's profile (raises MappingError) and build the metadata."""
        mapping = load_mapping(self.mapping_spec, info.profile)
        p = info.profile
        self.metadata = {
            "server": "chatvla-serve",
            "server_version": chatvla.__version__,
            "model_id": info.model_id,
            "engine": info.engine,
            "robot_profile": p.name,
            "action_horizon": p.chunk_size,
            "action_dim": p.action_dim,
            "action_names": list(p.action_names),
            "state_dim": p.state_dim,
            "control_rate_hz": p.control_rate_hz,
            "cameras": list(p.camera_names),
            "mapping": mapping.describe(),
            "reasoning_key": REASONING_KEY,
            **dict(mapping.metadata),
        }
        self.mapping = mapping
        log.info("openpi endpoint: mapping %s for profile %s", mapping.name, p.name)

    # The opening handshake: probes, readiness and auth, before any websocket exists.
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.state.tokens is not None:
            robot = self.state.robot_for(api_key(request.headers))
            if robot is None:
                self.state.refuse(TRANSPORT, ServeError(Code.UNAUTHENTICATED, "missing or invalid API key"))
                response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or invalid API key\n")
                response.headers["WWW-Authenticate"] = "Api-Key"
                return response
            self._robots[connection] = robot
        try:
            self.state.require()
            if self.mapping is None:
                raise ServeError(Code.UNAVAILABLE, "model is loading", reason="not_ready")
        except ServeError as e:
            self._robots.pop(connection, None)
            self.state.refuse(TRANSPORT, e)
            response = connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"{e.message}\n")
            response.headers["Retry-After"] = "1"
            return response
        return None

    async def handler(self, ws: ServerConnection) -> None:
        robot = self._robots.pop(ws, "")
        self._connections.add(ws)
        session = None
        pipeline = self.state.pipeline
        try:
            assert pipeline is not None and self.mapping is not None  # process_request checked both
            await ws.send(pack_message(self.metadata))
            mapping, spec = self.mapping, pipeline.spec
            replies: asyncio.Queue = asyncio.Queue()
            seq = 0
            prev_total_ms: float | None = None
            while True:
                message = await ws.recv()
                t0 = time.monotonic()
                seq += 1
                if isinstance(message, str):
                    raise ServeError(Code.INVALID_ARGUMENT, "expected a binary msgpack frame, got text", "message")
                if session is None:
                    pipeline = self.state.require()
                    session = pipeline.open_session(
                        SessionConfig(
                            cameras=mapping.required_cameras, instruction=mapping.default_prompt,
                            robot_id=robot, reasoning=self.state.reasoning,
                        ),
                        lambda s, r: replies.put_nowait((s, r)), robot, TRANSPORT,
                    )
                await pipeline.submit(
                    session, seq,
                    lambda instr, m=message, n=seq: observation_from_openpi(m, mapping, spec, n, instr),
                )
                while True:  # strict alternation: exactly one observation of this session is in flight
                    answered, result = await replies.get()
                    if answered == seq:
                        break
                if isinstance(result, ServeError):  # the pipeline has counted it
                    await self._fail(ws, error_text(result))
                    return
                await ws.send(pack_message(response_message(result, prev_total_ms)))
                prev_total_ms = (time.monotonic() - t0) * 1e3
        except ConnectionClosed:
            pass
        except ServeError as e:  # refused before the pipeline saw the observation
            if e.reason == "sessions_limit":  # the pipeline counted the rejection, not the request
                self.state.metrics.requests.labels(transport=TRANSPORT, outcome=e.outcome).inc()
            else:
                self.state.refuse(TRANSPORT, e)
            await self._fail(ws, error_text(e))
        except Exception as e:
            log.exception("openpi connection from %s failed", ws.remote_address)
            await self._fail(ws, f"INTERNAL: {type(e).__name__}: {e}")
        finally:
            self._connections.discard(ws)
            if session is not None and pipeline is not None:
                pipeline.close_session(session)

    @staticmethod
    async def _fail(ws: ServerConnection, text: str) -> None:
        """openpi's error convention: the message as one text frame, then close with 1011."""
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)
            await ws.close(CloseCode.INTERNAL_ERROR, ERROR_CLOSE_REASON)

    @property
    def connections(self) -> int:
        return len(self._connections)


@dataclass
class OpenpiServer:
    server: Server
    endpoint: OpenpiEndpoint
    port: int

    def bind(self, info: EngineInfo) -> None:
        self.endpoint.bind(info)

    async def stop(self) -> None:
        """Close the listener and every connection (1001, going away); robots reconnect elsewhere."""
        self.server.close(close_connections=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 10)


async def start_openpi(
    state: ServerState, host: str, port: int, *, mapping: str | None = None, tls: tuple[Path, Path] | None = None
) -> OpenpiServer:
    """Bind (port 0 = OS picks) and serve until `stop()`. `tls` is (certificate, key) paths (wss://).
    A mapping *file* is read here so a typo fails start-up at once; it is checked against the model's
    profile in `bind`, once the engine is known."""
    if mapping is not None and mapping not in PRESETS and not Path(mapping).is_file():
        raise MappingError(f"openpi mapping {mapping!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    endpoint = OpenpiEndpoint(state, mapping)
    ssl_ctx = None
    if tls is not None:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    server = await serve(
        endpoint.handler, host, port, process_request=endpoint.process_request,
        compression=None, max_size=state.limits.max_message_bytes, server_header="chatvla-serve",
        ssl=ssl_ctx,
    )
    sock = next(iter(server.sockets))
    return OpenpiServer(server=server, endpoint=endpoint, port=sock.getsockname()[1])
