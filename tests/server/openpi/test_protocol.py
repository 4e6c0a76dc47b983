"""The openpi-compatible endpoint, in-process, with a small independent client (websockets + msgpack):
metadata first, alternation, healthz, errors as a text frame that keeps the connection, Api-Key, the key
mappings, default prompts and the DROID action conversion."""

from __future__ import annotations

import hashlib
import logging

import httpx
import msgpack
import numpy as np
import pytest
from openpikit import RampEngine, RecordingEngine, aloha_obs, decode, droid_obs, encode, eventually, nd
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatvla.fuzzing import exchange, http_status
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT
from chatvla.server.transports.openpi.codec import pack_message, unpack_message
from chatvla.server.transports.openpi.endpoint import MAX_REFUSAL_BODY, MAX_TEXT_FRAMES
from chatvla.server.transports.openpi.mappings import MappingError, load_mapping, preset
from chatvla.wire.limits import DEFAULT_LIMITS


def http_url(app) -> str:
    return app.openpi_url.replace("ws://", "http://")


async def expect_error(ws, *needles: str, good: dict | None = None) -> str:
    """One text frame `CODE: [field: ]message` answers the bad frame; the connection then serves the next
    observation (`good`, an ALOHA one unless given)."""
    frame = await ws.recv()
    assert isinstance(frame, str), frame
    code = frame.split(": ", 1)[0]
    assert code.isupper() and code.replace("_", "").isalpha(), frame
    for n in needles:
        assert n in frame, frame
    await ws.send(encode(aloha_obs() if good is None else good))
    assert isinstance(await ws.recv(), bytes)
    return frame


async def test_metadata_first_then_strict_alternation(openpi_server):
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    async with connect(app.openpi_url + "/any/path", compression=None, max_size=None) as ws:
        first = await ws.recv()
        assert isinstance(first, bytes)
        meta = decode(first)
        assert meta["robot_profile"] == "arx_r5_bimanual"
        assert meta["action_horizon"] == 50 and meta["action_dim"] == 14
        assert meta["mapping"]["name"] == "aloha" and meta["reasoning_key"] == "reasoning"
        replies = []
        for _ in range(3):
            await ws.send(encode(aloha_obs()))
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            replies.append(msgpack.unpackb(frame, raw=False))
    raw = replies[0]["actions"]
    assert set(raw) == {b"__ndarray__", b"data", b"dtype", b"shape"}  # bytes keys, as openpi encodes them
    assert raw[b"dtype"] == "<f4" and raw[b"shape"] == [50, 14]
    actions = decode(encode(replies[0]))["actions"]
    assert actions.shape == (50, 14) and np.isfinite(actions).all()
    for r in replies:
        assert set(r) >= {"actions", "policy_timing", "server_timing", "reasoning"}
        assert "fold the shirt" in r["reasoning"]
        assert {"infer_ms", "queue_ms", "preprocess_ms", "reasoning_ms", "expert_ms", "total_ms"} <= set(
            r["server_timing"])
        assert "infer_ms" in r["policy_timing"]
    assert "prev_total_ms" not in replies[0]["server_timing"]
    assert all("prev_total_ms" in r["server_timing"] for r in replies[1:])
    # the ALOHA mapping: images/cam_high -> cam_top etc. (3xHxW -> HxWx3), cam_low ignored, state as is
    obs = aloha_obs()
    seen = engine.seen[-1]
    assert set(seen.images) == {"cam_top", "cam_left_wrist", "cam_right_wrist"}
    np.testing.assert_array_equal(seen.images["cam_top"], obs["images"]["cam_high"].transpose(1, 2, 0))
    np.testing.assert_array_equal(seen.images["cam_right_wrist"], obs["images"]["cam_right_wrist"].transpose(1, 2, 0))
    np.testing.assert_array_equal(seen.state, obs["state"])
    assert seen.instruction == "fold the shirt"
    assert app.metrics.registry.get_sample_value(
        "chatvla_requests_total", {"transport": "openpi_ws", "outcome": "ok"}) == 3
    await eventually(lambda: app.metrics.registry.get_sample_value("chatvla_active_sessions") == 0)  # closed


