"""The episode viewer (`chatvla inspect EP --html/--video`): the page is self-contained and shows every
camera and tick, the video has one frame per tick, and a missing encoder ends in the install hint."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from chatvla.cli.main import main
from chatvla.client.recording import EpisodeWriter, read_episode
from chatvla.client.tick_counts import STALLED, STARTUP
from chatvla.client.viewer import build_view, video_available
from chatvla.client.viewer.frame import FrameRenderer
from chatvla.client.viewer.page import page_data
from chatvla.profiles import FRANKA_JOINT

needs_encoder = pytest.mark.skipif(not video_available(),
                                   reason="imageio-ffmpeg (the video extra) is not installed in this environment")


def _page_json(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    assert m, "the page carries its data inline"
    return json.loads(m.group(1))


def test_html_is_self_contained_with_every_camera_and_tick(episode_file, tmp_path, capsys):
    path, acts = episode_file
    out = tmp_path / "ep.html"
    assert main(["inspect", str(path), "--html", str(out)]) == 0
    assert f"html         {out}" in capsys.readouterr().out
    text = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "no network references"
    assert "franka_joint, 40 ticks at 15 Hz, cameras front, wrist; 2 stalled ticks, 0 start-up ticks" in text
    data = _page_json(text)
    assert data["cameras"] == ["front", "wrist"] and len(data["ticks"]) == 40 and "40 ticks" in data["note"]
    assert all(len(data["frames"][cam]) == 40 and min(data["frames"][cam]) >= 0 for cam in ("front", "wrist"))
    assert all(u.startswith("data:image/jpeg;base64,") for u in data["images"])
    assert len(data["images"]) == 2  # the fixture repeats one image per camera: each is stored once
    np.testing.assert_allclose(np.array(data["action"], dtype=float), acts, atol=1e-4)
    assert data["profile"]["lower"] == list(FRANKA_JOINT.action_lower)
    assert data["status"][5:7] == "ss" and data["safety"][9] == "step_limit"
    assert [i for i, _ in data["reasoning"]] == [0, 8, 16, 24, 32]  # the text changes with every chunk
    assert data["counts"]["stalled_ticks"] == 2 and data["counts"]["safety_clamped_ticks"] == 1


def test_long_episodes_keep_every_tick_but_subsample_images(tmp_path, make_episode):
    path = tmp_path / "long.chatvla"
    make_episode(path, n=50)
    data = page_data(build_view(read_episode(path)), max_frames=20)
    assert data["frame_step"] == 3 and len(data["frames"]["front"]) == 17 and len(data["ticks"]) == 50
    assert "50 ticks; images of one tick in 3 (17 frames)" in data["note"]


def test_view_marks_startup_stalls_and_reasoning_in_effect(tmp_path):
    """Start-up (before the first action) is not a stall; a chunk without text leaves the reasoning standing;
    a camera recorded only on some ticks shows its last image."""
    path = tmp_path / "ep.chatvla"
    from chatvla.client.recording import ChunkRecord

    home = np.array(FRANKA_JOINT.home, dtype=np.float32)
    img = np.zeros((8, 8, 3), np.uint8)
    with EpisodeWriter(path, FRANKA_JOINT, instruction="x") as w:
        for t in range(8):
            chunk = None
            if t in (2, 4, 6):
                chunk = ChunkRecord(seq=t, tick=t, actions=np.tile(home, (4, 1)), reasoning="" if t == 4 else f"r{t}")
            dry = t < 2 or t == 5
            w.append(tick=t, timestamp=float(t), state=home, action=None if t < 2 else home, chunk=chunk, stall=dry,
                     images={"front": img} if t % 3 == 0 else {"wrist": img},
                     interventions=["stall_hold"] if dry else [])
    view = build_view(read_episode(path))
    assert view.statuses[:2] == (STARTUP, STARTUP) and view.statuses[5] == STALLED
    assert (view.counts.startup_ticks, view.counts.stalled_ticks, view.counts.safety_clamped_ticks) == (2, 1, 0)
    assert [view.reasoning_at(i) for i in range(8)] == ["", "", "r2", "r2", "r2", "r2", "r6", "r6"]
    assert view.images[0]["wrist"] is None and view.images[1]["front"] is view.images[0]["front"]
    frame = FrameRenderer(view).render(0)  # a camera with no image yet still gets its tile
    assert frame.shape[0] % 16 == 0 and frame.shape[1] % 16 == 0


@needs_encoder
def test_video_has_one_frame_per_tick(episode_file, tmp_path, capsys):
    import imageio_ffmpeg

    path, _ = episode_file
    out = tmp_path / "ep.mp4"
    assert main(["inspect", str(path), "--video", str(out)]) == 0
    assert f"video        {out}" in capsys.readouterr().out
    frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 40


def test_video_without_the_extra_names_it(episode_file, tmp_path, monkeypatch, capsys):
    path, _ = episode_file
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    out = tmp_path / "ep.mp4"
    assert main(["inspect", str(path), "--video", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chatvla inspect: needs imageio-ffmpeg (not installed): pip install 'chatvla-serve[video]'"]
    assert not out.exists()
