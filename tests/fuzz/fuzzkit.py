"""Shared budget and property of the fuzz tests. (A uniquely named module, not conftest: pytest runs in
importlib mode.)

The default budget is small and deterministic (hypothesis `derandomize=True`, a fixed seed for the
raw-bytes loops) so the folder runs in well under a minute in CI; `make fuzz` sets CHATVLA_FUZZ_EXAMPLES
high for a longer exploration (and CHATVLA_FUZZ_SEED picks another fixed seed for the raw-bytes loops).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from hypothesis import HealthCheck, settings

from chatvla.server.errors import Code, ServeError
from chatvla.wire import WireError

EXAMPLES = int(os.environ.get("CHATVLA_FUZZ_EXAMPLES", "150"))
SEED = int(os.environ.get("CHATVLA_FUZZ_SEED", "0"))
MAX_ERROR_BYTES = 1024

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


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """`seed` flipped/truncated/extended a few times; one message in ten is random bytes."""
    if rng.random() < 0.1:
        return rng.randbytes(rng.randint(0, 200))
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "flip", "truncate", "insert"))
        if op == "flip" and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randint(1, 255)
        elif op == "truncate" and data:
            del data[rng.randrange(len(data)):]
        else:
            i = rng.randint(0, len(data))
            data[i:i] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)
