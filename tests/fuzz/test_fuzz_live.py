"""Fuzzing the live sockets: the HTTP API (raw bytes on its TCP port, and bodies derived from its
OpenAPI schema) and the openpi websocket (random binary frames), against an in-process server.

The HTTP bodies come from the app's own OpenAPI document (`create_app(state).openapi()`: every path and
method, and /v1/infer's JSON and multipart body schemas): a valid body is built from the schema, then a
schema-directed mutation breaks it (a property dropped, given the wrong type or an extreme value of its
type, an unknown property, deep nesting), or the serialized bytes are mutated. Every answer must be
below 500, an error body at most 1 KiB (a JSON `error` that is never INTERNAL/UNKNOWN on /v1/infer);
every openpi frame is answered by a reply or a bounded, non-INTERNAL error text, and no connection is
closed with 1011; each server still serves a valid request afterwards.

The budget is fuzzkit.EXAMPLES (small and seeded in CI: a few seconds; `make fuzz` raises it), with
fixed seeds (fuzzkit.SEED) like the gRPC raw-bytes fuzz.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from fuzzkit import EXAMPLES, MAX_ERROR_BYTES, SEED, mutate
from PIL import Image
from serverkit import CAMERAS, PROFILE, state_vec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chatvla.server.transports.http import create_app
from chatvla.server.transports.openpi.codec import pack_message
from chatvla.server.validation import _JSON_KEYS

BAD_CODES = {"INTERNAL", "UNKNOWN"}
TIMEOUT_S = 20.0
RAW_WAIT_S = 1.0  # how long a raw-socket exchange waits for an answer to a request that may be incomplete
RAW_CONCURRENCY = 16
CONTENT_TYPES = ["application/json", "multipart/form-data", "text/plain", "", "application/json; charset=latin-1",
                 "multipart/form-data; boundary=", "application/x-www-form-urlencoded", "\xff\xfe", "a" * 300]


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


def png_bytes(value: int = 90, h: int = 16, w: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()
# Leaf values the schema alone cannot know (what /v1/model says: the cameras, the state size), used to
# build a valid body so that mutations reach deep validation instead of failing at the first field.
KNOWN: dict[str, Any] = {
    "images": {CAMERAS[0]: base64.b64encode(PNG).decode()}, "state": state_vec().tolist(),
    "instruction": "pick up the red block",
}


# ---- values from a JSON schema -------------------------------------------------------------------
def valid_value(schema: dict, rng: random.Random, name: str = "") -> Any:
    if name in KNOWN:
        return KNOWN[name]
    t = schema.get("type")
    if t == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return {k: valid_value(s, rng, k) for k, s in props.items() if k in required or rng.random() < 0.5}
    if t == "array":
        return [valid_value(schema.get("items", {}), rng) for _ in range(rng.randint(0, 3))]
    if t == "integer":
        return rng.randint(int(schema.get("minimum", 0)), min(int(schema.get("maximum", 1000)), 10**6))
    if t == "number":
        return rng.uniform(-1, 1)
    if t == "string":
        return "go" if schema.get("minLength") else rng.choice(["", "x", "put the card on 21"])
    return None


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, including the awkward ones (huge ints, floats that overflow, deep lists)."""
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 4 else [])
    k = rng.choice(kinds)
    if k == "null":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "int":
        return rng.choice([0, -1, 2**63, 2**64, -(2**63) - 1, 10**400, rng.randint(-10**9, 10**9)])
    if k == "float":
        return rng.choice([0.5, -1e308, 1e-320, 3.4e38, 1e39, rng.uniform(-1e4, 1e4)])
    if k == "str":
        return rng.choice(["", "a" * rng.randint(1, 3000), "<|im_end|>", "\x00\x1f", "日本語", "data:,", "=" * 7,
                           base64.b64encode(rng.randbytes(rng.randint(0, 64))).decode()])
    if k == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["", "images", "state", "a" * 100, "\u2028", str(rng.random())]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def wrong_value(schema: dict, rng: random.Random) -> Any:
    """A value the schema forbids, or an extreme one it allows."""
    t = schema.get("type")
    extremes: dict[str | None, list[Any]] = {
        "integer": [schema.get("minimum", 0) - 1, schema.get("maximum", 0) + 1, 10**400, -(10**30), 1.5, "12", "²"],
        "number": [1e400, -1e400, 3.5e38, 1e4 + 1, True, "1"],
        "string": ["", "x" * 10_000, "a<|image_pad|>b", "\x07", 5, None],
        "array": [[], [1] * 300, [[1]] * 8, [None] * 8, ["1"] * 8, "1,2,3", [float("nan")] * 8],
        "object": [{}, {"": ""}, {"x" * 200: 1}, {CAMERAS[0]: "not base64!"},
                   {CAMERAS[0]: base64.b64encode(PNG[:40]).decode()}, {"thermal": KNOWN["images"][CAMERAS[0]]},
                   {c: KNOWN["images"][CAMERAS[0]] for c in [*CAMERAS, *map(str, range(10))]}, []],
    }
    return rng.choice([*extremes.get(t, []), random_json(rng)])


