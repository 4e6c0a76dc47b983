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


def limit_per_request_warnings(names: Sequence[str] = PER_REQUEST_LOGGERS) -> None:
    """Install the filter on each logger once (servers started in one process share it). A logger-level
    filter survives uvicorn's logging config, which replaces handlers but keeps filters."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, EveryNthWarning) for f in logger.filters):
            logger.addFilter(EveryNthWarning())