async def test_healthz_on_the_same_port(openpi_server):
    app = await openpi_server()
    async with httpx.AsyncClient() as client:
        r = await client.get(http_url(app) + "/healthz")
        assert r.status_code == 200 and r.text == "OK\n"
        r = await client.get(http_url(app) + "/")  # a plain GET that is not an upgrade
        assert r.status_code == 426


@pytest.mark.parametrize("path", ["//[", "//a]/x", "//h:99999/healthz"])
async def test_a_path_urlsplit_would_misread_still_opens_the_websocket(openpi_server, caplog, path):
    """Found by benchmarks/hostile.py: `GET //[` made the handshake raise (urlsplit takes `//` for a network
    location and `[` for a broken IPv6 address), a 500 and a traceback per request; `//h:99999/healthz` was
    taken for the probe."""
    app = await openpi_server()
    async with connect(app.openpi_url + path, compression=None, max_size=None) as ws:
        assert isinstance(await ws.recv(), bytes)  # the metadata frame: an ordinary connection
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_refused_handshake_does_not_echo_a_long_header(openpi_server):
    """Found by benchmarks/hostile.py: websockets' own refusal quoted a 1 KB Sec-WebSocket-Protocol header
    whole; every refusal is bounded (docs/security.md)."""
    app = await openpi_server()
    request = ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: {'p ' * 600}\r\n\r\n").encode()
    answer = await exchange(app.settings.host, app.openpi.port, request, 5.0)
    status, body = http_status(answer)
    assert status == 400 and body.startswith(b"Failed to open a WebSocket connection") and len(body) <= MAX_REFUSAL_BODY
    assert f"Content-Length: {len(body)}\r\n".encode() in answer


async def test_prompt_is_kept_for_the_session_and_hwc_images_work(openpi_server):
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(aloha_obs(chw=False, prompt="stack the cups")))
        assert isinstance(await ws.recv(), bytes)
        await ws.send(encode(aloha_obs(chw=False, prompt=None)))  # no prompt: the session keeps the last one
        assert isinstance(await ws.recv(), bytes)
    assert [o.instruction for o in engine.seen] == ["stack the cups", "stack the cups"]
    assert engine.seen[-1].images["cam_top"].shape == (32, 40, 3)


async def test_droid_mapping_for_franka(openpi_server):
    engine = RampEngine(profile="franka_joint")
    app = await openpi_server(engine)
    obs = droid_obs()
    async with connect(app.openpi_url, compression=None) as ws:
        meta = decode(await ws.recv())
        assert meta["mapping"]["name"] == "droid" and meta["mapping"]["actions"] == "droid"
        assert meta["action_horizon"] == 10 and meta["action_dim"] == 8 and meta["control_rate_hz"] == 15.0
        assert meta["action_space"] == "joint_velocity+gripper_position"
        assert meta["action_names"][0] == "joint1_velocity" and meta["action_names"][7] == "gripper_position"
        assert "3 rad/s" in meta["action_units"][0] and "1 = closed" in meta["action_units"][7]
        await ws.send(encode(obs))
        reply = unpack_message(await ws.recv(), DEFAULT_LIMITS)  # our codec, as openpi-client decodes it
    seen = engine.seen[-1]
    np.testing.assert_array_equal(seen.images["front"], obs["observation/exterior_image_1_left"])
    np.testing.assert_array_equal(seen.images["wrist"], obs["observation/wrist_image_left"])
    # DROID's gripper_position is 0..1 with 1 = closed; our state holds the width in metres
    expected = np.concatenate([obs["observation/joint_position"], [0.08 * (1 - 0.25)]])
    np.testing.assert_allclose(seen.state, expected.astype(np.float32), atol=1e-7)
    assert seen.state.dtype == np.float32
    # the reply: joint velocities in DROID's unit (rad/s / 3) at 15 Hz, gripper as closed fraction
    actions = reply["actions"]
    assert actions.shape == (10, 8) and actions.dtype == np.float32
    np.testing.assert_allclose(actions[:, :7], np.tile(RampEngine.RAMP * 15 / 3.0, (10, 1)), atol=1e-4)
    np.testing.assert_allclose(actions[:, 7], 1 - RampEngine.GRIPPER_WIDTH / 0.08, atol=1e-6)


