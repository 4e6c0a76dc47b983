"""Convert numpy arrays and images to and from the protobuf messages of chatvla.v1.

Every decoder validates before it trusts: dtype against the allowed set, shape against the byte
count, image dimensions against limits before pixels are decoded (so a "decompression bomb" PNG is
refused from its header). Errors are `WireError`s that name the offending field.

Reading a protobuf `bytes` field copies it (each access returns a new `bytes` object), so each decoder
reads a message's `data` once. With `copy=False` the decoded array is a read-only view of that one
`bytes` object (it keeps it alive), not a second copy: the server decodes that way, its engines only
read pixels and state. The default, `copy=True`, returns a writeable array the caller owns.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image as PILImage

from chatvla.v1 import policy_pb2 as pb
from chatvla.wire.limits import DEFAULT_LIMITS, Limits
from chatvla.wire.vocabulary import DTYPE_NAMES

_DTYPES: dict[int, np.dtype] = {pb.DType.Value(n.upper()): np.dtype(n).newbyteorder("<") for n in DTYPE_NAMES}
_DTYPE_ENUM: dict[str, int] = {dt.str.lstrip("<|"): enum for enum, dt in _DTYPES.items()}
_ENCODINGS = {"rgb8": pb.RGB8, "jpeg": pb.JPEG, "png": pb.PNG}
_MAX_NDIM = 32  # numpy's limit before 2.0 (64 since)


class WireError(ValueError):
    """Input that does not follow the wire contract. `field` names where, e.g. "observation.state"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def tensor_to_proto(arr: np.ndarray) -> pb.Tensor:
    """Encode an array as a typed little-endian tensor."""
    a = np.asarray(arr)
    key = a.dtype.str.lstrip("<>|=")
    if key not in _DTYPE_ENUM:
        raise WireError("tensor", f"dtype {a.dtype} cannot be sent; use one of {sorted(_DTYPE_ENUM)}")
    enum = _DTYPE_ENUM[key]
    le = np.ascontiguousarray(a, dtype=_DTYPES[enum])
    return pb.Tensor(dtype=enum, shape=list(le.shape), data=le.tobytes())


def tensor_from_proto(
    t: pb.Tensor,
    *,
    field: str,
    dtype: np.dtype | str | None = None,
    shape: tuple[int, ...] | None = None,
    finite: bool = True,
    max_elements: int = 1 << 24,
    copy: bool = True,
) -> np.ndarray:
    """Decode and validate a tensor. `dtype`/`shape` are requirements, not conversions.

    `copy=False` returns a read-only view of the message's bytes (on a little-endian host; a
    big-endian one still gets a native-order copy)."""
    if t.dtype not in _DTYPES:
        raise WireError(field, f"unknown or unset dtype {t.dtype}")
    dt = _DTYPES[t.dtype]
    if dtype is not None and dt != np.dtype(dtype).newbyteorder("<"):
        raise WireError(field, f"dtype must be {np.dtype(dtype).name}, got {dt.name}")
    dims = tuple(int(s) for s in t.shape)
    if len(dims) > _MAX_NDIM:  # numpy cannot build it (and the shape would swell every message)
        raise WireError(field, f"{len(dims)} dimensions exceed the limit of {_MAX_NDIM}")
    n = math.prod(dims)
    if n > max_elements:
        raise WireError(field, f"{n} elements exceed the limit of {max_elements}")
    if n == 0 and math.prod(max(d, 1) for d in dims) > max_elements:  # e.g. [0, 2**32-1, 2**32-1]
        raise WireError(field, f"shape {list(dims)} exceeds the limit of {max_elements} elements")
    if shape is not None and dims != tuple(shape):
        raise WireError(field, f"shape must be {list(shape)}, got {list(dims)}")
    data = t.data  # a fresh copy on every access: read it once
    if len(data) != n * dt.itemsize:
        raise WireError(field, f"{len(data)} bytes do not match shape {list(dims)} of {dt.name}")
    arr = np.frombuffer(data, dtype=dt).reshape(dims)
    if finite and dt.kind == "f" and not np.isfinite(arr).all():
        raise WireError(field, "contains NaN or inf")
    if not copy and dt.isnative:
        return arr
    return arr.astype(dt.newbyteorder("="), copy=True)


