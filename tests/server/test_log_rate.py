"""The HTTP stack's per-request warnings are counted, not one line per malformed request (found by
benchmarks/hostile.py: uvicorn's "Invalid HTTP request received." and python-multipart's parse warnings
were a line per bad request, a log flood anyone who reaches the port can cause)."""

from __future__ import annotations

import logging

from chatvla.fuzzing import exchange
from chatvla.server.log_rate import EveryNthWarning


def test_the_first_and_every_nth_warning_pass_with_their_count_and_errors_always_pass():
    f = EveryNthWarning(every=10)

    def record(level: int, n: int) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, "bad request %d", (n,), None)

    passed = [r for r in (record(logging.WARNING, n) for n in range(1, 26)) if f.filter(r)]
    assert [r.getMessage().split(" (")[0] for r in passed] == ["bad request 1", "bad request 10", "bad request 20"]
    assert "20 such warnings so far" in passed[-1].getMessage()
    assert all(f.filter(record(logging.ERROR, n)) for n in range(25))
    assert f.filter(record(logging.INFO, 1))


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_malformed_http_requests_and_multipart_bodies_log_at_most_one_line(serve):
    srv = await serve()
    host, port = srv.app.settings.http_host, srv.app.http.port
    seen = {name: Collect() for name in ("uvicorn.error", "python_multipart.multipart")}
    for name, handler in seen.items():  # after start: uvicorn's logging config replaces handlers
        logging.getLogger(name).addHandler(handler)
    try:
        for i in range(30):
            await exchange(host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 2.0)
            body = b"--x" + str(i).encode() + b"\r\nContent-Disposition: form-data; name=\"state\"\r\n\r\n1\r\n--b--"
            r = await srv.http.post("/v1/infer", content=body,
                                    headers={"content-type": "multipart/form-data; boundary=b"})
            assert r.status_code == 422, r.text
    finally:
        for name, handler in seen.items():
            logging.getLogger(name).removeHandler(handler)
    warnings = {name: [r.getMessage() for r in h.records if r.levelno == logging.WARNING] for name, h in seen.items()}
    # The filter's count is per process: an earlier test may have taken the first line already.
    assert all(len(lines) <= 1 for lines in warnings.values()), {k: (len(v), v[:1]) for k, v in warnings.items()}
    assert (await srv.http.get("/healthz")).status_code == 200


async def test_a_response_to_a_request_uvicorn_already_answered_is_dropped_without_a_traceback(serve):
    """Malformed body bytes in the same segment as the head: uvicorn answers 400 itself while the app
    runs; the app's own answer (404 here, no body read) used to end in h11's LocalProtocolError and an
    "Exception in ASGI application" traceback (a bare FastAPI app does the same)."""
    srv = await serve()
    host, port = srv.app.settings.http_host, srv.app.http.port
    seen = {name: Collect() for name in ("uvicorn.error", "chatvla.server.http")}
    for name, handler in seen.items():
        logging.getLogger(name).addHandler(handler)
    try:
        for path in (b"/nope", b"/v1/infer"):
            for _ in range(3):
                answer = await exchange(host, port, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nQQ\r\n", 2.0)
                assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    finally:
        for name, handler in seen.items():
            logging.getLogger(name).removeHandler(handler)
    records = [r for h in seen.values() for r in h.records]
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR or r.exc_info]
    dropped = [r.getMessage() for r in seen["chatvla.server.http"].records]
    assert len(dropped) <= 1 and all("already answered 400" in m for m in dropped)
    assert (await srv.http.get("/healthz")).status_code == 200


async def test_pipelined_bytes_after_a_refused_websocket_handshake_log_a_counted_warning_not_a_traceback():
    """websockets itself logs "unexpected internal error" with a traceback for this (a bare websockets
    server too); the openpi endpoint's filter turns exactly that record into a counted warning."""
    import asyncio

    from websockets.asyncio.server import serve

    from chatvla.server.log_rate import RefusedHandshakeCrash, limit_refused_handshake_crashes

    limit_refused_handshake_crashes()
    limit_refused_handshake_crashes()  # once per process, however many servers start
    logger = logging.getLogger("websockets.server")
    assert sum(isinstance(f, RefusedHandshakeCrash) for f in logger.filters) == 1
    seen = Collect()
    logger.addHandler(seen)
    try:
        async with serve(lambda ws: ws.recv(), "127.0.0.1", 0,
                         process_request=lambda conn, req: conn.respond(400, "no\n")) as srv:
            port = srv.sockets[0].getsockname()[1]
            for _ in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n")
                await w.drain()
                await asyncio.wait_for(r.read(1000), 5)  # the 400, or nothing: websockets drops the connection
                w.close()
            await asyncio.sleep(0.2)
    finally:
        logger.removeHandler(seen)
    assert not [r for r in seen.records if r.exc_info or r.levelno >= logging.ERROR]
    warned = [r.getMessage() for r in seen.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and RefusedHandshakeCrash.MESSAGE in warned[0] and "1 such warnings" in warned[0]


def test_other_errors_on_the_websockets_logger_keep_their_traceback():
    from chatvla.server.log_rate import RefusedHandshakeCrash

    try:
        raise AssertionError("elsewhere")
    except AssertionError:
        import sys

        rec = logging.LogRecord("websockets.server", logging.ERROR, __file__, 1, "unexpected internal error", (),
                                sys.exc_info())
    f = RefusedHandshakeCrash()
    assert f.filter(rec) and rec.levelno == logging.ERROR and rec.exc_info is not None
