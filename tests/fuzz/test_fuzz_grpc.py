"""Raw-bytes fuzzing of every Policy method against an in-process server (NullEngine).

Valid serialized requests are mutated (bytes flipped, truncated, inserted; some messages entirely random)
and sent with a generic channel method that passes bytes through. Every answer must be a clean status
(OK, INVALID_ARGUMENT, or another deliberate code), never UNKNOWN or INTERNAL, with bounded details; a
Stream answers every message exactly once and carries on; the server keeps serving throughout.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest
from fuzzkit import EXAMPLES, MAX_ERROR_BYTES, SEED, mutate
from serverkit import PROFILE, infer_request, obs_req, start

from chatvla.fuzzing import Target, hostile_infer, hostile_start
from chatvla.server.transports.grpc_service import POLICY_SERVICE
from chatvla.v1 import policy_pb2 as pb

BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
BAD_STREAM_CODES = {pb.INTERNAL, pb.ERROR_CODE_UNSPECIFIED}
TIMEOUT_S = 20.0


@pytest.fixture(autouse=True)
def _no_error_logs(caplog):
    """No traceback per bad request: malformed input is at most a counted warning line."""
    yield
    errors = [r for r in caplog.records if r.levelno >= 40 or r.exc_info]
    assert not errors, [r.getMessage()[:200] for r in errors[:3]]


def method(name: str) -> str:
    return f"/{POLICY_SERVICE}/{name}"


def assert_clean_status(code: grpc.StatusCode, details: str | None, sent: bytes) -> None:
    assert code not in BAD_CODES, f"{code} {details!r} for {sent[:64]!r}"
    assert len((details or "").encode()) <= MAX_ERROR_BYTES, len(details or "")


async def _unary(srv, name: str, make: Callable[[random.Random], bytes], salt: int) -> dict[grpc.StatusCode, int]:
    """EXAMPLES messages `make(rng)` sent to method `name`, each answer checked; the codes seen."""
    rng = random.Random(SEED * 1000 + salt)
    call = srv.channel.unary_unary(method(name), request_serializer=None, response_deserializer=None)
    seen: dict[grpc.StatusCode, int] = {}
    for _ in range(EXAMPLES):
        data = make(rng)
        try:
            await call(data, timeout=TIMEOUT_S)
            code, details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details()
        assert_clean_status(code, details, data)
        seen[code] = seen.get(code, 0) + 1
    return seen


async def test_infer_raw_bytes(serve):
    srv = await serve()
    seed = infer_request().SerializeToString()
    seen = await _unary(srv, "Infer", lambda rng: mutate(rng, seed), 1)
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT), seen  # the fuzzing reached the refusals
    assert (await srv.stub.Infer(infer_request())).chunk.actions.data  # still serving


async def test_infer_hostile_fields(serve):
    """Valid requests with one to three fields made hostile (chatvla.fuzzing: what benchmarks/hostile.py
    sends a server process): refused cleanly, or served."""
    srv = await serve()
    target = Target.for_profile(PROFILE)
    seen = await _unary(srv, "Infer", lambda rng: hostile_infer(rng, target).SerializeToString(), 5)
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT) and seen.get(grpc.StatusCode.OK), seen


async def test_stream_start_hostile_fields(serve):
    srv = await serve()
    rng, target = random.Random(SEED * 1000 + 6), Target.for_profile(PROFILE)
    for _ in range(EXAMPLES):
        call = srv.stub.Stream(timeout=TIMEOUT_S)
        await call.write(pb.StreamRequest(start=hostile_start(rng, target)))
        await call.done_writing()
        first = await call.read()
        kind = first.WhichOneof("msg")
        assert kind in ("session", "error"), first
        if kind == "error":
            assert first.error.code not in BAD_STREAM_CODES and first.error.field, first
            assert len(first.error.message.encode()) <= MAX_ERROR_BYTES
        assert_clean_status(await call.code(), await call.details(), b"")


async def test_get_model_info_raw_bytes(serve):
    srv = await serve()
    # The request message is empty: mutate an empty message carrying one unknown field.
    await _unary(srv, "GetModelInfo", lambda rng: mutate(rng, b"\x0a\x03abc"), 2)
    assert (await srv.stub.GetModelInfo(pb.GetModelInfoRequest())).model_id


async def _drain(call) -> list[pb.StreamResponse]:
    """Every response until the end of the call (its status is read separately: `call.code()`)."""
    out = []
    while True:
        try:
            msg = await asyncio.wait_for(call.read(), TIMEOUT_S)
        except grpc.aio.AioRpcError:  # read() raises at the end of a call with a non-OK status
            return out
        if msg is grpc.aio.EOF:
            return out
        out.append(pb.StreamResponse.FromString(msg))


async def test_stream_first_message_raw_bytes(serve):
    srv = await serve()
    rng = random.Random(SEED * 1000 + 3)
    seed = start().SerializeToString()
    opened = refused = 0
    for _ in range(EXAMPLES):
        data = mutate(rng, seed)
        call = srv.channel.stream_stream(method("Stream"), request_serializer=None, response_deserializer=None)(
            timeout=TIMEOUT_S
        )
        await call.write(data)
        await call.done_writing()
        responses = await _drain(call)
        code = await call.code()
        assert_clean_status(code, await call.details(), data)
        assert responses, f"no answer to {data[:64]!r}"
        first = responses[0]
        if first.WhichOneof("msg") == "session":
            opened += 1
            assert code == grpc.StatusCode.OK
        else:
            refused += 1
            assert first.WhichOneof("msg") == "error" and first.error.code not in BAD_STREAM_CODES, first
            assert first.error.field and code != grpc.StatusCode.OK
            assert len(first.error.message.encode()) <= MAX_ERROR_BYTES
    assert refused, "the fuzzing never reached a refusal"
    call, _ = await srv.open_stream()  # still serving
    await call.done_writing()


async def test_stream_mid_stream_raw_bytes(serve):
    srv = await serve()
    rng = random.Random(SEED * 1000 + 4)
    call = srv.channel.stream_stream(method("Stream"), request_serializer=None, response_deserializer=None)(
        timeout=max(60.0, EXAMPLES * 0.5)
    )
    await call.write(start().SerializeToString())
    first = pb.StreamResponse.FromString(await asyncio.wait_for(call.read(), TIMEOUT_S))
    assert first.WhichOneof("msg") == "session"
    kinds: dict[str, int] = {}
    for i in range(EXAMPLES):
        data = mutate(rng, obs_req(i + 1).SerializeToString())
        await call.write(data)
        # Strict alternation: every message is answered exactly once (a chunk or an in-band error).
        raw = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert raw is not grpc.aio.EOF, f"the stream ended after {data[:64]!r}: {await call.code()}"
        resp = pb.StreamResponse.FromString(raw)
        kind = resp.WhichOneof("msg")
        assert kind in ("chunk", "error"), resp
        if kind == "error":
            assert resp.error.code not in BAD_STREAM_CODES, (resp, data[:64])
            assert resp.error.field and len(resp.error.message.encode()) <= MAX_ERROR_BYTES
            kinds[resp.error.field] = kinds.get(resp.error.field, 0) + 1
        else:
            kinds["chunk"] = kinds.get("chunk", 0) + 1
    # The stream still works: a valid observation after all that gets its chunk.
    await call.write(obs_req(10**9).SerializeToString())
    resp = pb.StreamResponse.FromString(await asyncio.wait_for(call.read(), TIMEOUT_S))
    assert resp.WhichOneof("msg") == "chunk" and resp.chunk.seq == 10**9, resp
    await call.done_writing()
    assert await _drain(call) == []
    assert await call.code() == grpc.StatusCode.OK
    assert kinds.get("msg"), kinds  # malformed messages were among them
