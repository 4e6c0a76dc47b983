"""Property: the wire codec turns any protobuf field values into a valid array or a WireError naming the
field with a bounded message; never any other exception."""

from __future__ import annotations

import io

import numpy as np
from fuzzkit import FUZZ, assert_clean_wire_error
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image as PILImage

from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import WireError, decode_image, encode_image, tensor_from_proto, tensor_to_proto
from chatvla.wire.codec import check_image_size, decode_image_bytes
from chatvla.wire.limits import Limits

U32 = st.integers(0, 2**32 - 1)
# Mostly small dims (so byte counts can match), sometimes extreme ones.
DIM = st.one_of(st.integers(0, 6), U32)
DTYPE = st.one_of(st.sampled_from(sorted(pb.DType.values())), st.integers(-(2**31), 2**31 - 1))
LIMITS = Limits(max_image_bytes=1 << 16, max_image_side=64)


def _file(fmt: str, h: int = 12, w: int = 10) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.full((h, w, 3), 77, np.uint8), "RGB").save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _file("PNG"), _file("JPEG")


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few bytes flipped, a truncation or an insertion."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(max_size=16))
    return bytes(data)


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    dtype = draw(DTYPE)
    shape = draw(st.lists(DIM, max_size=draw(st.sampled_from([4, 80]))))
    n = int(np.prod([d for d in shape], dtype=object)) if shape else 1
    itemsize = {pb.FLOAT64: 8, pb.INT64: 8, pb.INT32: 4, pb.FLOAT32: 4, pb.FLOAT16: 2}.get(dtype, 1)
    if draw(st.booleans()) and n * itemsize <= 4096:
        data = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))  # a matching byte count
    else:
        data = draw(st.binary(max_size=64))
    t = pb.Tensor(shape=shape, data=data)
    t.dtype = dtype if dtype in pb.DType.values() else 0
    if dtype not in pb.DType.values():  # an enum value this build does not know (open enums keep it)
        t = pb.Tensor.FromString(t.SerializeToString() + b"\x08" + _varint(dtype & (2**64 - 1)))
    return t


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


@FUZZ
@given(t=tensors(), copy=st.booleans(), finite=st.booleans())
@example(t=pb.Tensor(dtype=pb.UINT8, shape=[1] * 70, data=b"\0"), copy=True, finite=True)
@example(t=pb.Tensor(dtype=pb.UINT8, shape=[0, 2**32 - 1, 2**32 - 1, 2**32 - 1]), copy=True, finite=True)
@example(t=pb.Tensor(dtype=pb.FLOAT32, shape=[1] * 10000, data=b"\0" * 4), copy=False, finite=True)
def test_tensor_from_proto_is_an_array_or_a_wire_error(t: pb.Tensor, copy: bool, finite: bool) -> None:
    try:
        arr = tensor_from_proto(t, field="state", copy=copy, finite=finite)
    except WireError as e:
        assert_clean_wire_error(e)
        assert e.field == "state"
        return
    assert isinstance(arr, np.ndarray)
    assert arr.shape == tuple(t.shape)
    if finite and arr.dtype.kind == "f":
        assert np.isfinite(arr).all()


@FUZZ
@given(t=tensors(), dim=st.integers(0, 300))
def test_tensor_from_proto_with_a_required_shape(t: pb.Tensor, dim: int) -> None:
    try:
        arr = tensor_from_proto(t, field="s", dtype=np.float32, shape=(dim,), max_elements=256, copy=False)
    except WireError as e:
        assert_clean_wire_error(e)
        return
    assert arr.shape == (dim,) and arr.dtype == np.float32 and dim <= 256


def test_tensor_regressions_are_wire_errors() -> None:
    """Found by fuzzing: numpy's own ValueError escaped for >64 dimensions and for a zero-size tensor
    whose other dimensions overflow numpy's size (`[0, 2**32-1, 2**32-1, 2**32-1]`)."""
    for shape, data in (([1] * 70, b"\0"), ([0, 2**32 - 1, 2**32 - 1, 2**32 - 1], b"")):
        try:
            tensor_from_proto(pb.Tensor(dtype=pb.UINT8, shape=shape, data=data), field="t")
        except WireError as e:
            assert e.field == "t" and len(e.message) < 200
        else:
            raise AssertionError(f"shape of {len(shape)} dims accepted")
    arr = tensor_from_proto(tensor_to_proto(np.zeros((0, 5), np.float32)), field="t")
    assert arr.shape == (0, 5)


@st.composite
def images(draw: st.DrawFn) -> pb.Image:
    encoding = draw(st.sampled_from([pb.RGB8, pb.JPEG, pb.PNG, 0, 7]))
    h, w = draw(st.one_of(st.integers(0, 20), U32)), draw(st.one_of(st.integers(0, 20), U32))
    kind = draw(st.sampled_from(["match", "random", "png", "jpeg", "mutated"]))
    if kind == "match" and h * w * 3 <= 4096:
        data = draw(st.binary(min_size=h * w * 3, max_size=h * w * 3))
    elif kind == "png":
        data = PNG
    elif kind == "jpeg":
        data = JPEG
    elif kind == "mutated":
        data = draw(mutated(draw(st.sampled_from([PNG, JPEG]))))
    else:
        data = draw(st.binary(max_size=200))
    camera = draw(st.text(max_size=80))
    return pb.Image(camera=camera, encoding=encoding, height=h, width=w, data=data)


@FUZZ
@given(img=images(), copy=st.booleans())
@example(img=pb.Image(camera="front", encoding=pb.PNG, data=PNG, height=12, width=10), copy=True)
def test_decode_image_is_pixels_or_a_wire_error(img: pb.Image, copy: bool) -> None:
    try:
        arr = decode_image(img, limits=LIMITS, copy=copy)
        check_image_size("img", arr.shape[0], arr.shape[1], LIMITS)
    except WireError as e:
        assert_clean_wire_error(e)
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert min(arr.shape[:2]) >= 8 and max(arr.shape[:2]) <= LIMITS.max_image_side


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), mutated(PNG), mutated(JPEG)))
def test_decode_image_bytes_is_pixels_or_a_wire_error(data: bytes) -> None:
    try:
        arr = decode_image_bytes(data, field="images[front]", limits=LIMITS)
    except WireError as e:
        assert_clean_wire_error(e)
        assert e.field == "images[front]"
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


def test_round_trip_of_a_valid_image_still_works() -> None:
    img = encode_image(np.full((9, 11, 3), 5, np.uint8), "front", "png")
    assert decode_image(img, limits=LIMITS).shape == (9, 11, 3)
