"""State limits from the robot profile and the checkpoint's statistics (validation.StateBounds): refused
with INVALID_ARGUMENT naming the field and the index, on gRPC Infer, a Stream (in-band, the stream goes
on) and HTTP (JSON and multipart); the openpi websocket is in tests/server/openpi/test_state_limits.py."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image
from serverkit import CAMERAS, PROFILE, infer_request, observation, state_vec

from chatvla.engines.base import StateStats
from chatvla.engines.null import NullEngine
from chatvla.server.errors import ServeError
from chatvla.server.validation import InputSpec, StateBounds, infer_from_proto
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import tensor_to_proto
from chatvla.wire.limits import Limits
from chatvla.wire.vocabulary import FIELD_METADATA_KEY

LO = np.asarray(PROFILE.action_lower, np.float32)
HI = np.asarray(PROFILE.action_upper, np.float32)
SPAN = HI - LO
J = 3  # joint4 of the Panda: [-3.0718, -0.0698]


def png(h: int = 24, w: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def with_value(i: int, v: float) -> np.ndarray:
    s = state_vec().copy()
    s[i] = v
    return s


class StatsEngine(NullEngine):
    """A NullEngine whose info carries checkpoint statistics (as TorchEngine and VllmEngine do)."""

    def __init__(self, stats: StateStats) -> None:
        super().__init__()
        self._info = dataclasses.replace(self._info, state_stats=stats)


def test_bounds_from_the_profile_and_the_stats():
    b = InputSpec(PROFILE, Limits()).state_bounds
    np.testing.assert_allclose(b.lower, LO - 0.1 * SPAN, rtol=1e-6)
    np.testing.assert_allclose(b.upper, HI + 0.1 * SPAN, rtol=1e-6)
    # A narrow std tightens only its index; a degenerate std is floored at 1% of the range (so 50 sigma
    # is at least half the range); stats that leave no room inside the profile's bound are ignored.
    std = [1.0] * PROFILE.state_dim
    std[0], std[1] = 0.1, 0.0
    mean = [0.0] * PROFILE.state_dim
    mean[0], mean[2] = 2.0, 1e3
    b = StateBounds.build(PROFILE, Limits(), StateStats(tuple(mean), tuple(std)))
    assert (b.lower[0], b.upper[0]) == pytest.approx((2.0 - 5.0, HI[0] + 0.1 * SPAN[0]))
    assert (b.lower[1], b.upper[1]) == pytest.approx((-0.5 * SPAN[1], 0.5 * SPAN[1]))
    assert (b.lower[2], b.upper[2]) == pytest.approx((LO[2] - 0.1 * SPAN[2], HI[2] + 0.1 * SPAN[2]))
    assert "standard deviations" in b.why[0] and "profile" in b.why[2]


def test_torch_engine_reports_its_checkpoint_stats():
    pytest.importorskip("torch")
    from chatvla.engines.torch_engine import TorchEngine
    from chatvla.model import build_model
    from chatvla.model.presets import tiny

    model = build_model(tiny())
    stats = TorchEngine(model).info.state_stats
    assert stats is not None
    assert (stats.mean, stats.std) == (model.stats.state_mean, model.stats.state_std)


def test_validation_refuses_by_index():
    spec = InputSpec(PROFILE, Limits())
    ok = with_value(J, float(HI[J] + 0.09 * SPAN[J]))  # within the 10% margin: a real arm's overshoot
    infer_from_proto(infer_request(state=tensor_to_proto(ok)), spec)
    for v in (HI[J] + 0.11 * SPAN[J], LO[J] - 0.11 * SPAN[J]):
        with pytest.raises(ServeError) as e:
            infer_from_proto(infer_request(state=tensor_to_proto(with_value(J, float(v)))), spec)
        assert e.value.field == f"state[{J}]" and "joint4" in e.value.message
    degrees = np.degrees(state_vec()).astype(np.float32)  # the classic: degrees for radians
    with pytest.raises(ServeError) as e:
        infer_from_proto(infer_request(state=tensor_to_proto(degrees)), spec)
    assert e.value.field == "state[1]"  # joint1 is 0 rad = 0 degrees; joint2 (-0.785 rad) is the first out


async def test_grpc_infer_and_stream(serve):
    srv = await serve()
    bad = with_value(J, 10.0)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await srv.stub.Infer(infer_request(state=tensor_to_proto(bad)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())[FIELD_METADATA_KEY] == f"state[{J}]"
    assert "10 is outside" in e.value.details()
    call, _ = await srv.open_stream()
    obs = observation(1)
    obs.state.CopyFrom(tensor_to_proto(bad))
    await call.write(pb.StreamRequest(observation=obs))
    resp = await call.read()
    assert resp.WhichOneof("msg") == "error", resp
    assert (resp.error.code, resp.error.field) == (pb.INVALID_ARGUMENT, f"observation.state[{J}]")
    await call.write(pb.StreamRequest(observation=observation(2)))  # the stream carries on
    assert (await call.read()).WhichOneof("msg") == "chunk"
    await call.done_writing()


async def test_grpc_refuses_by_the_checkpoint_stats(serve):
    std = [1.0] * PROFILE.state_dim
    mean = [0.0] * PROFILE.state_dim
    mean[0], std[0] = 2.0, 0.02  # joint1 stayed near 2 rad in training: floored std 0.058, 50 sigma 2.9 rad
    srv = await serve(engine=StatsEngine(StateStats(tuple(mean), tuple(std))))
    with pytest.raises(grpc.aio.AioRpcError) as e:  # inside the joint's limits, far from anything trained
        await srv.stub.Infer(infer_request(state=tensor_to_proto(with_value(0, -1.0))))
    assert dict(e.value.trailing_metadata())[FIELD_METADATA_KEY] == "state[0]"
    assert "standard deviations" in e.value.details()
    assert (await srv.stub.Infer(infer_request(state=tensor_to_proto(with_value(0, -0.8))))).chunk.actions.data


async def test_http_json_and_multipart(serve):
    srv = await serve()
    image = base64.b64encode(png()).decode()
    body = {"images": {CAMERAS[0]: image}, "state": with_value(J, -5.0).tolist(), "instruction": "go"}
    r = await srv.http.post("/v1/infer", json=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == f"state[{J}]", r.text
    assert r.json()["error"]["code"] == "INVALID_ARGUMENT"
    r = await srv.http.post("/v1/infer", files={CAMERAS[0]: ("a.png", png(), "image/png")},
                            data={"instruction": "go", "state": json.dumps(with_value(7, 1.0).tolist())})
    assert r.status_code == 422 and r.json()["error"]["field"] == "state[7]", r.text  # a 0..1 gripper on metres
    assert (await srv.http.post("/v1/infer", json={**body, "state": state_vec().tolist()})).status_code == 200
