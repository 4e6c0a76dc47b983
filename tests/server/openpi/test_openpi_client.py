"""Our openpi endpoint driven by the real `openpi-client` 0.1.2 from PyPI.

openpi-client pins numpy<2 and imports typing_extensions without declaring it, so it lives in its own
venv (`bash scripts/setup_openpi_venv.sh` -> .venv-openpi) and runs as a subprocess; these tests skip
with that instruction when the venv is absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from openpikit import RampEngine, RecordingEngine

ROOT = Path(__file__).resolve().parents[3]
OPENPI_PYTHON = Path(os.environ.get("CHATVLA_OPENPI_PYTHON", ROOT / ".venv-openpi" / "bin" / "python"))
DRIVER = Path(__file__).with_name("drive_openpi_client.py")

pytestmark = pytest.mark.skipif(
    not OPENPI_PYTHON.exists(),
    reason=f"{OPENPI_PYTHON} not found: run `bash scripts/setup_openpi_venv.sh` (openpi-client 0.1.2, numpy<2)",
)


async def drive(url: str, style: str, key: str | None = None) -> dict:
    args = [str(OPENPI_PYTHON), str(DRIVER), url, style] + ([key] if key else [])
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except asyncio.TimeoutError:
        proc.kill()
        raise
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_aloha_client(openpi_server):
    engine = RecordingEngine(profile="arx_r5_bimanual")
    app = await openpi_server(engine)
    r = await drive(app.openpi_url, "aloha")
    assert r["metadata"]["robot_profile"] == "arx_r5_bimanual" and r["metadata"]["action_horizon"] == 50
    assert r["shape"] == [50, 14] and r["dtype"] == "float32" and r["finite"]
    assert {"actions", "policy_timing", "server_timing", "reasoning"} <= set(r["keys"])
    assert "stack the cups" in r["reasoning"]
    assert r["second_has_prev_total"] and "infer_ms" in r["server_timing"]
    assert r["broker_step_shape"] == [14] and r["broker_steps"] == 52
    assert r["codec_ok"]
    # a bad observation: openpi-client raises RuntimeError with our text frame, and the connection stays
    assert r["error"].startswith("Error in inference server:\nINVALID_ARGUMENT: images.cam_high: missing")
    assert r["after_error_shape"] == [50, 14]
    seen = engine.seen[0]
    assert set(seen.images) == {"cam_top", "cam_left_wrist", "cam_right_wrist"}
    assert seen.images["cam_top"].shape == (224, 224, 3)


async def test_aloha_client_without_prompt_gets_the_default(openpi_server):
    """openpi's ALOHA environments send no prompt: the aloha mapping's default prompt applies."""
    app = await openpi_server(RecordingEngine(profile="arx_r5_bimanual"))
    r = await drive(app.openpi_url, "aloha-no-prompt")
    assert r["shape"] == [50, 14] and "fold the towel" in r["reasoning"]
    assert r["metadata"]["mapping"]["default_prompt"] == "fold the towel"


async def test_droid_client(openpi_server):
    """What openpi's DROID example executes: 10 rows of 7 joint velocities (1.0 = 3 rad/s, 15 Hz) and a
    gripper command in 0..1 (1 = closed)."""
    app = await openpi_server(RampEngine(profile="franka_joint"))
    r = await drive(app.openpi_url, "droid")
    meta = r["metadata"]
    assert meta["mapping"]["name"] == "droid" and meta["action_space"] == "joint_velocity+gripper_position"
    assert meta["action_horizon"] == 10 and meta["control_rate_hz"] == 15.0 and len(meta["action_units"]) == 8
    assert r["shape"] == [10, 8] and r["dtype"] == "float32"  # the example asserts (10, 8)
    assert r["broker_step_shape"] == [8] and r["after_error_shape"] == [10, 8]
    actions = np.array(r["actions"])
    np.testing.assert_allclose(actions[:, :7], np.tile(RampEngine.RAMP * 15 / 3.0, (10, 1)), atol=1e-4)
    np.testing.assert_allclose(actions[:, 7], 1 - RampEngine.GRIPPER_WIDTH / 0.08, atol=1e-6)


async def test_api_key(openpi_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"aloha-01 sha256:{hashlib.sha256(b'open-sesame').hexdigest()}\n")
    app = await openpi_server(tokens_file=tokens)
    ok = await drive(app.openpi_url, "aloha", "open-sesame")
    assert ok["shape"] == [50, 14]
    refused = await drive(app.openpi_url, "connect-only", "wrong")
    assert "401" in refused["connect_error"]
    refused = await drive(app.openpi_url, "connect-only")
    assert "401" in refused["connect_error"]

