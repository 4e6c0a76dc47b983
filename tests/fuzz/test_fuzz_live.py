"""Fuzzing the live sockets: the HTTP API (raw bytes on its TCP port, and bodies derived from its
OpenAPI schema) and the openpi websocket (random binary frames), against an in-process server.

The HTTP bodies come from the app's own OpenAPI document (`create_app(state).openapi()`: every path and
method, and /v1/infer's JSON and multipart body schemas): a valid body is built from the schema, then a
schema-directed mutation breaks it (a property dropped, given the wrong type or an extreme value of its
type, an unknown property, deep nesting), or the serialized bytes are mutated. Every answer must be
below 500, an error body at most 1 KiB (a JSON `error` that is never INTERNAL/UNKNOWN on /v1/infer);
every openpi frame is answered by a reply or a bounded, non-INTERNAL error text, and no connection is
closed with 1011; each server still serves a valid request afterwards. The generators are in
chatvla.fuzzing, shared with benchmarks/hostile.py (the same inputs, against a server process).

The budget is fuzzkit.EXAMPLES (small and seeded in CI: a few seconds; `make fuzz` raises it), with
fixed seeds (fuzzkit.SEED) like the gRPC raw-bytes fuzz.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest
from fuzzkit import EXAMPLES, MAX_ERROR_BYTES, SEED, mutate
from serverkit import PROFILE
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chatvla.fuzzing import (
    BAD_CODES,
    CONTENT_TYPES,
    Target,
    exchange,
    hostile_frame,
    http_request,
    http_status,
    multipart,
    mutate_object,
    openpi_observation,
    random_json,
    serialize,
    valid_value,
)
from chatvla.server.transports.http import create_app
from chatvla.server.transports.openpi.codec import pack_message
from chatvla.server.transports.openpi.mappings import preset
from chatvla.server.validation import _JSON_KEYS

TIMEOUT_S = 20.0
RAW_WAIT_S = 1.0  # how long a raw-socket exchange waits for an answer to a request that may be incomplete
RAW_CONCURRENCY = 16


@pytest.fixture(autouse=True)
def _no_error_logs(caplog):
    """No traceback per bad request: at most warning lines. uvicorn's loggers do not propagate to the
    root logger, and every uvicorn.Config re-applies uvicorn's logging config (which drops handlers
    added before), so a filter (kept by that config) on "uvicorn.error" collects what the ASGI server
    logs there: an exception escaping the app is "Exception in ASGI application"."""
    seen: list[logging.LogRecord] = []

    def collect(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(collect)
    try:
        yield
    finally:
        uvicorn_log.removeFilter(collect)
    errors = [r for r in [*caplog.records, *seen] if r.levelno >= 40 or r.exc_info]
    assert not errors, [r.getMessage()[:200] for r in errors[:3]]


TARGET = Target.for_profile(PROFILE)
# Leaf values the schema alone cannot know (what /v1/model says: the cameras, the state size), used to
# build a valid body so that mutations reach deep validation instead of failing at the first field.
KNOWN: dict[str, Any] = TARGET.json_body()


# ---- HTTP ------------------------------------------------------------------------------------------
def check_http(status: int, body: bytes, what: str, path: str) -> None:
    assert status < 500, f"{status} {body[:200]!r} for {what}"
    if status >= 400:
        assert len(body) <= MAX_ERROR_BYTES, f"{len(body)} bytes of error for {what}"
        if path == "/v1/infer" and status != 404 and status != 405:
            err = json.loads(body)["error"]
            assert err["code"] not in BAD_CODES, (err, what)


async def test_http_schema_fuzz(serve):
    srv = await serve()
    schema = create_app(srv.app.state).openapi()
    content = schema["paths"]["/v1/infer"]["post"]["requestBody"]["content"]
    json_schema = content["application/json"]["schema"]
    form_schema = content["multipart/form-data"]["schema"]
    assert set(json_schema["properties"]) == _JSON_KEYS  # the schema describes what validation accepts
    routes = [(path, method.upper()) for path, ops in schema["paths"].items() for method in ops]
    rng = random.Random(SEED * 1000 + 11)
    seen: dict[int, int] = {}
    for _ in range(max(20, EXAMPLES // 3)):
        kind = rng.choice(("json", "json", "json", "multipart", "raw", "route"))
        path, method = "/v1/infer", "POST"
        headers: dict[str, str] = {"content-type": "application/json"}
        if kind == "json":
            body = mutate_object(json_schema, valid_value(json_schema, rng, KNOWN), rng, TARGET)
            data = serialize(body, rng)
            what = f"json {data[:120]!r}"
        elif kind == "multipart":
            data, ctype = multipart(form_schema, rng, TARGET)
            headers["content-type"] = ctype
            what = f"multipart {data[:120]!r}"
        elif kind == "raw":
            data = rng.randbytes(rng.randint(0, 300))
            headers["content-type"] = rng.choice(CONTENT_TYPES)
            what = f"raw {headers} {data[:60]!r}"
        else:  # every route of the schema, with any method and a random body
            path, method = rng.choice(routes)
            method = rng.choice([method, method, "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
            data = serialize(random_json(rng), rng)
            what = f"{method} {path} {data[:60]!r}"
        # Header values as bytes: a fuzzed content type need not be ASCII (the server must cope anyway).
        raw_headers = {k: v.encode("utf-8", "surrogatepass") for k, v in headers.items()}
        r = await srv.http.request(method, path, content=data, headers=raw_headers)
        check_http(r.status_code, r.content, what, path)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert seen.get(422), seen  # the fuzzing reached validation
    r = await srv.http.post("/v1/infer", json=KNOWN)  # still serving
    assert r.status_code == 200, r.text


def check_raw_answer(answer: bytes, data: bytes) -> int:
    """The status of one raw answer (0: none), checked: an HTTP status line below 500, errors bounded."""
    if not answer:
        return 0
    parsed = http_status(answer)
    assert parsed is not None, answer[:200]
    status, body = parsed
    assert status < 500, (status, answer[:300], data[:120])
    if status >= 400:
        assert len(body) <= MAX_ERROR_BYTES, (status, answer[:300])
    return status


async def test_http_raw_bytes_on_the_socket(serve):
    srv = await serve()
    host, port = srv.app.settings.http_host, srv.app.http.port
    rng = random.Random(SEED * 1000 + 12)
    seeds = [http_request(json.dumps(KNOWN).encode()),
             http_request(multipart({}, rng, TARGET)[0], "multipart/form-data"),
             b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
             b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    statuses: dict[int, int] = {}
    sent = [mutate(rng, rng.choice(seeds)) for _ in range(max(10, EXAMPLES // 5))]
    for i in range(0, len(sent), RAW_CONCURRENCY):  # concurrently: the waits on incomplete requests overlap
        batch = sent[i:i + RAW_CONCURRENCY]
        answers = await asyncio.gather(*(exchange(host, port, d, RAW_WAIT_S) for d in batch))
        for data, answer in zip(batch, answers):
            status = check_raw_answer(answer, data)
            statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get(400) or statuses.get(422), statuses  # malformed requests were among them
    assert (await srv.http.get("/healthz")).status_code == 200
    assert (await srv.http.post("/v1/infer", json=KNOWN)).status_code == 200


# ---- the openpi websocket ------------------------------------------------------------------------
async def test_openpi_websocket_random_frames(serve):
    srv = await serve(openpi_port=0)
    url = srv.app.openpi_url
    frame = openpi_observation(preset("droid", PROFILE), TARGET)
    good = pack_message(frame)
    rng = random.Random(SEED * 1000 + 13)
    counts = {"reply": 0, "error": 0, "closed": 0}
    budget = max(10, EXAMPLES // 3)

    async def session(send: Callable[[], bytes], n: int) -> int:
        """Up to `n` frames on one connection; returns how many were sent before it closed."""
        async with connect(url, compression=None, max_size=None) as ws:
            meta = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
            assert isinstance(meta, bytes)
            for i in range(n):
                frame = send()
                try:
                    await ws.send(frame)
                    answer = await asyncio.wait_for(ws.recv(), TIMEOUT_S)
                except ConnectionClosed as e:
                    rcvd = e.rcvd
                    assert rcvd is None or rcvd.code != 1011, (rcvd, frame[:80])
                    counts["closed"] += 1
                    return i + 1
                if isinstance(answer, bytes):
                    counts["reply"] += 1
                    continue
                counts["error"] += 1
                code = answer.split(":", 1)[0]
                assert code not in BAD_CODES and code.isupper(), (answer[:200], frame[:80])
                assert len(answer.encode()) <= MAX_ERROR_BYTES, len(answer)
            return n

    sent = 0
    while sent < budget:
        sent += await session(lambda: hostile_frame(rng, frame, TARGET), budget - sent)
    assert counts["error"], counts  # the fuzzing reached the refusals
    async with connect(url, compression=None) as ws:  # still serving
        await ws.recv()
        await ws.send(good)
        assert isinstance(await asyncio.wait_for(ws.recv(), TIMEOUT_S), bytes)
    assert (await srv.http.post("/v1/infer", json=KNOWN)).status_code == 200
