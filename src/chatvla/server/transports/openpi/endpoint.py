"""The openpi websocket endpoint: the handshake (probes, readiness, Api-Key), one pipeline session per
connection, metadata first, then strict alternation of observation and answer. An error answers the
frame that caused it with one text frame (what openpi-client raises as RuntimeError) and the connection
keeps serving: openpi-client never reconnects, so closing on a bad frame would end the robot's run. Only
protocol breakage closes (a flood of text frames, an oversize frame, a server bug). The package
docstring describes the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import ssl
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

import chatvla
from chatvla.engines.base import EngineInfo
from chatvla.server.errors import Code, ServeError
from chatvla.server.log_rate import limit_refused_handshake_crashes
from chatvla.server.messages import ChunkResult, SessionConfig, ValidatedObservation
from chatvla.server.state import ServerState
from chatvla.server.transports.openpi.codec import pack_message, unpack_message
from chatvla.server.transports.openpi.mappings import PRESETS, MappingError, OpenpiMapping, apply_mapping, load_mapping
from chatvla.server.validation import InputSpec
from chatvla.wire.vocabulary import (
    API_KEY_SCHEME,
    AUTHORIZATION_KEY,
    BEARER_SCHEME,
    OPENPI_ACTION_SPACE_KEY,
    OPENPI_ACTION_UNITS_KEY,
    OPENPI_ACTIONS_KEY,
    OPENPI_POLICY_TIMING_KEY,
    OPENPI_REASONING_KEY,
    OPENPI_REASONING_REFRESHED_KEY,
    OPENPI_SERVER_TIMING_KEY,
    TIMING_COUNT_FIELDS,
    TIMING_MS_FIELDS,
    TRANSPORT_OPENPI,
    openpi_error_text,
)

log = logging.getLogger("chatvla.server.openpi")

TRANSPORT = TRANSPORT_OPENPI
ERROR_CLOSE_REASON = "Internal server error. Error message included in previous frame."
REASONING_KEY = OPENPI_REASONING_KEY
# Text frames in a row (no observation between them) that are each answered with an error; one more
# closes the connection with 1003: a peer that only sends text is not an openpi client.
MAX_TEXT_FRAMES = 3
TEXT_FLOOD_CLOSE_REASON = "expected binary msgpack frames"
# The body of a refused handshake, at most: websockets' own refusals quote a bad header whole.
MAX_REFUSAL_BODY = 512


def observation_from_openpi(
    data: bytes, mapping: OpenpiMapping, spec: InputSpec, seq: int, session_instruction: str
) -> ValidatedObservation:
    """Validate one openpi observation frame and map it to our observation (runs in the pool)."""
    return apply_mapping(unpack_message(data, spec.limits), mapping, spec, seq, session_instruction)


# --- responses --------------------------------------------------------------------------------------------------
def response_message(r: ChunkResult, prev_total_ms: float | None, actions: np.ndarray | None = None) -> dict[str, Any]:
    """One reply map; `actions` replaces the chunk when the mapping converts it (e.g. DROID velocities)."""
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
        OPENPI_ACTIONS_KEY: np.ascontiguousarray(r.actions if actions is None else actions, dtype=np.float32),
        OPENPI_POLICY_TIMING_KEY: {"infer_ms": float(compute)},
        OPENPI_SERVER_TIMING_KEY: server_timing,
        OPENPI_REASONING_KEY: r.reasoning,
        OPENPI_REASONING_REFRESHED_KEY: bool(r.reasoning_refreshed),
    }


def error_text(e: ServeError) -> str:
    """The error frame's text, `CODE: [field: ]message` (wire.vocabulary.openpi_error_text)."""
    return openpi_error_text(e.code.name, str(e))


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

    def __init__(self, state: ServerState, mapping_spec: str | None, default_prompt: str | None = None) -> None:
        self.state = state
        self.mapping_spec = mapping_spec
        self.default_prompt = default_prompt
        self.mapping: OpenpiMapping | None = None
        self.metadata: dict[str, Any] = {}
        # connection -> robot name from its token, from the handshake until the handler takes it
        self._robots: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        self._connections: set[ServerConnection] = set()

    def bind(self, info: EngineInfo) -> None:
        """Resolve the key mapping for the model's profile (raises MappingError) and build the metadata."""
        mapping = load_mapping(self.mapping_spec, info.profile)
        if self.default_prompt is not None:  # the `openpi_default_prompt` setting outranks the mapping's
            mapping = replace(mapping, default_prompt=self.default_prompt)
        p = info.profile
        out = mapping.actions.describe(p)  # what `actions` holds for this mapping, not the model's chunk
        self.metadata = {
            "server": "chatvla-serve",
            "server_version": chatvla.__version__,
            "model_id": info.model_id,
            "engine": info.engine,
            "robot_profile": p.name,
            "action_horizon": out["horizon"],
            "action_dim": len(out["names"]),
            "action_names": out["names"],
            OPENPI_ACTION_SPACE_KEY: out["space"],
            OPENPI_ACTION_UNITS_KEY: out["units"],
            "state_dim": p.state_dim,
            "control_rate_hz": out["rate_hz"],
            "cameras": list(p.camera_names),
            "mapping": mapping.describe(),
            "reasoning_key": REASONING_KEY,
            **dict(mapping.metadata),
        }
        self.mapping = mapping
        log.info("openpi endpoint: mapping %s for profile %s", mapping.name, p.name)

    # The opening handshake: probes, readiness and auth, before any websocket exists.
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        # The path as sent, without its query. Not urlsplit: it reads `//[` as a network location with a
        # broken IPv6 address and raises, which websockets answers 500 with a traceback logged.
        path = request.path.partition("?")[0]
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

    @staticmethod
    def process_response(connection: ServerConnection, request: Request, response: Response) -> Response | None:
        """Cap the body of a refused handshake. websockets words its own refusals (a malformed
        Sec-WebSocket-* header) with the header quoted whole, and no refusal may echo unbounded input
        (docs/security.md; found by benchmarks/hostile.py: 1.1 KB for a 1 KB Sec-WebSocket-Protocol)."""
        if response.status_code == 101 or len(response.body) <= MAX_REFUSAL_BODY:
            return None
        body = bytes(response.body[: MAX_REFUSAL_BODY - 4]).decode("utf-8", "ignore").encode() + b"...\n"
        headers = response.headers.copy()
        del headers["Content-Length"]
        headers["Content-Length"] = str(len(body))
        return replace(response, headers=headers, body=body)

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
            states: dict[int, np.ndarray] = {}  # seq -> the observed state, for action conversions
            seq = 0
            text_frames = 0
            prev_total_ms: float | None = None
            while True:
                message = await ws.recv()
                t0 = time.monotonic()
                if isinstance(message, str):
                    text_frames += 1
                    if text_frames > MAX_TEXT_FRAMES:
                        await ws.close(CloseCode.UNSUPPORTED_DATA, TEXT_FLOOD_CLOSE_REASON)
                        return
                    e = ServeError(Code.INVALID_ARGUMENT, "expected a binary msgpack frame, got text", "message")
                    self.state.refuse(TRANSPORT, e)
                    await ws.send(error_text(e))
                    continue
                text_frames = 0
                seq += 1
                try:
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
                        lambda instr, m=message, n=seq: self._decode(m, mapping, spec, n, instr, states),
                    )
                except ServeError as e:  # refused before the pipeline saw the observation
                    self.state.refuse(TRANSPORT, e)
                    await ws.send(error_text(e))
                    continue
                while True:  # strict alternation: exactly one observation of this session is in flight
                    answered, result = await replies.get()
                    if answered == seq:
                        break
                state = states.pop(seq, None)
                if isinstance(result, ServeError):  # the pipeline has counted it
                    await ws.send(error_text(result))
                    continue
                actions = None if state is None else mapping.actions.convert(result.actions, state, spec.profile)
                await ws.send(pack_message(response_message(result, prev_total_ms, actions)))
                prev_total_ms = (time.monotonic() - t0) * 1e3
        except ConnectionClosed:
            pass
        except Exception as e:  # a bug of ours: the connection's state is unknown, so it ends here
            log.exception("openpi connection from %s failed", ws.remote_address)
            await self._fail(ws, openpi_error_text(Code.INTERNAL.name, f"{type(e).__name__}: {e}"))
        finally:
            self._connections.discard(ws)
            if session is not None and pipeline is not None:
                pipeline.close_session(session)

    @staticmethod
    def _decode(
        data: bytes, mapping: OpenpiMapping, spec: InputSpec, seq: int, instruction: str,
        states: dict[int, np.ndarray],
    ) -> ValidatedObservation:
        """Decode in the pool and keep the observed state: DROID velocities start from it."""
        req = observation_from_openpi(data, mapping, spec, seq, instruction)
        states[seq] = req.obs.state
        return req

    @staticmethod
    async def _fail(ws: ServerConnection, text: str) -> None:
        """A server bug: the message as one text frame, then close with 1011 (openpi's own convention)."""
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
    state: ServerState, host: str, port: int, *, mapping: str | None = None, tls: tuple[Path, Path] | None = None,
    default_prompt: str | None = None,
) -> OpenpiServer:
    """Bind (port 0 = OS picks) and serve until `stop()`. `tls` is (certificate, key) paths (wss://).
    A mapping *file* is read here so a typo fails start-up at once; it is checked against the model's
    profile in `bind`, once the engine is known. `default_prompt` (None: the mapping's) is the
    instruction until a connection's first `prompt` arrives."""
    if mapping is not None and mapping not in PRESETS and not Path(mapping).is_file():
        raise MappingError(f"openpi mapping {mapping!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    endpoint = OpenpiEndpoint(state, mapping, default_prompt)
    limit_refused_handshake_crashes()  # a websockets bug a client can trigger at will: counted, no traceback
    ssl_ctx = None
    if tls is not None:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    server = await serve(
        endpoint.handler, host, port, process_request=endpoint.process_request,
        process_response=endpoint.process_response,
        compression=None, max_size=state.limits.max_message_bytes, server_header="chatvla-serve",
        ssl=ssl_ctx,
    )
    sock = next(iter(server.sockets))
    return OpenpiServer(server=server, endpoint=endpoint, port=sock.getsockname()[1])