def mutate_object(schema: dict, body: dict, rng: random.Random) -> dict:
    """One to three schema-directed mutations of a valid body."""
    props = schema.get("properties", {})
    out = dict(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("drop", "wrong", "wrong", "unknown", "nest"))
        key = rng.choice(sorted(props))
        if op == "drop":
            out.pop(key, None)
        elif op == "wrong":
            out[key] = wrong_value(props[key], rng)
        elif op == "unknown":
            out[rng.choice(["extra", "", "Images", "__proto__", "a" * 500])] = random_json(rng)
        else:
            v: Any = out.get(key)
            for _ in range(rng.randint(2, 40)):
                v = [v] if rng.random() < 0.5 else {"k": v}
            out[key] = v
    return out


def serialize(value: Any, rng: random.Random) -> bytes:
    text = json.dumps(value, allow_nan=True)
    data = text.encode("utf-8", "surrogatepass")
    return mutate(rng, data) if rng.random() < 0.2 else data


def multipart(schema: dict, rng: random.Random) -> tuple[bytes, str]:
    """A multipart body from the form schema (text parts from its properties, file parts for cameras),
    mutated: wrong part names, garbage files, bad boundaries, truncation."""
    boundary = rng.choice(["b0undary", "x" * 70, "", "a b", "\u00e9"])
    parts: list[tuple[str, bytes, bool]] = []
    for key, s in schema.get("properties", {}).items():
        if key == "state":
            value = rng.choice([" ".join(map(str, state_vec().tolist())), json.dumps(state_vec().tolist()), "1,2,x",
                                "[" * 200, json.dumps([1e39] * PROFILE.state_dim), ""])
        else:
            value = str(valid_value(s, rng, key) if rng.random() < 0.7 else wrong_value(s, rng))
        if rng.random() < 0.85:
            parts.append((key, value.encode("utf-8", "surrogatepass"), False))
    for _ in range(rng.randint(0, 3)):
        name = rng.choice([*CAMERAS, "thermal", "", 'a"b', "x" * 100])
        parts.append((name, rng.choice([PNG, PNG[:30], rng.randbytes(rng.randint(0, 200)), b""]), True))
    body = bytearray()
    for name, value, is_file in parts:
        body += f"--{boundary}\r\n".encode("utf-8", "surrogatepass")
        disp = f'form-data; name="{name}"' + ('; filename="a.png"' if is_file else "")
        body += f"Content-Disposition: {disp}\r\n".encode("utf-8", "surrogatepass")
        body += b"Content-Type: image/png\r\n\r\n" if is_file else b"\r\n"
        body += value + b"\r\n"
    body += f"--{boundary}--\r\n".encode("utf-8", "surrogatepass")
    data = bytes(body)
    if rng.random() < 0.3:
        data = mutate(rng, data)
    return data, f"multipart/form-data; boundary={boundary}"


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
            body = mutate_object(json_schema, valid_value(json_schema, rng), rng)
            data = serialize(body, rng)
            what = f"json {data[:120]!r}"
        elif kind == "multipart":
            data, ctype = multipart(form_schema, rng)
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


