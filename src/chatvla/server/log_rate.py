"""Warnings that the HTTP stack logs once per malformed request, counted instead of flooding the log.

uvicorn logs "Invalid HTTP request received." for every request h11 cannot parse, python-multipart a
warning for every malformed multipart body: a line per bad request, which anyone who can reach the port
can turn into a log flood (benchmarks/hostile.py counted one per such request). Our own malformed-request
warning (gRPC) is logged for the first and then every 1000th; this filter applies that rule to those
libraries' loggers. Only WARNING records: errors and tracebacks always pass, they are bugs to see.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

EVERY = 1000
# The loggers that warn per request: uvicorn's server (bad HTTP framing, unsupported upgrades) and the
# multipart parser starlette uses for form bodies.
PER_REQUEST_LOGGERS = ("uvicorn.error", "python_multipart.multipart")


class EveryNthWarning(logging.Filter):
    """Passes a logger's first WARNING and then every `every`th, each saying how many there were."""

    def __init__(self, every: int = EVERY) -> None:
        super().__init__()
        self.every = every
        self.count = 0
        self._lock = threading.Lock()  # python-multipart may parse in a worker thread

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        with self._lock:
            self.count += 1
            n = self.count
        if n != 1 and n % self.every:
            return False
        record.msg = f"{record.getMessage()} ({n} such warnings so far; the first and every {self.every}th are logged)"
        record.args = ()
        return True


class RefusedHandshakeCrash(logging.Filter):
    """websockets (17.x) logs "unexpected internal error" with a traceback (an AssertionError in its
    `send_eof`) when a client pipelines bytes behind a handshake the server refused: its parser closes
    the connection once for the second request and `send_response` closes it again. A bare websockets
    server does the same; the connection is dropped, nothing else is affected. Anyone who can reach
    the openpi port could repeat it, so that one record becomes a counted warning without traceback,
    under the first-and-every-1000th rule; every other error still passes whole."""

    MESSAGE = "a client sent more bytes after a refused websocket handshake; connection dropped"

    def __init__(self, every: int = EVERY) -> None:
        super().__init__()
        self._count = EveryNthWarning(every)

    @staticmethod
    def _is_known(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, AssertionError) or record.getMessage() != "unexpected internal error":
            return False
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and tb.tb_frame.f_code.co_name == "send_eof"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not self._is_known(record):
            return True
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args, record.exc_info, record.exc_text = self.MESSAGE, (), None, None
        return self._count.filter(record)


def limit_refused_handshake_crashes(name: str = "websockets.server") -> None:
    """Install `RefusedHandshakeCrash` on the websockets server logger once per process."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RefusedHandshakeCrash) for f in logger.filters):
        logger.addFilter(RefusedHandshakeCrash())


def limit_per_request_warnings(names: Sequence[str] = PER_REQUEST_LOGGERS) -> None:
    """Install the filter on each logger once (servers started in one process share it). A logger-level
    filter survives uvicorn's logging config, which replaces handlers but keeps filters."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, EveryNthWarning) for f in logger.filters):
            logger.addFilter(EveryNthWarning())
