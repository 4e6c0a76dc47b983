"""NullEngine and the engine loader; the real tiny model end to end once it exists (slow)."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from serverkit import PROFILE, state_vec

from chatvla.engines.base import ActItem, EngineObservation, ReasonItem
from chatvla.engines.loader import EngineLoadError, load_engine
from chatvla.engines.null import NullEngine
from chatvla.profiles import ARX_R5_BIMANUAL
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import encode_image, tensor_from_proto, tensor_to_proto


def test_null_engine_is_deterministic_and_in_bounds():
    e = NullEngine()
    a, b, c = e.actions_for(state_vec(), 1), e.actions_for(state_vec(), 1), e.actions_for(state_vec(), 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (PROFILE.chunk_size, PROFILE.action_dim) and a.dtype == np.float32
    assert (a >= np.asarray(PROFILE.action_lower, np.float32)).all()
    assert (a <= np.asarray(PROFILE.action_upper, np.float32)).all()
    obs = EngineObservation(images={"front": np.zeros((4, 4, 3), np.uint8)}, state=state_vec(), instruction="go")
    [r] = e.reason_batch([ReasonItem(e.preprocess(obs))])
    assert r.decoded and "go" in r.text
    [r2] = e.reason_batch([ReasonItem(e.preprocess(obs), reasoning="cached")])
    assert not r2.decoded and r2.text == "cached"
    [acts] = e.act_batch([ActItem(r, state_vec(), 1)])
    np.testing.assert_array_equal(acts, a)


def test_loader():
    e = load_engine("tiny", "null", profile="arx_r5_bimanual", reason_ms=0)
    assert isinstance(e, NullEngine) and e.info.profile == ARX_R5_BIMANUAL
    with pytest.raises(EngineLoadError, match="unknown engine"):
        load_engine("tiny", "onnx")
    with pytest.raises(EngineLoadError, match="null engine"):
        load_engine("tiny", "null", profile="kuka")
    with pytest.raises(EngineLoadError, match="null engine"):
        load_engine("tiny", "null", colour="red")


def _requests_for(profile):
    """Infer and Stream messages shaped for `profile` (the tiny model's may differ from the default)."""
    images = [encode_image(np.full((c.height, c.width, 3), 90, np.uint8), c.name) for c in profile.cameras]
    state = tensor_to_proto(np.asarray(profile.home or [0.0] * profile.state_dim, np.float32))
    infer = pb.InferRequest(images=images, state=state, instruction="pick up the red block", seed=3)
    start = pb.StreamRequest(start=pb.SessionStart(robot_profile=profile.name, instruction="pick up the red block"))

    def obs(seq: int) -> pb.StreamRequest:
        return pb.StreamRequest(observation=pb.Observation(seq=seq, tick=seq, images=images, state=state, seed=seq))

    return infer, start, obs


@pytest.mark.slow
async def test_tiny_model_stream_and_infer_end_to_end(serve):
    pytest.importorskip("chatvla.engines.torch_engine", reason="the torch engine is not there yet")
    engine = load_engine("tiny", "torch")
    profile = engine.info.profile
    infer, start, obs = _requests_for(profile)
    srv = await serve(engine=engine)
    resp = await srv.stub.Infer(infer)
    actions = tensor_from_proto(resp.chunk.actions, field="a", dtype=np.float32)
    assert actions.shape == (profile.chunk_size, profile.action_dim)
    assert np.isfinite(actions).all() and resp.chunk.reasoning_refreshed
    call = srv.stub.Stream()
    await call.write(start)
    info = (await call.read()).session
    assert info.model.engine == engine.info.engine
    for seq in (1, 2):
        await call.write(obs(seq))
        resp = await call.read()
        assert resp.WhichOneof("msg") == "chunk", resp
        assert resp.chunk.seq == seq and resp.chunk.timings.reasoning_ms > 0 and resp.chunk.timings.expert_ms > 0
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    # The debug page sends one camera only, as multipart.
    cam = profile.cameras[0]
    buf = io.BytesIO()
    Image.fromarray(np.full((cam.height, cam.width, 3), 60, np.uint8)).save(buf, format="PNG")
    state = ",".join(str(x) for x in (profile.home or [0.0] * profile.state_dim))
    r = await srv.http.post("/v1/infer", files={cam.name: ("f.png", buf.getvalue(), "image/png")},
                            data={"instruction": "pick up the red block", "state": state})
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["actions"]).shape == (profile.chunk_size, profile.action_dim)


def test_torch_engine_refuses_options_it_does_not_take():
    """A vLLM-only option or a typo given to the torch engine is an error naming it, not silently ignored."""
    with pytest.raises(EngineLoadError, match="max_model_len"):
        load_engine("tiny", "torch", max_model_len=512)
    with pytest.raises(EngineLoadError, match="dtype"):
        load_engine("tiny", "torch", dtype="float8")
