"""Property: openpi msgpack decoding (`unpack_message`, `observation_from_openpi`) turns any frame into
a valid value/observation or a ServeError (INVALID_ARGUMENT, a field, a message <= 1 KiB); never any other
exception."""

from __future__ import annotations

import msgpack
import numpy as np
from fuzzkit import FUZZ, assert_clean_serve_error, check_clean
from hypothesis import example, given
from hypothesis import strategies as st

from chatvla.profiles import FRANKA_JOINT
from chatvla.server.errors import ServeError
from chatvla.server.messages import ValidatedObservation
from chatvla.server.transports.openpi.codec import pack_message, unpack_message
from chatvla.server.transports.openpi.endpoint import observation_from_openpi
from chatvla.server.transports.openpi.mappings import preset
from chatvla.server.validation import InputSpec
from chatvla.wire.limits import Limits

PROFILE = FRANKA_JOINT
SPEC = InputSpec(PROFILE, Limits(max_message_bytes=1 << 20, max_image_bytes=1 << 16, max_image_side=64))
MAPPINGS = [preset("droid", PROFILE), preset("native", PROFILE)]
DROID = MAPPINGS[0]

DTYPES = ["<f4", "<f8", "<f2", "|u1", "|i1", "<i4", ">i8", "|b1", "<u8", "|O", "<c8", "V8", "<U4", "f", "", "<f3"]


@st.composite
def ndarray_maps(draw: st.DrawFn) -> dict:
    dtype = draw(st.one_of(st.sampled_from(DTYPES), st.text(max_size=5)))
    shape = draw(st.one_of(
        st.lists(st.integers(0, 6), max_size=4),
        st.lists(st.integers(-3, 2**41), max_size=10),
        st.sampled_from([[0, 2**40 - 1, 2**40 - 1], [True, 2], "3", None, [1.5]]),
    ))
    try:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize if isinstance(shape, list) else 0
    except Exception:
        n = 0
    data = draw(st.binary(min_size=n, max_size=n)) if 0 <= n <= 4096 and draw(st.booleans()) else draw(
        st.one_of(st.binary(max_size=32), st.text(max_size=4), st.none()))
    key = draw(st.sampled_from([bytes, str]))
    return {key(b"__ndarray__" if key is bytes else "__ndarray__"): draw(st.sampled_from([True, 1, False])),
            key(b"data" if key is bytes else "data"): data, key(b"dtype" if key is bytes else "dtype"): dtype,
            key(b"shape" if key is bytes else "shape"): shape}


@st.composite
def npgeneric_maps(draw: st.DrawFn) -> dict:
    return {b"__npgeneric__": True, b"dtype": draw(st.sampled_from(DTYPES)),
            b"data": draw(st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), st.booleans(),
                                    st.binary(max_size=4)))}


SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
                   st.binary(max_size=20))
VALUE = st.recursive(
    st.one_of(SCALAR, ndarray_maps(), npgeneric_maps()),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)),
    max_leaves=10,
)


def image_value(h: int, w: int, layout: str = "hwc") -> np.ndarray:
    a = np.full((h, w, 3), 50, np.uint8)
    return a.transpose(2, 0, 1).copy() if layout == "chw" else a


def good_frame() -> dict:
    return {
        "observation/exterior_image_1_left": image_value(16, 16),
        "observation/wrist_image_left": image_value(12, 20, "chw"),
        "observation/joint_position": np.zeros(7, np.float64),
        "observation/gripper_position": np.zeros(1, np.float32),
        "prompt": "pick up the red block",
    }


GOOD = pack_message(good_frame())


@st.composite
def frames(draw: st.DrawFn) -> dict:
    """A DROID frame with each key kept, dropped or replaced by an arbitrary value."""
    frame = good_frame()
    for key in list(frame):
        choice = draw(st.integers(0, 3))
        if choice == 1:
            del frame[key]
        elif choice == 2:
            frame[key] = draw(VALUE)
        elif choice == 3:
            frame[key] = draw(st.sampled_from([
                image_value(1, 1), image_value(2, 64), image_value(8, 8).astype(np.float32) * np.nan,
                np.full(7, 1e30), np.full(7, 1e39), np.zeros((7, 1)), [1e400] * 7, [True] * 7, [2**64] * 7,
                b"\x89PNG\r\n", "\xff<|im_end|>", b"\xff\xfe", "", "y" * 1001, np.zeros(3, "|b1"),
            ]))
    if draw(st.booleans()):
        frame[draw(st.text(max_size=10))] = draw(VALUE)
    return frame


def _pack(obj: object) -> bytes | None:
    try:
        return pack_message(obj)
    except (TypeError, ValueError, OverflowError):  # e.g. bytes dict keys mixed in an unpackable way
        return None


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"\xdd\xff\xff\xff\xff")  # array32 announcing 4 G elements
@example(data=b"\x91" * 5000)  # deeply nested arrays
def test_unpack_message_of_random_bytes(data: bytes) -> None:
    check_clean(lambda: unpack_message(data, SPEC.limits))


@FUZZ
@given(value=VALUE)
def test_unpack_message_of_arbitrary_values(value: object) -> None:
    data = _pack(value)
    if data is not None:
        check_clean(lambda: unpack_message(data, SPEC.limits))


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[i:]
            if not data:
                data = bytearray(b"\x80")
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(frame=frames(), mapping=st.sampled_from(MAPPINGS), instruction=st.sampled_from(["", "keep going"]))
@example(frame=good_frame(), mapping=DROID, instruction="")
def test_observation_from_openpi_of_arbitrary_frames(frame: dict, mapping, instruction: str) -> None:
    data = _pack(frame)
    if data is None:
        return
    r = check_clean(lambda: observation_from_openpi(data, mapping, SPEC, 3, instruction))
    if r is not None:
        assert isinstance(r, ValidatedObservation) and r.seq == 3
        assert r.obs.state.shape == (PROFILE.state_dim,) and np.isfinite(r.obs.state).all()
        assert all(a.dtype == np.uint8 and a.shape[2] == 3 for a in r.obs.images.values())


@FUZZ
@given(data=mutations())
def test_observation_from_openpi_of_mutated_frames(data: bytes) -> None:
    check_clean(lambda: observation_from_openpi(data, DROID, SPEC, 1, ""))


def test_the_valid_frame_decodes() -> None:
    r = observation_from_openpi(GOOD, DROID, SPEC, 1, "")
    assert r.obs.images[PROFILE.camera_names[1]].shape == (12, 20, 3)
    assert msgpack.unpackb(pack_message({"a": 1})) == {"a": 1}


def test_a_float_scalar_beyond_its_dtype_is_refused() -> None:
    """Found by fuzzing: `{__npgeneric__, dtype <f2, data 1e10}` became inf with a RuntimeWarning."""
    for dtype, value in (("<f2", 1e10), ("<f4", 1e300)):
        frame = msgpack.packb({b"__npgeneric__": True, b"dtype": dtype, b"data": value}, use_bin_type=True)
        try:
            unpack_message(frame, SPEC.limits)
        except ServeError as e:
            assert_clean_serve_error(e)
            assert e.field == "scalar"
        else:
            raise AssertionError(f"{dtype} {value} accepted")
    assert unpack_message(msgpack.packb({b"__npgeneric__": True, b"dtype": "<f2", b"data": 1.5}), SPEC.limits) == 1.5
