"""The debug page in a real headless browser against a real `chatvla serve` (null engine): no console
errors, one image input per camera, state prefilled with the home pose, a run with plots, an error
that marks the result stale, the rendered sample scene where the server has the sim, a screenshot.

Needs playwright (PyPI) and a Chromium: `bash scripts/install_browser.sh` installs both (Debian's
chromium-headless-shell; playwright's own browser download is not used). Skipped with the reason
when either is missing, except where CHATVLA_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chatvla.cli.server_process import ServerProcess, start_server
from chatvla.profiles import FRANKA_JOINT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Where Debian's packages put Chromium; CHATVLA_BROWSER names another executable.
_CANDIDATES = ("chromium-headless-shell", "/usr/lib/chromium/chromium-headless-shell", "chromium",
               "chromium-browser", "google-chrome")
# The one console error a failed request is allowed to cause: the browser logs every 4xx response.
_EXPECTED_422 = "the server responded with a status of 422"


def _unavailable(reason: str) -> None:
    message = f"{reason}; install one with `bash scripts/install_browser.sh`"
    if os.environ.get("CHATVLA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CHATVLA_REQUIRE_BROWSER=1 but {message}")
    pytest.skip(message)


def _browser_executable() -> str:
    named = os.environ.get("CHATVLA_BROWSER")
    if named:
        return named
    for c in _CANDIDATES:
        path = shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
        if path:
            return path
    _unavailable("no Chromium found (" + ", ".join(_CANDIDATES) + ")")
    raise AssertionError("unreachable")


@pytest.fixture
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    executable = _browser_executable()
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=executable, headless=True,
                                  args=["--no-sandbox", "--disable-dev-shm-usage"])
        except Error as e:
            _unavailable(f"{executable} does not start under playwright: {str(e).splitlines()[0][:200]}")
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    srv = start_server(["--engine", "null"], timeout_s=180)
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log_tail()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _png(path: Path, rgb: tuple[int, int, int]) -> Path:
    img = np.zeros((224, 224, 3), np.uint8)
    img[:] = rgb
    img[80:140, 60:160] = (255 - rgb[0], 255 - rgb[1], 255 - rgb[2])
    Image.fromarray(img).save(path)
    return path


def test_debug_page_in_a_headless_browser(browser, server, tmp_path):
    base = server.http_url
    info = _get_json(f"{base}/v1/model")
    profile = info["profile"]
    cameras = [c["name"] for c in profile["cameras"]]
    dims = profile["action_dim"]
    assert profile["name"] == FRANKA_JOINT.name and cameras == ["front", "wrist"]

    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    console: list[str] = []
    page_errors: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        page.goto(f"{base}/", wait_until="networkidle")
        page.wait_for_function("document.getElementById('model').textContent.includes('franka_joint')")

        # One file input per camera of the served profile, each with a preview.
        inputs = page.locator('#cameras input[type="file"]')
        assert inputs.count() == len(cameras)
        assert [inputs.nth(i).get_attribute("data-camera") for i in range(len(cameras))] == cameras
        assert page.locator("#cameras .preview").count() == len(cameras)

        # State prefilled with the home pose (inside the joint limits), the card says untrained.
        state = [float(x) for x in page.input_value("#state").split(",")]
        assert state == pytest.approx(list(FRANKA_JOINT.home))
        assert page.text_content("#trained") == "untrained"
        assert page.locator("#reasoning-override").count() == 1
        assert not console and not page_errors, (console, page_errors)

        # Upload one PNG per camera; the previews show them.
        for i, cam in enumerate(cameras):
            path = _png(tmp_path / f"{cam}.png", (40 + 80 * i, 120, 200 - 80 * i))
            page.set_input_files(f'#cameras input[data-camera="{cam}"]', str(path))
        page.wait_for_function("[...document.querySelectorAll('#cameras .preview')]"
                               ".every((img) => img.complete && img.naturalWidth === 224)")
        assert page.locator("#cameras .source", has_text="file: front.png").count() == 1

        # Run: reasoning, one plot per action dimension with the chunk, the state marker and limits.
        page.click("#go")
        page.wait_for_selector("#result:not([hidden]) .plot svg polyline.chunk")
        assert "pick up the red block" in page.text_content("#reasoning")
        assert page.locator(".plot").count() == dims
        assert page.locator(".plot polyline.chunk").count() == dims
        assert page.locator(".plot circle.state-marker").count() == dims
        titles = page.locator(".plot h3").all_text_contents()
        assert titles[0] == "joint1 [rad]" and titles[-1] == "gripper [m]"
        assert page.locator(".plot svg line.limit").count() >= 1  # the gripper starts at its limit
        assert not page.is_visible("#stale-banner")
        page.screenshot(path=str(tmp_path / "debug_page.png"), full_page=True)
        page.check("#full-range")  # every plot scaled to its joint's range shows both limits
        assert page.locator(".plot svg line.limit").count() == 2 * dims
        page.screenshot(path=str(tmp_path / "debug_page_full_range.png"), full_page=True)
        assert not console and not page_errors, (console, page_errors)

        # An error (a state of the wrong length) marks the shown result stale...
        page.fill("#state", "1, 2, 3")
        page.click("#go")
        page.wait_for_selector("#stale-banner", state="visible")
        assert "stale" in (page.get_attribute("#result", "class") or "")
        assert "state" in page.text_content("#error")
        page.screenshot(path=str(tmp_path / "debug_page_stale.png"), full_page=True)
        assert console and all(_EXPECTED_422 in m for m in console), console
        console.clear()

        # ...until the next success.
        page.click("#home")
        page.click("#go")
        page.wait_for_selector("#stale-banner", state="hidden")
        assert "stale" not in (page.get_attribute("#result", "class") or "")

        # The rendered sample scene fills every camera where the server has the sim.
        sample = _get_json(f"{base}/debug/sample")
        if sample["available"]:
            page.click("#sample")
            page.wait_for_function("document.getElementById('sample-status').textContent.includes('every camera')",
                                   timeout=180_000)
            assert page.locator("#cameras .source", has_text="rendered sample scene").count() == len(cameras)
            with page.expect_response("**/v1/infer") as answer:
                page.click("#go")
            assert answer.value.status == 200
            page.wait_for_function("!document.getElementById('go').disabled")
            assert page.text_content("#error") == "" and not page.is_visible("#stale-banner")
            page.screenshot(path=str(tmp_path / "debug_page_sample.png"), full_page=True)
        else:
            assert not page.is_visible("#sample")
        assert not console and not page_errors, (console, page_errors)
    except Exception:
        page.screenshot(path=str(tmp_path / "debug_page_failure.png"), full_page=True)
        print(server.log_tail())
        raise
    finally:
        page.close()
    assert (tmp_path / "debug_page.png").stat().st_size > 10_000
