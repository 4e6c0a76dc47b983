"""The client's hand-framed `StreamRequest` bytes: the same message as the ordinary construction, image
headers reused between observations, and each image copied once."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from chatvla.client import framing
from chatvla.client.framing import ObservationFramer
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import WireError, encode_image, tensor_to_proto


def head(seq: int, **kw) -> pb.Observation:
    state = tensor_to_proto(np.array([0.5, -1.0, 2.0 * seq], np.float32))
    return pb.Observation(seq=seq, tick=10 * seq, state=state, deadline_ms=250, **kw)


def ordinary(h: pb.Observation, images: list[tuple[str, np.ndarray]], encoding: str = "rgb8") -> pb.StreamRequest:
    """What the client sent before framing: every message built and nested by protobuf."""
    obs = pb.Observation()
    obs.CopyFrom(h)
    obs.images.extend(encode_image(a, name, encoding, 90) for name, a in images)
    return pb.StreamRequest(observation=obs)


def frame(framer: ObservationFramer, h: pb.Observation, images: list[tuple[str, np.ndarray]]) -> pb.StreamRequest:
    return pb.StreamRequest.FromString(framer.request(h, [framer.image(name, a) for name, a in images]))


def cameras(seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        ("front", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)),
        ("wrist", rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),  # a length needing a 3-byte varint
    ]


def test_framed_bytes_parse_to_the_ordinary_message_observation_after_observation():
    framer = ObservationFramer()
    for seq in (1, 2, 300):  # the same framer, different content each time
        h = head(seq, instruction="stack the cups" if seq == 2 else "", reasoning="r" * seq, seed=seq)
        images = cameras(seq)
        assert frame(framer, h, images) == ordinary(h, images)


def test_views_empty_images_and_no_images_frame_like_the_ordinary_message():
    framer = ObservationFramer()
    bgr = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    images = [("flipped", bgr[:, :, ::-1]), ("cropped", bgr[1:4, 2:6]), ("empty", np.zeros((0, 4, 3), np.uint8))]
    assert frame(framer, head(1), images) == ordinary(head(1), images)
    assert frame(framer, head(2), []) == ordinary(head(2), [])


@pytest.mark.parametrize("encoding", ["jpeg", "PNG"])
def test_compressed_encodings_are_the_ordinary_images(encoding):
    framer = ObservationFramer(encoding)
    images = cameras(0)
    assert frame(framer, head(1), images) == ordinary(head(1), images, encoding)


def test_image_headers_are_built_once_per_camera_and_reused(monkeypatch):
    built: list[str] = []
    real = pb.Image

    def counting(**kw):
        built.append(kw["camera"])
        return real(**kw)

    monkeypatch.setattr(framing.pb, "Image", counting)
    framer = ObservationFramer()
    first = frame(framer, head(1), cameras(1))
    second = frame(framer, head(2), cameras(2))
    assert built == ["front", "wrist"]  # not once per observation
    assert first.observation.images[1].data != second.observation.images[1].data
    assert second.observation.images[1].camera == "wrist" and second.observation.images[1].width == 300


def test_each_image_is_copied_once():
    framer = ObservationFramer()
    images = [(f"cam{i}", np.full((224, 224, 3), i, np.uint8)) for i in range(3)]
    pixels = sum(a.nbytes for _, a in images)
    tracemalloc.start()
    try:
        framer.request(head(1), [framer.image(name, a) for name, a in images])  # headers are cached now
        tracemalloc.reset_peak()
        request = framer.request(head(2), [framer.image(name, a) for name, a in images])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pixels < len(request) < pixels + 1024
    # The request itself is the one copy: an intermediate `tobytes` per image would double the peak.
    assert peak < pixels + 64 * 1024


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8)])
def test_a_bad_image_is_the_same_wire_error_as_encode_image(bad):
    with pytest.raises(WireError) as ordinary_error:
        encode_image(bad, "front")
    with pytest.raises(WireError) as framed_error:
        ObservationFramer().image("front", bad)
    assert framed_error.value.field == ordinary_error.value.field == "images[front]"
    assert str(framed_error.value) == str(ordinary_error.value)
