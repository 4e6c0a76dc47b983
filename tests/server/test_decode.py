"""Decoding an observation reads each image's and the state's `data` once and does not copy it again:
the arrays handed to the engine are read-only views of the bytes the protobuf field access returned.
Refusals keep their exact messages."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image as PILImage

from chatvla.profiles import get_profile
from chatvla.server.errors import ServeError
from chatvla.server.validation import InputSpec, infer_from_json, infer_from_proto, observation_from_proto
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import Limits, WireError, decode_image, encode_image, tensor_from_proto, tensor_to_proto

PROFILE = get_profile("arx_r5_bimanual")  # 3 cameras of 224x224, 14-d state
SPEC = InputSpec(profile=PROFILE, limits=Limits())
CAMERAS = PROFILE.camera_names


class Counted:
    """A message stand-in that counts reads of `data` and hands out the one `bytes` object it holds
    (a real message returns a fresh copy on every read, so each read would be a copy)."""

    def __init__(self, msg: pb.Image | pb.Tensor) -> None:
        self._msg = msg
        self.payload = msg.data
        self.reads = 0

    @property
    def data(self) -> bytes:
        self.reads += 1
        return self.payload

    def __getattr__(self, name: str) -> object:
        return getattr(self._msg, name)


class CountedObservation:
    """An `Observation` whose images and state count their `data` reads."""

    def __init__(self, obs: pb.Observation) -> None:
        self._obs = obs
        self.images = [Counted(im) for im in obs.images]
        self.state = Counted(obs.state)

    def __getattr__(self, name: str) -> object:
        return getattr(self._obs, name)


def observation(rng: np.random.Generator) -> tuple[pb.Observation, dict[str, np.ndarray], np.ndarray]:
    pixels = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in PROFILE.cameras}
    state = rng.uniform(PROFILE.action_lower, PROFILE.action_upper).astype(np.float32)  # within the joint limits
    obs = pb.Observation(
        seq=1, images=[encode_image(a, cam) for cam, a in pixels.items()], state=tensor_to_proto(state),
        instruction="pick up the red cube",
    )
    return obs, pixels, state


def root(a: np.ndarray) -> object:
    base: object = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


def test_stream_observation_reads_each_buffer_once_and_views_it():
    obs, pixels, state = observation(np.random.default_rng(0))
    counted = CountedObservation(obs)
    req = observation_from_proto(counted, SPEC, CAMERAS, "session instruction")
    assert [im.reads for im in counted.images] == [1, 1, 1]
    assert counted.state.reads == 1
    for im in counted.images:
        arr = req.obs.images[im.camera]
        np.testing.assert_array_equal(arr, pixels[im.camera])
        assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
        assert np.shares_memory(arr, np.frombuffer(im.payload, np.uint8))  # the bytes themselves
        assert not arr.flags.owndata and not arr.flags.writeable
    np.testing.assert_array_equal(req.obs.state, state)
    assert req.obs.state.dtype == np.float32 and req.obs.state.shape == (PROFILE.state_dim,)
    assert np.shares_memory(req.obs.state, np.frombuffer(counted.state.payload, np.uint8))
    assert not req.obs.state.flags.writeable


def test_infer_on_a_real_message_returns_views_of_bytes():
    obs, pixels, state = observation(np.random.default_rng(1))
    req = infer_from_proto(pb.InferRequest(images=obs.images, state=obs.state, instruction="go"), SPEC)
    for cam, arr in req.obs.images.items():
        np.testing.assert_array_equal(arr, pixels[cam])
        assert isinstance(root(arr), bytes) and not arr.flags.writeable
    np.testing.assert_array_equal(req.obs.state, state)
    assert isinstance(root(req.obs.state), bytes)


def test_decoders_still_copy_by_default():
    """Other callers (the client's chunk actions, the fake server) keep writeable arrays they own."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    img = Counted(encode_image(a, "cam"))
    out = decode_image(img)
    assert img.reads == 1
    np.testing.assert_array_equal(out, a)
    assert out.flags.owndata and out.flags.writeable
    assert not np.shares_memory(out, np.frombuffer(img.payload, np.uint8))
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = Counted(tensor_to_proto(x))
    got = tensor_from_proto(t, field="t")
    assert t.reads == 1
    np.testing.assert_array_equal(got, x)
    assert got.flags.owndata and got.flags.writeable


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_compressed_images_read_data_once(encoding):
    a = np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    img = Counted(encode_image(a, "cam", encoding))
    out = decode_image(img, copy=False)
    assert img.reads == 1
    assert out.shape == (16, 24, 3) and not out.flags.writeable
    np.testing.assert_array_equal(out, decode_image(img._msg))


def test_http_images_are_read_only_too():
    buf = io.BytesIO()
    PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    req = infer_from_json(
        {"images": {CAMERAS[0]: b64}, "state": [0.0] * PROFILE.state_dim, "instruction": "go"}, SPEC
    )
    img = req.obs.images[CAMERAS[0]]
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and not img.flags.writeable


# Exact refusals (field: message), unchanged by reading `data` once.
BAD = [
    (lambda o: setattr(o.images[0], "height", 31), f"observation.images[{CAMERAS[0]}]",
     "150528 bytes do not match 31x224x3 RGB8"),
    (lambda o: o.images[0].CopyFrom(pb.Image(camera=CAMERAS[0], encoding=pb.RGB8, height=5000, width=1,
                                             data=b"\0" * 15000)),
     f"observation.images[{CAMERAS[0]}]", "5000x1 exceeds the maximum side of 2048 px"),
    (lambda o: o.images[0].CopyFrom(pb.Image(camera=CAMERAS[0], encoding=pb.RGB8, height=2048, width=2048,
                                             data=b"\0" * (9 << 20))),
     f"observation.images[{CAMERAS[0]}]", f"{9 << 20} bytes exceed the image limit of {8 << 20}"),
    (lambda o: setattr(o.images[0], "width", 0), f"observation.images[{CAMERAS[0]}]",
     "RGB8 images need height and width"),
    (lambda o: setattr(o.images[0], "encoding", pb.IMAGE_ENCODING_UNSPECIFIED),
     f"observation.images[{CAMERAS[0]}]", "unknown or unset image encoding 0"),
    (lambda o: setattr(o.state, "data", b"\0" * 5), "observation.state",
     "5 bytes do not match shape [14] of float32"),
    (lambda o: o.state.CopyFrom(tensor_to_proto(np.full(PROFILE.state_dim, np.nan, np.float32))),
     "observation.state", "contains NaN or inf"),
    (lambda o: o.state.CopyFrom(tensor_to_proto(np.zeros(3, np.float32))), "observation.state",
     "shape must be [14], got [3]"),
]


@pytest.mark.parametrize(("mutate", "field", "message"), BAD)
def test_refusals_keep_their_messages(mutate, field, message):
    obs, _, _ = observation(np.random.default_rng(4))
    mutate(obs)
    with pytest.raises(ServeError) as e:
        observation_from_proto(obs, SPEC, CAMERAS, "i")
    assert (e.value.field, e.value.message) == (field, message)


def test_wire_error_for_rgb8_mismatch_names_field():
    img = pb.Image(camera="cam", encoding=pb.RGB8, height=2, width=2, data=b"\0" * 5)
    with pytest.raises(WireError, match=r"^images\[cam\]: 5 bytes do not match 2x2x3 RGB8$"):
        decode_image(img, copy=False)