def test_droid_actions_resample_to_the_client_rate():
    """A chunk at another rate is resampled to DROID's 15 Hz: velocities in rad/s stay the same."""
    from dataclasses import replace as dc_replace

    profile = dc_replace(FRANKA_JOINT, control_rate_hz=30.0, chunk_size=20)
    out = preset("droid", profile).actions
    state = np.array([0.0, -0.5, 0.0, -2.0, 0.0, 1.5, 0.5, 0.08], np.float32)
    ticks = np.arange(1, 21)[:, None]
    chunk = np.hstack([state[:7] + ticks * 0.01, np.full((20, 1), 0.0)]).astype(np.float32)  # 0.3 rad/s
    a = out.convert(chunk, state, profile)
    assert out.rows(profile) == 10 and a.shape == (10, 8)  # 20 ticks at 30 Hz = 10 at 15 Hz
    np.testing.assert_allclose(a[:, :7], 0.3 / 3.0, atol=1e-5)
    np.testing.assert_allclose(a[:, 7], 1.0)  # width 0: closed
    assert preset("native", profile).actions.convert(chunk, state, profile) is not None


async def test_custom_mapping_file(openpi_server, tmp_path):
    mapping = tmp_path / "lab.yaml"
    mapping.write_text(
        "name: lab\n"
        "images:\n"
        "  - {key: cams/top, camera: front}\n"
        "  - {key: [cams, hand.left], camera: wrist, optional: true}\n"
        "state:\n"
        "  - {key: q, size: 7}\n"
        "  - {key: grip, size: 1}\n"
        "prompt: task.text\n"
        "default_prompt: tidy up\n"
        "metadata: {reset_pose: [0, 0, 0, 0, 0, 0, 0, 0]}\n"
    )
    engine = RecordingEngine(profile="franka_joint")
    app = await openpi_server(engine, openpi_mapping=str(mapping))
    img = np.full((16, 16, 3), 7, np.uint8)
    async with connect(app.openpi_url, compression=None) as ws:
        meta = decode(await ws.recv())
        assert meta["mapping"]["name"] == "lab" and meta["reset_pose"] == [0] * 8
        await ws.send(encode({"cams/top": img, "q": np.zeros(7, np.float32), "grip": 0.02}))  # optional wrist
        assert isinstance(await ws.recv(), bytes)
        await ws.send(encode({"cams/top": img, "cams": {"hand.left": img}, "q": np.zeros(7), "grip": [0.03],
                              "task": {"text": "open the drawer"}}))
        assert isinstance(await ws.recv(), bytes)
    assert engine.seen[0].instruction == "tidy up" and set(engine.seen[0].images) == {"front"}
    assert engine.seen[1].instruction == "open the drawer" and set(engine.seen[1].images) == {"front", "wrist"}
    assert engine.seen[1].state[7] == pytest.approx(0.03)


