"""The wire codec's contract, example by example (tests/fuzz holds the property-based versions)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import encode_image, tensor_from_proto, tensor_to_proto
from chatvla.wire.codec import WireError, check_image_size, decode_image
from chatvla.wire.limits import DEFAULT_LIMITS
from chatvla.wire.vocabulary import TIMING_COUNT_FIELDS, TIMING_MS_FIELDS, TRANSPORTS


def test_tensors_round_trip_bit_exact_and_refuse_what_does_not_fit():
    a = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    assert np.array_equal(tensor_from_proto(tensor_to_proto(a), field="state", shape=(3, 8)), a)
    with pytest.raises(WireError, match="shape must be"):
        tensor_from_proto(tensor_to_proto(a), field="state", shape=(8,))
    bad = a.copy()
    bad[1, 2] = np.nan
    with pytest.raises(WireError, match="NaN or inf"):
        tensor_from_proto(tensor_to_proto(bad), field="state")


def test_images_round_trip_lossless_as_rgb8_and_png():
    img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for encoding in ("rgb8", "png"):
        msg = encode_image(img, "front", encoding)
        assert msg.camera == "front"
        assert np.array_equal(decode_image(msg, field="front"), img)


def test_images_are_refused_from_their_header_outside_the_published_limits():
    lim = DEFAULT_LIMITS
    check_image_size("front", lim.min_image_side, lim.min_image_side * lim.max_image_aspect)
    for h, w in ((lim.min_image_side - 1, 64), (64, lim.max_image_side + 1),
                 (lim.min_image_side, lim.min_image_side * lim.max_image_aspect + 1)):
        with pytest.raises(WireError):
            check_image_size("front", h, w)
    # A decodable PNG whose header is too big is refused before its pixels are decoded.
    buf = io.BytesIO()
    Image.new("RGB", (lim.max_image_side + 1, 8)).save(buf, format="PNG")
    with pytest.raises(WireError, match="front"):
        decode_image(pb.Image(camera="front", encoding=pb.PNG, data=buf.getvalue()), field="front")


def test_vocabulary_follows_the_proto_and_names_each_transport_once():
    assert TIMING_MS_FIELDS == ("queue_ms", "preprocess_ms", "reasoning_ms", "expert_ms", "total_ms")
    assert set(TIMING_COUNT_FIELDS) == {f.name for f in pb.Timings.DESCRIPTOR.fields} - set(TIMING_MS_FIELDS)
    assert len(set(TRANSPORTS)) == len(TRANSPORTS)


def test_every_proto_dtype_round_trips_and_the_episode_format_takes_the_same_names():
    """The proto's DType enum is the one dtype list: each value is sent little-endian and read back as
    sent, and episode files accept the same names (plus bool)."""
    from chatvla.client.recording import DTYPES
    from chatvla.wire.vocabulary import DTYPE_NAMES

    assert len(DTYPE_NAMES) == len(pb.DType.DESCRIPTOR.values) - 1  # all but DTYPE_UNSPECIFIED
    for name in DTYPE_NAMES:
        a = np.arange(6, dtype=name).reshape(2, 3)
        t = tensor_to_proto(a)
        assert pb.DType.Name(t.dtype) == name.upper()
        back = tensor_from_proto(t, field="x")
        assert back.dtype == np.dtype(name) and np.array_equal(back, a)
    assert set(DTYPES) == {*DTYPE_NAMES, "bool"}
    assert all(dt.byteorder in "<|" for dt in DTYPES.values())