def raw_request(body: bytes, ctype: str = "application/json") -> bytes:
    head = (f"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def exchange(host: str, port: int, data: bytes) -> bytes:
    """Send `data` and read the answer until the server closes, or until a bounded wait passes (an
    incomplete request the server is still waiting on: no answer is an answer). No half-close: uvicorn
    takes the end of the client's stream for a disconnect and would drop a complete request."""
    reader, writer = await asyncio.open_connection(host, port)
    chunks: list[bytes] = []
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(RAW_WAIT_S):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.wait_closed()
    return b"".join(chunks)


def check_raw_answer(answer: bytes, data: bytes) -> int:
    """The status of one raw answer (0: none), checked: an HTTP status line below 500, errors bounded."""
    if not answer:
        return 0
    line, _, rest = answer.partition(b"\r\n")
    parts = line.split()
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit(), answer[:200]
    status = int(parts[1])
    assert status < 500, (status, answer[:300], data[:120])
    if status >= 400:
        assert len(rest.partition(b"\r\n\r\n")[2]) <= MAX_ERROR_BYTES, (status, answer[:300])
    return status


async def test_http_raw_bytes_on_the_socket(serve):
    srv = await serve()
    host, port = srv.app.settings.http_host, srv.app.http.port
    rng = random.Random(SEED * 1000 + 12)
    seeds = [raw_request(json.dumps(KNOWN).encode()), raw_request(multipart({}, rng)[0], "multipart/form-data"),
             b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
             b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    statuses: dict[int, int] = {}
    sent = [mutate(rng, rng.choice(seeds)) for _ in range(max(10, EXAMPLES // 5))]
    for i in range(0, len(sent), RAW_CONCURRENCY):  # concurrently: the waits on incomplete requests overlap
        batch = sent[i:i + RAW_CONCURRENCY]
        answers = await asyncio.gather(*(exchange(host, port, d) for d in batch))
        for data, answer in zip(batch, answers):
            status = check_raw_answer(answer, data)
            statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get(400) or statuses.get(422), statuses  # malformed requests were among them
    assert (await srv.http.get("/healthz")).status_code == 200
    assert (await srv.http.post("/v1/infer", json=KNOWN)).status_code == 200


# ---- the openpi websocket ------------------------------------------------------------------------
def droid_frame(rng: random.Random | None = None) -> dict[str, Any]:
    img = np.full((16, 16, 3), 60, np.uint8)
    return {"observation/exterior_image_1_left": img, "observation/wrist_image_left": img,
            "observation/joint_position": state_vec()[:7].astype(np.float64),
            "observation/gripper_position": np.array([0.5]), "prompt": "put the marker in the cup"}


def random_frame(rng: random.Random, good: bytes, keys: list[str]) -> bytes:
    """Random bytes, a mutated valid frame, or a msgpack map over the mapping's keys with random values."""
    k = rng.random()
    if k < 0.25:
        return rng.randbytes(rng.randint(0, 300))
    if k < 0.7:
        return mutate(rng, good)
    frame = droid_frame()
    for key in rng.sample(keys, rng.randint(1, len(keys))):
        frame[key] = rng.choice([
            random_json(rng), np.zeros(rng.choice([(0,), (3,), (7,), (16, 16), (16, 16, 4), (2, 2, 3)])),
            np.full((7,), rng.choice([np.nan, 1e30, -1e3, 2.0])), rng.randbytes(40), PNG[:50],
            np.zeros((16, 16, 3), rng.choice([np.float16, np.int64, np.bool_, np.complex64])),
        ])
    if rng.random() < 0.2:
        frame[rng.choice(["", "extra", "observation/cartesian_position"])] = random_json(rng)
    try:
        return pack_message(frame)
    except (TypeError, ValueError, OverflowError):  # a value msgpack cannot pack: send raw msgpack of the rest
        return msgpack.packb({k: v for k, v in frame.items() if not isinstance(v, np.ndarray)}, default=str)


async def test_openpi_websocket_random_frames(serve):
    srv = await serve(openpi_port=0)
    url = srv.app.openpi_url
    good = pack_message(droid_frame())
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

    keys = list(droid_frame())
    sent = 0
    while sent < budget:
        sent += await session(lambda: random_frame(rng, good, keys), budget - sent)
    assert counts["error"], counts  # the fuzzing reached the refusals
    async with connect(url, compression=None) as ws:  # still serving
        await ws.recv()
        await ws.send(good)
        assert isinstance(await asyncio.wait_for(ws.recv(), TIMEOUT_S), bytes)
    assert (await srv.http.post("/v1/infer", json=KNOWN)).status_code == 200