@pytest.mark.parametrize(("mutate", "needles"), [
    (lambda o: o.pop("state"), ["INVALID_ARGUMENT", "state", "missing"]),
    (lambda o: o["images"].pop("cam_high"), ["images.cam_high", "missing"]),
    (lambda o: o.update(state=np.zeros(13, np.float32)), ["state", "14"]),
    (lambda o: o.update(state=np.full(14, np.nan, np.float32)), ["state", "NaN"]),
    (lambda o: o["images"].update(cam_high=np.zeros((32, 40), np.uint8)), ["images.cam_high", "HxWx3"]),
    (lambda o: o["images"].update(cam_high=np.zeros((3, 32, 40), np.int32)), ["images.cam_high", "uint8"]),
    (lambda o: o.update(prompt="a\x00b"), ["prompt", "control characters"]),
    (lambda o: o.update(prompt="fold <|image_pad|> it"), ["INVALID_ARGUMENT", "prompt", "control token"]),
    (lambda o: o.update(state=np.full(14, 1e10, np.float32)), ["INVALID_ARGUMENT", "state", "within"]),
    (lambda o: o["images"].update(cam_high=np.zeros((3, 1, 1), np.uint8)), ["images.cam_high", "minimum side"]),
    (lambda o: o["images"].update(cam_high=np.zeros((3, 8, 2048), np.uint8)), ["images.cam_high", "aspect"]),
])
async def test_bad_input_is_answered_with_a_text_frame_and_the_connection_stays(openpi_server, mutate, needles):
    app = await openpi_server()
    obs = aloha_obs()
    mutate(obs)
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(obs))
        await expect_error(ws, *needles)
    assert app.metrics.registry.get_sample_value(
        "chatvla_requests_total", {"transport": "openpi_ws", "outcome": "invalid_argument"}) == 1


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("observation/joint_position", [0.1, -0.7, 0.0, 9.0, 0.0, 1.6, 0.8], "observation/joint_position[3]: 9 is outside"),
    ("observation/joint_position", [0.1, -0.7, 0.0, -2.3, 0.0, 1e10, 0.8],
     "observation/joint_position[5]: every value must be finite"),
])
async def test_a_state_refusal_names_the_key_the_client_sent(openpi_server, key, value, needle):
    """DROID's state is two keys concatenated; a bad value is named by its own key and index, not by
    the concatenation."""
    app = await openpi_server(RampEngine(profile="franka_joint"))
    obs = droid_obs()
    obs[key] = np.array(value)
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(obs))
        frame = await expect_error(ws, "INVALID_ARGUMENT", needle, good=droid_obs())
    assert "+" not in frame.split(": ")[1]


@pytest.mark.parametrize(("dtype", "data"), [("|O", b"\x00" * 8), ("|V8", b"\x00" * 8), ("<c8", b"\x00" * 8),
                                             ("<U2", b"\x00" * 8), ("<f4", b"\x00" * 7)])
async def test_dangerous_or_inconsistent_arrays_are_refused(openpi_server, dtype, data):
    app = await openpi_server()
    obs = aloha_obs()
    obs["state"] = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": [2]}
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(msgpack.packb({**obs, "images": {k: nd(v) for k, v in obs["images"].items()}},
                                    use_bin_type=True))
        await expect_error(ws, "INVALID_ARGUMENT")


@pytest.mark.parametrize(("dtype", "value"), [("|u1", 300), ("<i1", -129), ("<i2", 40000), ("|u1", -1)])
async def test_numpy_scalar_that_overflows_its_dtype_is_invalid_argument(openpi_server, dtype, value):
    app = await openpi_server()
    obs = aloha_obs()
    obs["extra"] = {b"__npgeneric__": True, b"data": value, b"dtype": dtype}
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(obs))
        await expect_error(ws, "INVALID_ARGUMENT", "scalar")
    assert app.metrics.registry.get_sample_value(
        "chatvla_requests_total", {"transport": "openpi_ws", "outcome": "invalid_argument"}) == 1


@pytest.mark.parametrize("frame", ["a text frame", b"\xc1not msgpack", msgpack.packb([1, 2, 3]),
                                   msgpack.packb({"x": msgpack.ExtType(5, b"ab")})])
async def test_malformed_frames(openpi_server, frame):
    app = await openpi_server()
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(frame)
        await expect_error(ws, "INVALID_ARGUMENT")


async def test_a_flood_of_text_frames_closes_the_connection(openpi_server):
    """Protocol breakage, not a bad observation: a peer that only sends text is closed with 1003."""
    app = await openpi_server()
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        for _ in range(MAX_TEXT_FRAMES):
            await ws.send("hello")
            assert (await ws.recv()).startswith("INVALID_ARGUMENT: message:")
        await ws.send("hello")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1003


