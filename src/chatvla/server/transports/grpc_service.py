"""gRPC transport: the `chatvla.v1.Policy` servicer plus health and reflection, on grpc.aio.

A Stream is served by two coroutines: a reader that feeds observations to the pipeline in arrival
order, and the response generator that writes whatever the pipeline emits for the session. They
are decoupled by a queue so a slow observation never stops the reader from seeing the next one
(which is what lets a newer observation supersede a queued older one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chatvla.server.auth import GrpcAuthInterceptor, metadata_token
from chatvla.server.errors import (
    FIELD_METADATA_KEY,
    GRPC_STATUS,
    STREAM_CODE,
    Code,
    ServeError,
    metadata_field,
)
from chatvla.server.info import chunk_proto, reasoning_proto
from chatvla.server.messages import ChunkResult
from chatvla.server.state import ServerState
from chatvla.server.validation import infer_from_proto, observation_from_proto, session_from_proto
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire.vocabulary import TRANSPORT_GRPC_INFER, TRANSPORT_GRPC_MODEL_INFO, TRANSPORT_GRPC_STREAM

log = logging.getLogger("chatvla.server.grpc")

POLICY_SERVICE = pb.DESCRIPTOR.services_by_name["Policy"].full_name


class _Malformed:
    """What our request deserializer returns for bytes that are not the method's request message.

    gRPC's own deserializer failure is answered UNKNOWN with a traceback logged per request (a
    log-flooding vector) and, mid-stream, silently ends the stream; parsing ourselves lets every
    handler answer INVALID_ARGUMENT (in-band on a Stream, which then carries on)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


_malformed_count = 0


def _note_malformed(method: str, error: str) -> None:
    """One warning line (no traceback) for the first and then every 1000th malformed message."""
    global _malformed_count
    _malformed_count += 1
    if _malformed_count == 1 or _malformed_count % 1000 == 0:
        log.warning("malformed %s request (%d so far): %s", method, _malformed_count, error[:200])


def _deserializer(message_cls: type, method: str):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # DecodeError, invalid UTF-8 in a string field, recursion limit, ...
            _note_malformed(method, f"{type(e).__name__}: {e}")
            return _Malformed(f"{type(e).__name__}")

    return parse


def _malformed_error(what: str, field: str) -> ServeError:
    return ServeError(
        Code.INVALID_ARGUMENT, f"malformed protobuf: the bytes are not a valid {what}", field, reason="malformed"
    )


@dataclass(frozen=True)
class _End:
    """Sentinel on a stream's queue: finish the RPC, with an error status if `error` is set."""

    error: ServeError | None = None


def _stream_error(seq: int, e: ServeError) -> pb.StreamResponse:
    return pb.StreamResponse(error=pb.StreamError(seq=seq, code=STREAM_CODE[e.code], message=e.message, field=e.field))


def _trailers(e: ServeError) -> tuple[tuple[str, str], ...]:
    return ((FIELD_METADATA_KEY, metadata_field(e.field)),)


