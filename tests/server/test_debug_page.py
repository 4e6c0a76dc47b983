"""The debug page's server side, without a browser: what /v1/model gives the page (cameras, home pose,
limits, units, model card), the favicon, and the rendered-sample endpoint with and without the sim.
The page itself, in a real browser, is tests/server/test_debug_page_browser.py."""

from __future__ import annotations

import importlib.util
import io
import re

import pytest
from PIL import Image
from serverkit import CAMERAS, PROFILE

from chatvla.engines.null import NullEngine
from chatvla.profiles import FRANKA_EE
from chatvla.server.auth import hash_token
from chatvla.server.sample_scene import SampleScenes, SampleUnavailable

TOKEN = "debug-page-token"


async def test_model_info_gives_the_page_cameras_home_limits_units_and_card(serve):
    srv = await serve()
    info = (await srv.http.get("/v1/model")).json()
    p = info["profile"]
    assert [c["name"] for c in p["cameras"]] == list(CAMERAS) == ["front", "wrist"]
    assert p["home"] == pytest.approx(list(PROFILE.home))
    assert p["action_lower"] == pytest.approx(list(PROFILE.action_lower))
    assert p["action_upper"] == pytest.approx(list(PROFILE.action_upper))
    assert p["action_units"] == ["rad"] * 7 + ["m"]
    # The home pose is inside the limits (zeros, the old default, are not: joint 4 must be negative).
    assert all(lo <= h <= hi for lo, h, hi in zip(p["action_lower"], p["home"], p["action_upper"]))
    assert not p["action_lower"][3] <= 0.0 <= p["action_upper"][3]
    card = info["card"]
    assert card["trained"] is False and card["basis"] == "null engine" and card["eval"] is None


def test_units_follow_the_action_space():
    assert FRANKA_EE.action_units == ("m", "m", "m", "", "", "", "", "", "", "m")


async def test_page_builds_one_file_input_per_camera_of_the_served_profile(serve):
    """The page is static (it holds no server data, docs/security.md), so its camera inputs are built
    by its script from /v1/model; here: the one template it clones, and what it clones it for. The
    browser test counts the inputs in the live page."""
    srv = await serve()
    html = (await srv.http.get("/")).text
    assert html.count('type="file"') == 1 and 'id="camera-template"' in html
    assert "buildCameras(profile.cameras)" in html and "cameras.forEach(" in html
    assert 'id="camera"' not in html  # the old single input + camera select is gone
    for needle in ('id="sample"', "use a rendered sample scene", "/debug/sample", 'id="stale-banner"',
                   "stale: last request failed", "resetState()", "profile.home", "action_units",
                   'class: "limit"', '"stroke-dasharray"', "state-marker", 'id="trained"', "card.eval",
                   'rel="icon"'):
        assert needle in html, needle
    # No figures of any model are written into the page: they come from /v1/model's card.
    assert not re.search(r"\d+/50\b", html)


async def test_favicon_is_served_without_auth(serve, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"panda {hash_token(TOKEN)}\n")
    srv = await serve(tokens_file=tokens)
    r = await srv.http.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert r.content.startswith(b"<svg") and len(r.content) < 1024
    # The sample endpoint is behind the same auth as /v1/model.
    assert (await srv.http.get("/debug/sample")).status_code == 401
    assert (await srv.http.get("/debug/sample", params={"camera": "front"})).status_code == 401
    ok = await srv.http.get("/debug/sample", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["cameras"] == list(CAMERAS)


async def test_sample_is_404_with_a_reason_when_the_profile_has_no_sim(serve):
    srv = await serve(engine=NullEngine(profile=FRANKA_EE.name))
    probe = (await srv.http.get("/debug/sample")).json()
    assert probe["available"] is False and "no simulated scene for profile franka_ee" in probe["reason"]
    r = await srv.http.get("/debug/sample", params={"camera": "wrist"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == "NOT_FOUND" and "no simulated scene for profile franka_ee" in err["message"]
    assert len(r.content) <= 1024
    r = await srv.http.get("/debug/sample", params={"camera": "x" * 10_000})
    assert r.status_code == 422 and r.json()["error"]["field"] == "camera" and len(r.content) <= 1024


async def test_sample_without_mujoco_says_to_install_the_sim_extra(serve, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mujoco" else real(name, *a))
    srv = await serve()
    probe = (await srv.http.get("/debug/sample")).json()
    assert probe["available"] is False and "chatvla-serve[sim]" in probe["reason"]
    r = await srv.http.get("/debug/sample", params={"camera": "front"})
    assert r.status_code == 404 and "chatvla-serve[sim]" in r.json()["error"]["message"]


async def test_a_renderer_that_gives_no_answer_is_a_404_and_is_tried_again(monkeypatch):
    """A crash or timeout of the render child may be transient: reported, not cached."""
    scenes = SampleScenes(PROFILE.name)
    calls = []

    async def broken():
        calls.append(1)
        return None, "the renderer exited with code -11 and no answer", False

    monkeypatch.setattr(scenes, "probe", lambda: (True, "not rendered yet"))
    monkeypatch.setattr(scenes, "_render", broken)
    for _ in range(2):
        with pytest.raises(SampleUnavailable, match="exited with code -11"):
            await scenes.png("front")
    assert len(calls) == 2


@pytest.mark.sim
async def test_sample_renders_one_png_per_camera_once(serve):
    if importlib.util.find_spec("mujoco") is None:
        pytest.skip("the sim extra (mujoco) is not installed")
    from chatvla.client.sim.render import rendering_available

    ok, detail = rendering_available()
    if not ok:
        pytest.skip(f"no offscreen OpenGL here: {detail}")
    srv = await serve()
    assert (await srv.http.get("/debug/sample")).json()["available"] is True
    first = {}
    for cam in PROFILE.cameras:
        r = await srv.http.get("/debug/sample", params={"camera": cam.name})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (cam.width, cam.height) and img.mode == "RGB"
        first[cam.name] = r.content
    assert first["front"] != first["wrist"]
    again = await srv.http.get("/debug/sample", params={"camera": "front"})
    assert again.content == first["front"]  # the cached render
    assert (await srv.http.get("/debug/sample")).json()["reason"] == "rendered"