async def test_errors_do_not_end_the_session(openpi_server):
    """Bad, good, bad, good on one connection: every frame gets its own answer, the prompt is kept."""
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(aloha_obs(prompt="stack the cups")))
        assert isinstance(await ws.recv(), bytes)
        for _ in range(2):
            bad = aloha_obs(prompt=None)
            bad["images"].pop("cam_high")
            await ws.send(encode(bad))
            assert (await ws.recv()).startswith("INVALID_ARGUMENT: images.cam_high: missing")
            await ws.send(encode(aloha_obs(prompt=None)))
            assert isinstance(await ws.recv(), bytes)
    assert [o.instruction for o in engine.seen] == ["stack the cups"] * 3
    registry = app.metrics.registry
    assert registry.get_sample_value("chatvla_requests_total", {"transport": "openpi_ws", "outcome": "ok"}) == 3
    assert registry.get_sample_value(
        "chatvla_requests_total", {"transport": "openpi_ws", "outcome": "invalid_argument"}) == 2


async def test_aloha_without_prompt_uses_the_default_prompt(openpi_server):
    """openpi's ALOHA environments send no prompt; the aloha mapping has a default, and the setting wins."""
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    async with connect(app.openpi_url, compression=None) as ws:
        meta = decode(await ws.recv())
        assert meta["mapping"]["default_prompt"] == "fold the towel"
        await ws.send(encode(aloha_obs(prompt=None)))
        assert isinstance(await ws.recv(), bytes)
    assert engine.seen[-1].instruction == "fold the towel"
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine, openpi_default_prompt="sort the blocks")
    async with connect(app.openpi_url, compression=None) as ws:
        assert decode(await ws.recv())["mapping"]["default_prompt"] == "sort the blocks"
        await ws.send(encode(aloha_obs(prompt=None)))
        assert isinstance(await ws.recv(), bytes)
    assert engine.seen[-1].instruction == "sort the blocks"


async def test_empty_default_prompt_makes_the_prompt_required(openpi_server):
    app = await openpi_server(openpi_default_prompt="")
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(aloha_obs(prompt=None)))
        await expect_error(ws, "INVALID_ARGUMENT: prompt:", "required")


async def test_float_and_jpeg_images_are_accepted(openpi_server):
    import io

    from PIL import Image

    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    obs = aloha_obs(chw=False)
    obs["images"]["cam_high"] = np.full((32, 40, 3), 0.5, np.float32)  # openpi transforms accept [0, 1] floats
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 40, 3), 200, np.uint8)).save(buf, format="JPEG")
    obs["images"]["cam_left_wrist"] = buf.getvalue()  # our extension: an encoded JPEG/PNG file as bytes
    async with connect(app.openpi_url, compression=None) as ws:
        await ws.recv()
        await ws.send(encode(obs))
        assert isinstance(await ws.recv(), bytes)
    seen = engine.seen[-1]
    assert seen.images["cam_top"].dtype == np.uint8 and int(seen.images["cam_top"][0, 0, 0]) == 128
    assert abs(int(seen.images["cam_left_wrist"][0, 0, 0]) - 200) <= 3


async def test_api_key_is_required_when_tokens_are_configured(openpi_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"aloha-01 sha256:{hashlib.sha256(b'secret-token').hexdigest()}\n")
    app = await openpi_server(tokens_file=tokens)
    for headers in (None, {"Authorization": "Api-Key wrong"}, {"Authorization": "Basic c2VjcmV0"}):
        with pytest.raises(InvalidStatus) as e:
            async with connect(app.openpi_url, additional_headers=headers):
                pass
        assert e.value.response.status_code == 401
    async with connect(app.openpi_url, additional_headers={"Authorization": "Api-Key secret-token"}) as ws:
        assert decode(await ws.recv())["robot_profile"] == "arx_r5_bimanual"
        await ws.send(encode(aloha_obs()))
        assert isinstance(await ws.recv(), bytes)
    async with httpx.AsyncClient() as client:  # probes stay open
        assert (await client.get(http_url(app) + "/healthz")).status_code == 200
    assert app.metrics.registry.get_sample_value("chatvla_rejected_total", {"reason": "unauthenticated"}) == 3
    twice = [("Authorization", "Api-Key secret-token"), ("Authorization", "Api-Key secret-token")]
    with pytest.raises(InvalidStatus) as e:  # two headers are ambiguous: refused, never a 500
        async with connect(app.openpi_url, additional_headers=twice):
            pass
    assert e.value.response.status_code == 401