def encode_image(arr: np.ndarray, camera: str, encoding: str = "rgb8", quality: int = 90) -> pb.Image:
    """Encode an HxWx3 uint8 RGB image. RGB8 is cheapest on fast links; JPEG when bandwidth matters."""
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise WireError(f"images[{camera}]", f"need an HxWx3 uint8 array, got {a.dtype} {list(a.shape)}")
    enc = _ENCODINGS.get(encoding.lower())
    if enc is None:
        raise WireError(f"images[{camera}]", f"unknown encoding {encoding!r}; use rgb8, jpeg or png")
    h, w = a.shape[:2]
    if enc == pb.RGB8:
        data = np.ascontiguousarray(a).tobytes()
    else:
        buf = io.BytesIO()
        fmt = "JPEG" if enc == pb.JPEG else "PNG"
        kwargs = {"quality": int(quality)} if enc == pb.JPEG else {"compress_level": 1}
        PILImage.fromarray(a, "RGB").save(buf, format=fmt, **kwargs)
        data = buf.getvalue()
    return pb.Image(camera=camera, encoding=enc, height=h, width=w, data=data)


def decode_image_bytes(
    data: bytes, *, field: str, limits: Limits = DEFAULT_LIMITS, copy: bool = True
) -> np.ndarray:
    """Decode a JPEG or PNG file (e.g. from an HTTP upload) with the same checks as `decode_image`.

    `copy=False` returns the decoded pixels read-only instead of copying them once more."""
    if len(data) > limits.max_image_bytes:
        raise WireError(field, f"{len(data)} bytes exceed the image limit of {limits.max_image_bytes}")
    if not data:
        raise WireError(field, "empty image data")
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                raise WireError(field, f"unsupported image format {im.format}; send JPEG or PNG")
            w, h = im.size
            _check_side(field, h, w, limits)
            rgb = im.convert("RGB")
            rgb.load()
    except WireError:
        raise
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise WireError(field, f"cannot decode image: {e}") from None
    arr = np.asarray(rgb, dtype=np.uint8)  # read-only, over PIL's own copy of the pixels
    return arr.copy() if copy else arr


def decode_image(
    img: pb.Image, *, field: str | None = None, limits: Limits = DEFAULT_LIMITS, copy: bool = True
) -> np.ndarray:
    """Decode a wire image into an HxWx3 uint8 array, enforcing `limits`.

    `copy=False`: an RGB8 image is a read-only view of the message's bytes, a JPEG/PNG one read-only."""
    field = field or f"images[{img.camera}]"
    data = img.data  # a fresh copy on every access: read it once
    if len(data) > limits.max_image_bytes:
        raise WireError(field, f"{len(data)} bytes exceed the image limit of {limits.max_image_bytes}")
    encoding = img.encoding
    if encoding == pb.RGB8:
        h, w = int(img.height), int(img.width)
        if h <= 0 or w <= 0:
            raise WireError(field, "RGB8 images need height and width")
        _check_side(field, h, w, limits)
        if len(data) != h * w * 3:
            raise WireError(field, f"{len(data)} bytes do not match {h}x{w}x3 RGB8")
        arr = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
        return arr.copy() if copy else arr
    if encoding in (pb.JPEG, pb.PNG):
        arr = decode_image_bytes(data, field=field, limits=limits, copy=copy)
        if (img.height and img.height != arr.shape[0]) or (img.width and img.width != arr.shape[1]):
            raise WireError(
                field, f"declared {img.height}x{img.width} but the image is {arr.shape[0]}x{arr.shape[1]}"
            )
        return arr
    raise WireError(field, f"unknown or unset image encoding {encoding}")


def _check_side(field: str, h: int, w: int, limits: Limits) -> None:
    if h > limits.max_image_side or w > limits.max_image_side:
        raise WireError(field, f"{h}x{w} exceeds the maximum side of {limits.max_image_side} px")


def check_image_size(field: str, h: int, w: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """What a server accepts: height and width within [min_image_side, max_image_side] and an aspect
    ratio <= max_image_aspect (the decoders check only the maximum; the server checks the rest)."""
    _check_side(field, h, w, limits)
    if h < limits.min_image_side or w < limits.min_image_side:
        raise WireError(field, f"{h}x{w} is below the minimum side of {limits.min_image_side} px")
    if max(h, w) > limits.max_image_aspect * min(h, w):
        raise WireError(field, f"{h}x{w} exceeds the maximum aspect ratio of {limits.max_image_aspect}:1")

