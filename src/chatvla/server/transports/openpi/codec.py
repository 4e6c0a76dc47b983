"""openpi's msgpack-numpy encoding (what `openpi_client.msgpack_numpy` reads and writes).

numpy arrays travel as maps with *bytes* keys `__ndarray__`, `data`, `dtype`, `shape` (numpy scalars as
`__npgeneric__`, `data`, `dtype`); object, void and complex dtypes are refused. Nothing is ever
unpickled: arrays are built from an allow-listed dtype, a shape and bytes. Every refusal is an
INVALID_ARGUMENT `ServeError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from chatvla.server.errors import ServeError
from chatvla.server.validation import invalid
from chatvla.wire import Limits

_MAX_NDIM = 8

# A dtype string as numpy's `dtype.str` writes it: byte order, kind, item size. Only booleans, integers
# and floats: object ("O"), void ("V"), complex ("c"), strings and datetimes are refused, so decoding
# can never build anything but a plain numeric array.
_DTYPE_RE = re.compile(r"^[<>|=]?[biuf][1248]$")


def _dtype(value: object, field: str) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not _DTYPE_RE.match(value):
        raise invalid(field, f"unsupported dtype {str(value)[:16]!r}; send bool, integer or float arrays")
    dt = np.dtype(value)
    if dt.kind not in "biuf":  # belt and braces: the pattern already allows only these kinds
        raise invalid(field, f"unsupported dtype {dt}")
    return dt


def _get(obj: Mapping[Any, Any], key: bytes) -> Any:
    return obj[key] if key in obj else obj.get(key.decode())


def decode_ndarray(obj: Mapping[Any, Any], field: str = "array") -> np.ndarray:
    """An openpi ndarray map -> a read-only array viewing the message bytes (validated)."""
    dt = _dtype(_get(obj, b"dtype"), field)
    shape = _get(obj, b"shape")
    data = _get(obj, b"data")
    if not isinstance(shape, list | tuple) or len(shape) > _MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise invalid(field, f"shape must be a list of at most {_MAX_NDIM} non-negative integers")
    if not isinstance(data, bytes):
        raise invalid(field, "array data must be bytes")
    n = math.prod(shape)
    if len(data) != n * dt.itemsize:
        raise invalid(field, f"{len(data)} bytes do not match shape {list(shape)} of {dt.str}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _object_hook(obj: dict[Any, Any]) -> Any:
    if _get(obj, b"__ndarray__") is True:
        return decode_ndarray(obj)
    if _get(obj, b"__npgeneric__") is True:
        dt = _dtype(_get(obj, b"dtype"), "scalar")
        data = _get(obj, b"data")
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise invalid("scalar", "numpy scalar data must be a number")
        try:
            with np.errstate(over="raise"):  # float16 1e10: refused, not silently inf
                return dt.type(data)
        except (OverflowError, ValueError, TypeError, FloatingPointError):  # e.g. uint8 300: not representable
            raise invalid("scalar", f"numpy scalar value does not fit its dtype {dt.str}") from None
    return obj


def _ext_hook(code: int, data: bytes) -> Any:
    raise invalid("message", f"msgpack extension type {code} is not accepted")


def unpack_message(data: bytes, limits: Limits) -> Any:
    """Decode one client frame with openpi's numpy encoding. Raises INVALID_ARGUMENT."""
    if len(data) > limits.max_message_bytes:
        raise invalid("message", f"{len(data)} bytes exceed the limit of {limits.max_message_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_hook=_object_hook, ext_hook=_ext_hook,
            max_str_len=1 << 20, max_array_len=1 << 16, max_map_len=1 << 12,
        )
    except ServeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # ExtraData, FormatError, StackError...
        raise invalid("message", f"not a valid msgpack message: {type(e).__name__}: {e}") from None


def _pack_default(obj: object) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        a = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str, b"shape": list(a.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send scalars of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__}")


def pack_message(obj: object) -> bytes:
    """Encode a server frame with openpi's numpy encoding (readable by `openpi_client.msgpack_numpy`)."""
    return msgpack.packb(obj, use_bin_type=True, default=_pack_default)
