"""Shared budget and property of the fuzz tests. (A uniquely named module, not conftest: pytest runs in
importlib mode.)

The default budget is small and deterministic (hypothesis `derandomize=True`, a fixed seed for the
raw-bytes loops) so the folder runs in well under a minute in CI; `make fuzz` sets CHATVLA_FUZZ_EXAMPLES
high for a longer exploration (and CHATVLA_FUZZ_SEED picks another fixed seed for the raw-bytes loops).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hypothesis import HealthCheck, settings

# The input generators live in chatvla.fuzzing (benchmarks/hostile.py sends the same ones to a server
# process); `mutate` is re-exported for the raw-bytes loops.
from chatvla.fuzzing import MAX_ERROR_BYTES, mutate  # noqa: F401
from chatvla.server.errors import Code, ServeError
from chatvla.wire import WireError

EXAMPLES = int(os.environ.get("CHATVLA_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("CHATVLA_FUZZ_SEED", "0"))

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def assert_clean_serve_error(e: ServeError) -> None:
    """A refusal of bad input: INVALID_ARGUMENT, naming a field, with a bounded message."""
    assert isinstance(e, ServeError), repr(e)
    assert e.code is Code.INVALID_ARGUMENT, e
    assert e.field, f"no field: {e}"
    assert len(e.message.encode()) <= MAX_ERROR_BYTES, len(e.message)
    assert len(str(e).encode()) <= MAX_ERROR_BYTES, len(str(e))
    assert all(" " <= c <= "~" for c in e.field), e.field  # it travels in gRPC trailing metadata


def assert_clean_wire_error(e: WireError) -> None:
    assert isinstance(e, WireError), repr(e)
    assert e.field, f"no field: {e}"
    assert len(e.message.encode()) <= MAX_ERROR_BYTES, len(e.message)


def check_clean(call: Callable[[], object]) -> object | None:
    """`call()`'s result, or None if it raised a clean ServeError (any other exception fails the test)."""
    try:
        return call()
    except ServeError as e:
        assert_clean_serve_error(e)
        return None
