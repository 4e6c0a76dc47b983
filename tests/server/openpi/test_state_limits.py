"""State limits on the openpi websocket: the same validation.StateBounds as gRPC and HTTP (see
tests/server/test_state_limits.py), answered with a text frame naming the state key and index; the
connection then serves the next observation."""

from __future__ import annotations

import numpy as np
from openpikit import RecordingEngine, aloha_obs, droid_obs, encode
from websockets.asyncio.client import connect


async def refused(ws, obs: dict) -> str:
    await ws.send(encode(obs))
    frame = await ws.recv()
    assert isinstance(frame, str), frame
    return frame


async def test_aloha_state_outside_the_profile_is_refused_by_index(openpi_server):
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    async with connect(app.openpi_url, compression=None) as ws:
        assert isinstance(await ws.recv(), bytes)  # metadata
        obs = aloha_obs()
        obs["state"] = obs["state"].copy()
        obs["state"][3] = np.degrees(1.5)  # a wrist joint in degrees: the ARX limit is 1.6 rad
        frame = await refused(ws, obs)
        assert frame.startswith("INVALID_ARGUMENT: state[3]: "), frame
        assert "left_joint4" in frame and len(frame.encode()) <= 1024
        await ws.send(encode(aloha_obs()))  # the connection carries on
        assert isinstance(await ws.recv(), bytes)
    assert len(engine.seen) == 1  # the refused state never reached the engine


async def test_droid_state_outside_the_profile_is_refused(openpi_server):
    engine = RecordingEngine(profile="franka_joint")
    app = await openpi_server(engine)
    async with connect(app.openpi_url, compression=None) as ws:
        assert isinstance(await ws.recv(), bytes)
        obs = droid_obs()
        obs["observation/joint_position"] = np.array([0.1, -0.7, 0.0, 2.3, 0.0, 1.6, 0.8])  # joint4 sign flipped
        frame = await refused(ws, obs)
        assert frame.startswith("INVALID_ARGUMENT: ") and "[3]: " in frame and "joint4" in frame, frame
        await ws.send(encode(droid_obs()))
        assert isinstance(await ws.recv(), bytes)
