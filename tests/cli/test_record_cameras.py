"""`chatvla record --camera NAME=SOURCE`: how a real robot gets its cameras from the command line. Bad
specs end with one line and exit 2, before any device or arm is touched; without --camera the robot
gets grey placeholders, as before."""

from __future__ import annotations

import sys

import pytest

from chatvla.cli.main import main
from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import StaticCamera
from chatvla.profiles import FRANKA_EE


@pytest.fixture
def made(monkeypatch):
    """Replaces make_robot: records the options the real adapter would get, then refuses to connect."""
    import chatvla.client.robots.registry as registry

    seen: dict = {}

    def fake_make_robot(name, **options):
        seen.update(options, robot=name)
        raise RobotError("no arm here")

    monkeypatch.setattr(registry, "make_robot", fake_make_robot)
    return seen


def record(tmp_path, *extra: str) -> int:
    return main(["record", "--robot", "franky", "--robot-option", "host=h", "--instruction", "pick",
                 "--target", "127.0.0.1:1", "--out", str(tmp_path), *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("chatvla record: ")
    return lines[0]


@pytest.mark.parametrize(
    ("cameras", "message"),
    [
        (["front"], "camera spec 'front': needs NAME=SOURCE (syntax: NAME=SOURCE[@WIDTHxHEIGHT][@FPS]"),
        (["front=usb:0", "wrist=static"], "unknown camera kind 'usb'"),
        (["front=static", "wrist=static", "top=static"], "profile franka_joint has no camera named 'top'"),
        (["front=static"], "needs a source for every camera; missing: wrist"),
        (["front=static", "front=opencv:0", "wrist=static"], "camera 'front' is given twice"),
    ],
)
def test_bad_camera_specs_end_with_one_line(tmp_path, capsys, made, cameras, message):
    args = [a for c in cameras for a in ("--camera", c)]
    assert record(tmp_path, *args) == 2
    assert message in one_line(capsys)
    assert made == {}  # refused before the robot was built


def test_a_missing_opencv_names_the_extra(tmp_path, capsys, made, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    assert record(tmp_path, "--camera", "front=opencv:0", "--camera", "wrist=static") == 2
    line = one_line(capsys)
    assert "camera 'front' (opencv:0) needs the 'cv2' module: pip install 'chatvla-serve[camera]'" in line


def test_cameras_reach_the_robot(tmp_path, capsys, made):
    assert record(tmp_path, "--camera", "wrist=static", "--camera", "front=static@64x48") == 2
    assert one_line(capsys) == "chatvla record: no arm here"
    cams = made["cameras"]
    assert list(cams) == ["front", "wrist"] and all(isinstance(c, StaticCamera) for c in cams.values())
    assert cams["front"].read().shape == (48, 64, 3) and cams["wrist"].read().shape == (224, 224, 3)


def test_the_profile_option_picks_the_cameras_and_reaches_the_adapter_as_a_profile(tmp_path, capsys, made):
    args = ("--robot-option", "profile=franka_ee", "--camera", "exterior=static", "--camera", "wrist=static")
    assert record(tmp_path, *args) == 2
    assert made["profile"] is FRANKA_EE and list(made["cameras"]) == ["exterior", "wrist"]
    assert record(tmp_path, "--robot-option", "profile=nope") == 2
    assert "unknown robot profile 'nope'" in capsys.readouterr().err


def test_without_cameras_a_dry_run_gets_grey_placeholders_and_a_warning(tmp_path, capsys, made):
    assert record(tmp_path) == 2
    err = capsys.readouterr().err
    assert "WARNING no --camera given: images are a flat grey placeholder" in err
    assert all(isinstance(c, StaticCamera) for c in made["cameras"].values())


def test_camera_flags_that_make_no_sense_are_refused(tmp_path, capsys, made):
    assert main(["record", "--robot", "sim-panda", "--policy", "oracle", "--out", str(tmp_path),
                 "--camera", "front=static"]) == 2
    assert "--camera is for real robots" in one_line(capsys)
    assert record(tmp_path, "--camera-max-age", "0") == 2
    assert "--camera-max-age must be positive" in one_line(capsys)


def test_an_opencv_camera_is_opened_and_closed_again_when_the_robot_fails(tmp_path, capsys, made):
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    from chatvla.client.robots.camera_drivers.opencv import OpenCVCamera
    from chatvla.client.robots.cameras import CameraError

    video = tmp_path / "front.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    for value in (40, 80):
        writer.write(np.full((24, 32, 3), value, dtype=np.uint8))
    writer.release()
    assert record(tmp_path, "--camera", f"front=opencv:{video}@20", "--camera", "wrist=static",
                  "--camera-max-age", "0.5") == 2
    assert one_line(capsys) == "chatvla record: no arm here"
    cam = made["cameras"]["front"]
    assert isinstance(cam, OpenCVCamera) and cam.fps == 20.0 and cam.max_age_s == 0.5
    with pytest.raises(CameraError, match="is closed"):
        cam.read()  # the command closed it: no grab thread outlives a robot that never connected


def test_a_device_that_does_not_open_is_one_line_without_opencv_s_own_warnings(tmp_path, capfd, made):
    pytest.importorskip("cv2")
    assert record(tmp_path, "--camera", "front=opencv:99", "--camera", "wrist=static") == 2
    err = capfd.readouterr().err  # capfd: OpenCV writes its warnings to the file descriptor itself
    assert err.strip().splitlines() == [
        "chatvla record: camera 'front' (opencv:99): OpenCV could not open it: check the index or path "
        "(ls /dev/video*), that no other process holds the device, and that this user may read it (group video)"
    ]
    assert made == {}