async def test_ready_line_and_shutdown_close_connections(openpi_server):
    app = await openpi_server()
    assert f" openpi={app.openpi_url} " in app.ready_line() + " "
    ws = await connect(app.openpi_url, compression=None)
    await ws.recv()
    await app.shutdown()
    with pytest.raises(Exception):  # noqa: B017 - closed with 1001 going away, whatever the exception type
        await ws.recv()
    assert ws.close_code == 1001


async def test_mapping_that_does_not_fit_the_profile_fails_start_up(tmp_path):
    from openpikit import start

    with pytest.raises(MappingError, match="aloha"):
        await start(RecordingEngine(profile="franka_joint"), openpi_mapping="aloha")
    with pytest.raises(MappingError, match="neither a preset"):
        await start(RecordingEngine(profile="franka_joint"), openpi_mapping=str(tmp_path / "missing.yaml"))


def test_mapping_presets_and_checks(tmp_path):
    assert load_mapping(None, ARX_R5_BIMANUAL).name == "aloha"
    assert load_mapping(None, FRANKA_JOINT).name == "droid"
    from chatvla.profiles import FRANKA_EE

    assert load_mapping(None, FRANKA_EE).name == "native"
    assert preset("native", FRANKA_EE).required_cameras == FRANKA_EE.camera_names
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: [{key: a, camera: nope}]\nstate: [{key: s, size: 8}]\n")
    with pytest.raises(MappingError, match="nope"):
        load_mapping(str(bad), FRANKA_JOINT)
    bad.write_text("images: [{key: a, camera: front}]\nstate: [{key: s, size: 5}]\n")
    with pytest.raises(MappingError, match="add up to 5"):
        load_mapping(str(bad), FRANKA_JOINT)
    bad.write_text("images: [{key: a, camera: front}]\nstate: [s]\nbogus: 1\n")
    with pytest.raises(MappingError, match="bogus"):
        load_mapping(str(bad), FRANKA_JOINT)
    bad.write_text("images: [{key: a, camera: front}]\nstate: [{key: q, size: 7, unit: closed_fraction}, g]\n")
    with pytest.raises(MappingError, match="gripper"):
        load_mapping(str(bad), FRANKA_JOINT)
    bad.write_text("images: [{key: a, camera: cam_top}]\nstate: [{key: s, size: 14}]\nactions: droid\n")
    with pytest.raises(MappingError, match="droid actions"):
        load_mapping(str(bad), ARX_R5_BIMANUAL)
    good = tmp_path / "good.yaml"
    good.write_text("images: [{key: a, camera: front}]\nstate: [{key: q, size: 7}, {key: g, size: 1, unit: "
                    "closed_fraction}]\nactions: {kind: droid, horizon: 4}\n")
    m = load_mapping(str(good), FRANKA_JOINT)
    assert m.actions.rows(FRANKA_JOINT) == 4 and m.actions.rate(FRANKA_JOINT) == 15.0
    assert m.default_prompt == "" and preset("aloha", ARX_R5_BIMANUAL).default_prompt == "fold the towel"


def test_codec_round_trip_and_limits():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = unpack_message(pack_message({"a": a, "s": np.float32(2.5), "t": "x"}), DEFAULT_LIMITS)
    np.testing.assert_array_equal(out["a"], a)
    assert out["s"] == 2.5 and isinstance(out["s"], np.float32) and out["t"] == "x"
    with pytest.raises(TypeError):
        pack_message({"a": np.zeros(2, np.complex64)})
    with pytest.raises(Exception, match="exceed"):
        from chatvla.wire import Limits

        unpack_message(b"\x00" * 2048, Limits(max_message_bytes=1024))