class PolicyServicer(pb_grpc.PolicyServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._streams: dict[str, asyncio.Queue] = {}

    def end_streams(self, error: ServeError) -> None:
        """Finish every open Stream (after draining) with `error` as status so robots reconnect."""
        for q in list(self._streams.values()):
            q.put_nowait(_End(error))

    def _robot(self, context: grpc.aio.ServicerContext, fallback: str) -> str:
        return self.state.robot_for(metadata_token(context.invocation_metadata())) or fallback

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if isinstance(request, _Malformed):
            e = _malformed_error("GetModelInfoRequest", "request")
            self.state.refuse(TRANSPORT_GRPC_MODEL_INFO, e)
            await context.abort(GRPC_STATUS[e.code], str(e), trailing_metadata=_trailers(e))
        if self.state.model_info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is loading")
        return self.state.model_info

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        try:
            pipeline = self.state.require()
        except ServeError as e:
            self.state.refuse(TRANSPORT_GRPC_INFER, e)
            await context.abort(GRPC_STATUS[e.code], str(e))
        if isinstance(request, _Malformed):
            e = _malformed_error("InferRequest", "request")
            self.state.refuse(TRANSPORT_GRPC_INFER, e)
            await context.abort(GRPC_STATUS[e.code], str(e), trailing_metadata=_trailers(e))
        spec = pipeline.spec
        try:
            result = await pipeline.infer(
                lambda: infer_from_proto(request, spec), TRANSPORT_GRPC_INFER, deadline_s=context.time_remaining()
            )
        except ServeError as e:
            await context.abort(GRPC_STATUS[e.code], str(e), trailing_metadata=_trailers(e))
        return pb.InferResponse(chunk=chunk_proto(result))

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        out: asyncio.Queue = asyncio.Queue()
        try:
            pipeline = self.state.require()
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            if isinstance(first, _Malformed):
                raise _malformed_error("StreamRequest", "start")
            if first.WhichOneof("msg") != "start":
                raise ServeError(Code.INVALID_ARGUMENT, "the first message of a Stream must be a SessionStart", "start")
            config = session_from_proto(first.start, pipeline.spec, self.state.reasoning)
            session = pipeline.open_session(
                config, lambda seq, r: out.put_nowait((seq, r)), self._robot(context, config.robot_id),
                TRANSPORT_GRPC_STREAM,
            )
        except ServeError as e:
            # The stream cannot start: say why in-band (clients read one place) and in the status.
            self.state.refuse(None, e)  # the session was refused; no observation was
            yield _stream_error(0, e)
            context.set_code(GRPC_STATUS[e.code])
            context.set_details(str(e))
            context.set_trailing_metadata(_trailers(e))
            return
        self._streams[session.id] = out
        yield pb.StreamResponse(session=pb.SessionInfo(
            session_id=session.id, model=self.state.model_info, reasoning=reasoning_proto(config.reasoning),
            max_in_flight=session.max_in_flight,
        ))
        reader = asyncio.create_task(self._read(request_iterator, session, pipeline, out))
        try:
            while True:
                item = await out.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        context.set_code(GRPC_STATUS[item.error.code])
                        context.set_details(item.error.message)
                    return
                seq, result = item
                if isinstance(result, ChunkResult):
                    yield pb.StreamResponse(chunk=chunk_proto(result))
                else:
                    yield _stream_error(seq, result)
        finally:
            reader.cancel()
            self._streams.pop(session.id, None)
            pipeline.close_session(session)

    async def _read(self, request_iterator: AsyncIterator[pb.StreamRequest], session, pipeline, out) -> None:
        spec = pipeline.spec
        try:
            async for req in request_iterator:
                if isinstance(req, _Malformed):
                    # Answered in-band with seq 0 (the seq is unreadable); the stream carries on.
                    err = _malformed_error("StreamRequest", "msg")
                    self.state.refuse(TRANSPORT_GRPC_STREAM, err)
                    out.put_nowait((0, err))
                    continue
                kind = req.WhichOneof("msg")
                if kind == "observation":
                    obs = req.observation
                    await pipeline.submit(
                        session, obs.seq,
                        lambda instr, obs=obs: observation_from_proto(obs, spec, session.config.cameras, instr),
                    )
                else:
                    err = ServeError(
                        Code.INVALID_ARGUMENT,
                        "session already started" if kind == "start" else "empty StreamRequest",
                        "start" if kind == "start" else "msg",
                    )
                    self.state.refuse(TRANSPORT_GRPC_STREAM, err)
                    out.put_nowait((0, err))
            await session.wait_idle()  # the client half-closed: answer what it sent, then finish
            out.put_nowait(_End())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away or sent something gRPC could not read
            log.info("stream of session %s ended: %s", session.id, e)
            out.put_nowait(_End())


def _add_policy(servicer: PolicyServicer, server: grpc.aio.Server) -> None:
    """`pb_grpc.add_PolicyServicer_to_server`, but with our tolerant request deserializers."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream,
            request_deserializer=_deserializer(pb.StreamRequest, "Stream"),
            response_serializer=pb.StreamResponse.SerializeToString,
        ),
        "Infer": grpc.unary_unary_rpc_method_handler(
            servicer.Infer,
            request_deserializer=_deserializer(pb.InferRequest, "Infer"),
            response_serializer=pb.InferResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=_deserializer(pb.GetModelInfoRequest, "GetModelInfo"),
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
    }
    service = POLICY_SERVICE
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class _HealthReporter:
    """Mirrors readiness into grpc.health.v1 for the server as a whole and for the Policy service."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self.servicer = servicer

    async def __call__(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", POLICY_SERVICE):
            await self.servicer.set(name, status)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    servicer: PolicyServicer
    port: int


async def start_grpc(
    state: ServerState, host: str, port: int, *, tls: tuple[bytes, bytes] | None = None
) -> GrpcServer:
    """Bind and start; `tls` is (private key PEM, certificate chain PEM)."""
    limit = state.limits.max_message_bytes
    interceptors = []
    if state.tokens is not None:
        refused = ServeError(Code.UNAUTHENTICATED, "missing or invalid bearer token")
        interceptors.append(GrpcAuthInterceptor(state.tokens, on_reject=lambda: state.refuse(None, refused)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
    )
    servicer = PolicyServicer(state)
    _add_policy(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reporter = _HealthReporter(health_servicer)
    await reporter(False)
    state.on_readiness(reporter)
    reflection.enable_server_reflection(
        (POLICY_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind gRPC to {address}")
    await server.start()
    return GrpcServer(server=server, servicer=servicer, port=bound)
