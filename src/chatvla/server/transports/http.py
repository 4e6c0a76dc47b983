"""HTTP transport (FastAPI + uvicorn on its own port): probes, metrics, model info, stateless infer
and a self-contained debug page (with its favicon and the rendered sample scene it can offer).

It shares the scheduler with gRPC, so an HTTP request is batched with robot traffic and obeys the
same admission limits. Request bodies are read with a size cap before any parsing; the JSON or
multipart body is parsed and validated by the scheduler only once the request is admitted (as every
transport's observations are), so a refused request costs no parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from chatvla.server.auth import bearer
from chatvla.server.errors import HTTP_STATUS, Code, ServeError
from chatvla.server.info import model_json
from chatvla.server.log_rate import limit_per_request_warnings
from chatvla.server.messages import ChunkResult
from chatvla.server.sample_scene import SampleScenes, SampleUnavailable
from chatvla.server.state import ServerState
from chatvla.server.transports.answered_guard import AnsweredGuard
from chatvla.server.validation import MAX_DEADLINE_MS, infer_from_form, infer_from_json
from chatvla.wire.vocabulary import AUTHORIZATION_KEY, TRANSPORT_HTTP

TRANSPORT = TRANSPORT_HTTP

# The /v1/infer body as JSON Schema, for the OpenAPI document (`create_app(state).openapi()`; the server
# does not serve it) and for the live fuzz tests, which derive their malformed bodies from it. The
# handler parses the raw body itself (a size cap before parsing, decoding in the pool), so FastAPI
# cannot infer this; validation.infer_from_json/_form are the authority and tests check the keys agree.
_SCALARS: dict[str, Any] = {
    "instruction": {"type": "string", "minLength": 1, "description": "plain text, no chat-template tokens"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    "deadline_ms": {"type": "integer", "minimum": 0, "maximum": MAX_DEADLINE_MS},
    "tick": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    "reasoning": {"type": "string", "description": "supplied reasoning to pre-fill instead of decoding"},
}
INFER_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["images", "state", "instruction"],
    "properties": {
        "images": {"type": "object", "description": "camera name -> base64 PNG/JPEG (the profile's cameras)",
                   "additionalProperties": {"type": "string", "contentEncoding": "base64"}},
        "state": {"type": "array", "items": {"type": "number"}, "description": "robot units, state_dim values"},
        **_SCALARS,
    },
}
INFER_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["state", "instruction"],
    "description": "one file part per camera (part name = camera), text parts for the rest",
    "properties": {"state": {"type": "string", "description": "a JSON list or comma/space separated numbers"},
                   **_SCALARS},
    "additionalProperties": {"type": "string", "format": "binary"},
}
_INFER_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": INFER_JSON_SCHEMA},
    "multipart/form-data": {"schema": INFER_FORM_SCHEMA},
}}}


# A 16x16 icon (a robot-arm glyph in the page's blue), served at /favicon.ico so browsers get no 404.
FAVICON_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1f6feb"/>'
    b'<path d="M4 13h8M6 13l1-5 4-3M11 5l2 2" stroke="#fff" stroke-width="1.6" fill="none" stroke-linecap="round"/>'
    b"</svg>"
)


def error_response(e: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.code is Code.RESOURCE_EXHAUSTED else None
    if e.code is Code.UNAUTHENTICATED:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(
        {"error": {"code": e.code.name, "field": e.field, "message": e.message}},
        status_code=HTTP_STATUS[e.code], headers=headers,
    )


def chunk_json(r: ChunkResult, action_names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "seq": r.seq, "tick": r.tick, "actions": r.actions.tolist(), "action_names": list(action_names),
        "reasoning": r.reasoning, "reasoning_refreshed": r.reasoning_refreshed,
        "reasoning_tokens": r.reasoning_tokens, "reasoning_seq": r.reasoning_seq,
        "reasoning_age_ms": r.reasoning_age_ms, "timing": r.timings.to_dict(),
    }


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ServeError(Code.INVALID_ARGUMENT, f"request body exceeds {limit} bytes", "body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went away mid-body (it declared more than it sent): a bad request, not a server
        # fault. Unhandled, this is a traceback per request in the log ("Exception in ASGI application").
        raise ServeError(Code.INVALID_ARGUMENT, "the client disconnected before the body was complete",
                         "body") from None
    return b"".join(chunks)


async def _form(request: Request, body: bytes, state: ServerState) -> tuple[dict[str, str], dict[str, bytes]]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    limits = state.limits
    try:
        form = await Request(request.scope, replay).form(
            max_files=limits.max_images, max_fields=16, max_part_size=64 * 1024
        )
    except Exception as e:  # starlette raises its own error types for malformed multipart
        raise ServeError(Code.INVALID_ARGUMENT, f"malformed multipart body: {e}", "body") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in files:
                    raise ServeError(Code.INVALID_ARGUMENT, "camera sent twice", f"images[{key[:64]}]")
                files[key] = await value.read(limits.max_image_bytes + 1)
            else:
                fields[key] = str(value)
    finally:
        await form.close()
    return fields, files


def create_app(state: ServerState) -> FastAPI:
    """The HTTP API. Auth (when configured) guards everything but probes and the static page."""
    app = FastAPI(title="chatvla-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, e: ServeError) -> JSONResponse:
        return error_response(e)

    def authenticated(request: Request) -> str | None:
        if state.tokens is None:
            return None
        robot = state.robot_for(bearer(request.headers.get(AUTHORIZATION_KEY)))
        if robot is None:
            err = ServeError(Code.UNAUTHENTICATED, "missing or invalid bearer token")
            state.refuse(None, err)
            raise err
        return robot

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"ready": True})
        reason = "draining" if state.draining else "loading"
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/metrics", dependencies=[Depends(authenticated)])
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", dependencies=[Depends(authenticated)])
    async def model() -> JSONResponse:
        if state.model_info is None or state.pipeline is None:
            raise ServeError(Code.UNAVAILABLE, "model is loading")
        return JSONResponse(model_json(state.model_info, state.pipeline.spec.profile, state.model_card))

    @app.post("/v1/infer", dependencies=[Depends(authenticated)], openapi_extra=_INFER_OPENAPI)
    async def infer(request: Request) -> JSONResponse:
        try:
            pipeline = state.require()
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await _read_body(request, state.limits.max_message_bytes)
            spec = pipeline.spec
            if ctype == "multipart/form-data":
                fields, files = await _form(request, body, state)

                def decode() -> Any:
                    return infer_from_form(fields, files, spec)
            elif ctype in ("application/json", ""):

                def decode() -> Any:
                    try:
                        parsed = json.loads(body)
                    except RecursionError:  # `[` x 100000: nested deeper than the parser goes
                        raise ServeError(Code.INVALID_ARGUMENT, "JSON nested too deeply", "body") from None
                    except (ValueError, UnicodeDecodeError) as e:
                        raise ServeError(Code.INVALID_ARGUMENT, f"not valid JSON: {e}", "body") from None
                    return infer_from_json(parsed, spec)
            else:
                raise ServeError(
                    Code.INVALID_ARGUMENT, "send application/json or multipart/form-data", "content-type"
                )
        except ServeError as e:
            state.refuse(TRANSPORT, e)
            raise
        result = await pipeline.infer(decode, TRANSPORT)
        return JSONResponse(chunk_json(result, spec.profile.action_names))

    page = resources.files("chatvla.server.transports").joinpath("debug_page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def debug_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        # Browsers ask for it unprompted; a 404 there is a console error on every page load.
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    samples: dict[str, SampleScenes] = {}

    @app.get("/debug/sample", dependencies=[Depends(authenticated)])
    async def debug_sample(camera: str | None = None) -> Response:
        """Without `camera`: whether a sample can be rendered (cheap, renders nothing). With it: the
        PNG of that camera, rendered once per server on first request (chatvla.server.sample_scene)."""
        profile = state.require().spec.profile
        sample = samples.get(profile.name)
        if sample is None:
            sample = samples[profile.name] = SampleScenes(profile.name)
        if camera is None:
            available, reason = sample.probe()
            return JSONResponse({"available": available, "reason": reason, "cameras": list(profile.camera_names)})
        if camera not in profile.camera_names:
            raise ServeError(Code.INVALID_ARGUMENT,
                             f"not a camera of profile {profile.name}; expected one of {list(profile.camera_names)}",
                             "camera")
        try:
            png = await sample.png(camera)
        except SampleUnavailable as e:
            return JSONResponse({"error": {"code": "NOT_FOUND", "field": "",
                                           "message": f"no rendered sample scene on this server: {e}"[:512]}},
                                status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    return app


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our event loop: the app owns the signals (SIGTERM means *drain*, not exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class HttpServer:
    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def start_http(
    state: ServerState, host: str, port: int, *, tls: tuple[Path, Path] | None = None, drain_s: float = 30.0
) -> HttpServer:
    """Bind (port 0 = OS picks) and serve until `stop()`. `tls` is (certificate, key) paths."""
    sock = _bind(host, port)
    limit_per_request_warnings()  # uvicorn and python-multipart warn once per malformed request
    config = uvicorn.Config(
        AnsweredGuard(create_app(state)), lifespan="off", access_log=False, log_level="warning",
        timeout_graceful_shutdown=max(1, int(drain_s)),
        ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None,
    )
    server = _EmbeddedUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
    while not server.started:
        if task.done():
            task.result()  # re-raise the start-up failure
            raise RuntimeError("HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    return HttpServer(server=server, task=task, port=sock.getsockname()[1])
