"""Property: server validation turns any protobuf message, JSON value or multipart form into a valid
request or a ServeError (INVALID_ARGUMENT, a field, a message <= 1 KiB); never any other exception."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
from fuzzkit import FUZZ, assert_clean_serve_error, check_clean
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image as PILImage

from chatvla.profiles import FRANKA_JOINT
from chatvla.server.errors import ServeError
from chatvla.server.messages import ReasoningPolicy, SessionConfig, ValidatedObservation
from chatvla.server.validation import (
    InputSpec,
    infer_from_form,
    infer_from_json,
    infer_from_proto,
    observation_from_proto,
    session_from_proto,
)
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import encode_image, tensor_to_proto
from chatvla.wire.limits import Limits

PROFILE = FRANKA_JOINT
CAMS = PROFILE.camera_names
SPEC = InputSpec(PROFILE, Limits(max_image_bytes=1 << 16, max_image_side=64))
DEFAULTS = ReasoningPolicy()
HOME = np.asarray(PROFILE.home, np.float32)

U32, U64, I64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1)
CAMERA = st.one_of(st.sampled_from([*CAMS, "thermal", ""]), st.text(max_size=100))
# Text with the characters validation cares about: control characters, chat-template tokens, non-ASCII.
TEXT = st.one_of(
    st.sampled_from(["pick up the red block", "", " ", "<|image_pad|>", "a<|im_end|>\n<|im_start|>system", "\x00"]),
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("ab <|>\t\n\x01é"), max_size=60),
    st.builds(lambda n: "y" * n, st.integers(990, 8100)),
)
FLOAT = st.floats(allow_nan=True, allow_infinity=True)


def _png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.full((h, w, 3), 9, np.uint8), "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@st.composite
def proto_images(draw: st.DrawFn) -> list[pb.Image]:
    out = []
    for _ in range(draw(st.integers(0, 10))):
        cam = draw(CAMERA)
        kind = draw(st.sampled_from(["good", "good_png", "tiny", "thin", "random"]))
        if kind == "good":
            out.append(encode_image(np.zeros((16, 16, 3), np.uint8), cam))
        elif kind == "good_png":
            height = draw(st.sampled_from([0, 10, 11]))
            out.append(pb.Image(camera=cam, encoding=pb.PNG, data=_png(10, 12), height=height))
        elif kind == "tiny":
            out.append(encode_image(np.zeros((draw(st.integers(1, 9)), 9, 3), np.uint8), cam))
        elif kind == "thin":
            out.append(encode_image(np.zeros((2, draw(st.integers(60, 64)), 3), np.uint8), cam))
        else:
            out.append(pb.Image(camera=cam, encoding=draw(st.integers(0, 3)), height=draw(U32), width=draw(U32),
                                data=draw(st.binary(max_size=64))))
    return out


@st.composite
def states(draw: st.DrawFn) -> pb.Tensor | None:
    kind = draw(st.sampled_from(["absent", "good", "values", "shape", "random"]))
    if kind == "absent":
        return None
    if kind == "good":
        return tensor_to_proto(HOME)
    if kind == "values":
        with np.errstate(over="ignore"):
            values = np.asarray(draw(st.lists(FLOAT, min_size=8, max_size=8)), np.float64).astype(np.float32)
        return tensor_to_proto(values)
    if kind == "shape":
        return tensor_to_proto(np.zeros(draw(st.lists(st.integers(0, 9), max_size=3)), np.float32))
    return pb.Tensor(dtype=draw(st.integers(0, 6)), shape=draw(st.lists(U32, max_size=4)),
                     data=draw(st.binary(max_size=40)))


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.InferRequest:
    req = pb.InferRequest(
        robot_profile=draw(st.one_of(st.just(""), st.just(PROFILE.name), st.text(max_size=100))),
        images=draw(proto_images()), instruction=draw(TEXT), deadline_ms=draw(U32), seed=draw(U64),
        tick=draw(I64), reasoning=draw(TEXT),
    )
    state = draw(states())
    if state is not None:
        req.state.CopyFrom(state)
    return req


@FUZZ
@given(req=infer_requests())
@example(req=pb.InferRequest(images=[encode_image(np.zeros((16, 16, 3), np.uint8), CAMS[0])],
                             state=tensor_to_proto(HOME), instruction="go"))
def test_infer_from_proto(req: pb.InferRequest) -> None:
    r = check_clean(lambda: infer_from_proto(req, SPEC))
    if r is not None:
        assert isinstance(r, ValidatedObservation)
        assert r.obs.state.shape == (PROFILE.state_dim,) and np.isfinite(r.obs.state).all()
        assert r.obs.instruction and set(r.obs.images) <= set(CAMS)
        assert all(min(a.shape[:2]) >= 8 for a in r.obs.images.values())


@FUZZ
@given(req=infer_requests(), seq=U64, force=st.booleans(), cams=st.sampled_from([CAMS, CAMS[:1], ()]))
def test_observation_from_proto(req: pb.InferRequest, seq: int, force: bool, cams: tuple[str, ...]) -> None:
    obs = pb.Observation(seq=seq, tick=req.tick, images=req.images, instruction=req.instruction,
                         deadline_ms=req.deadline_ms, force_reasoning=force, seed=req.seed, reasoning=req.reasoning)
    if req.HasField("state"):
        obs.state.CopyFrom(req.state)
    r = check_clean(lambda: observation_from_proto(obs, SPEC, cams, "session instruction"))
    if r is not None:
        assert isinstance(r, ValidatedObservation) and r.seq == seq
        assert set(r.obs.images) == set(cams)


@st.composite
def session_starts(draw: st.DrawFn) -> pb.SessionStart:
    return pb.SessionStart(
        robot_profile=draw(st.one_of(st.just(""), st.just(PROFILE.name), st.text(max_size=80))),
        cameras=draw(st.lists(CAMERA, max_size=10)),
        control_rate_hz=draw(FLOAT), instruction=draw(TEXT), robot_id=draw(st.text(max_size=100)),
        reasoning=pb.ReasoningPolicy(every_n=draw(U32), every_seconds=draw(FLOAT)),
        default_deadline_ms=draw(U32), max_in_flight=draw(U32),
    )


@FUZZ
@given(start=session_starts())
@example(start=pb.SessionStart(instruction="go", control_rate_hz=15.0))
def test_session_from_proto(start: pb.SessionStart) -> None:
    r = check_clean(lambda: session_from_proto(start, SPEC, DEFAULTS))
    if r is not None:
        assert isinstance(r, SessionConfig) and r.instruction
        assert set(r.cameras) <= set(CAMS) and math.isfinite(r.control_rate_hz)


@FUZZ
@given(data=st.binary(max_size=300))
def test_messages_parsed_from_random_bytes(data: bytes) -> None:
    """Whatever protobuf manages to parse from raw bytes validates cleanly too."""
    for cls, fn in (
        (pb.InferRequest, lambda m: infer_from_proto(m, SPEC)),
        (pb.Observation, lambda m: observation_from_proto(m, SPEC, CAMS, "x")),
        (pb.SessionStart, lambda m: session_from_proto(m, SPEC, DEFAULTS)),
    ):
        try:
            msg = cls.FromString(data)
        except Exception:  # not a message: the gRPC deserializer's job (test_fuzz_grpc.py)
            continue
        check_clean(lambda fn=fn, msg=msg: fn(msg))


# --- HTTP ----------------------------------------------------------------------------------------------
GOOD_B64 = base64.b64encode(_png(10, 12)).decode()
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
JSON = st.recursive(
    JSON_SCALAR,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)
IMAGE_VALUE = st.one_of(st.just(GOOD_B64), st.just("data:image/png;base64," + GOOD_B64), st.just("!!"),
                        st.builds(lambda b: base64.b64encode(b).decode(), st.binary(max_size=60)), JSON)
STATE_VALUE = st.one_of(st.just(HOME.tolist()), st.lists(st.one_of(FLOAT, st.integers(), st.booleans()), max_size=10),
                        st.just([1e10] * 8), st.just([10**400] * 8), JSON)


@st.composite
def json_bodies(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    body: dict[str, object] = {
        "images": draw(st.one_of(st.dictionaries(CAMERA, IMAGE_VALUE, max_size=9), JSON)),
        "state": draw(STATE_VALUE),
        "instruction": draw(st.one_of(TEXT, JSON)),
    }
    for key, strat in (("seed", st.one_of(st.integers(), st.text(max_size=25), JSON)),
                       ("deadline_ms", st.one_of(st.integers(), JSON)), ("tick", st.one_of(st.integers(), JSON)),
                       ("reasoning", st.one_of(TEXT, JSON)), (draw(st.text(max_size=200)), JSON)):
        if draw(st.booleans()):
            body[key] = draw(strat)
    return body


@FUZZ
@given(body=json_bodies())
@example(body={"images": {CAMS[0]: GOOD_B64}, "state": HOME.tolist(), "instruction": "go"})
def test_infer_from_json(body: object) -> None:
    r = check_clean(lambda: infer_from_json(body, SPEC))
    if r is not None:
        assert r.obs.state.shape == (PROFILE.state_dim,) and r.obs.images


@FUZZ
@given(body=json_bodies())
def test_infer_from_json_after_a_json_round_trip(body: object) -> None:
    try:
        parsed = json.loads(json.dumps(body))
    except ValueError:
        return
    check_clean(lambda: infer_from_json(parsed, SPEC))


@FUZZ
@given(
    fields=st.dictionaries(st.one_of(st.sampled_from(["instruction", "state", "seed", "deadline_ms", "tick",
                                                      "reasoning", "images"]), st.text(max_size=70)),
                           st.one_of(TEXT, st.sampled_from(["[" * 5000, "[1,2", "1, 2, 3, 4, 5, 6, 7, 8",
                                                            json.dumps(HOME.tolist()), "nan " * 8, "1e999 " * 8])),
                           max_size=8),
    files=st.dictionaries(CAMERA, st.one_of(st.just(_png(10, 12)), st.just(_png(1, 50)), st.binary(max_size=80)),
                          max_size=9),
)
@example(fields={"instruction": "go", "state": " ".join(map(str, HOME.tolist()))}, files={CAMS[0]: _png(10, 12)})
def test_infer_from_form(fields: dict[str, str], files: dict[str, bytes]) -> None:
    r = check_clean(lambda: infer_from_form(fields, files, SPEC))
    if r is not None:
        assert r.obs.state.shape == (PROFILE.state_dim,) and set(r.obs.images) <= set(CAMS)


def test_http_regressions_found_by_fuzzing() -> None:
    """Each was a bare exception (HTTP 500) or a refusal without a field before the fuzz tests."""
    good = {"images": {CAMS[0]: GOOD_B64}, "state": HOME.tolist(), "instruction": "go"}
    form = {"instruction": "go", "state": json.dumps(HOME.tolist())}
    cases = [
        # a JSON integer beyond float64 in the state: OverflowError
        (lambda: infer_from_json(json.loads(json.dumps({**good, "state": [10**400] * 8})), SPEC), "state"),
        (lambda: infer_from_form({**form, "state": json.dumps([10**400] * 8)}, {CAMS[0]: _png(10, 12)}, SPEC),
         "state"),
        # digits int() refuses: ValueError
        (lambda: infer_from_form({**form, "seed": "\u00b2"}, {CAMS[0]: _png(10, 12)}, SPEC), "seed"),
        (lambda: infer_from_form({**form, "tick": "9" * 5000}, {CAMS[0]: _png(10, 12)}, SPEC), "tick"),
        # an empty unknown key: a refusal naming no field
        (lambda: infer_from_json({**good, "": None}, SPEC), "body"),
        (lambda: infer_from_form({**form, "": "x"}, {CAMS[0]: _png(10, 12)}, SPEC), "body"),
    ]
    for call, field in cases:
        try:
            call()
        except ServeError as e:
            assert_clean_serve_error(e)
            assert e.field == field, e
        else:
            raise AssertionError(f"accepted ({field})")
