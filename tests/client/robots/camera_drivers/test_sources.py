"""`--camera NAME=SOURCE[@WxH][@FPS]` specs: what parses, what is refused (one line saying why), and
opening one camera per camera of a profile."""

from __future__ import annotations

import sys

import pytest

from chatvla.client.robots.base import RobotError
from chatvla.client.robots.camera_drivers.sources import (
    CameraSource,
    check_sources,
    open_camera,
    open_cameras,
    parse_camera_source,
)
from chatvla.client.robots.cameras import StaticCamera
from chatvla.profiles import FRANKA_JOINT, CameraSpec


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("front=opencv:0", CameraSource("front", "opencv", "0")),
        ("wrist=opencv:/dev/video2@640x480@30", CameraSource("wrist", "opencv", "/dev/video2", 640, 480, 30.0)),
        ("wrist=opencv:/dev/video2@30fps@640x480", CameraSource("wrist", "opencv", "/dev/video2", 640, 480, 30.0)),
        ("front=opencv:clips/front.mp4@7.5", CameraSource("front", "opencv", "clips/front.mp4", fps=7.5)),
        ("front=opencv:/data/run@2.mp4", CameraSource("front", "opencv", "/data/run@2.mp4")),
        ("front=opencv:rtsp://cam.local:554/live", CameraSource("front", "opencv", "rtsp://cam.local:554/live")),
        ("cam_top=realsense:1234@848x480@30", CameraSource("cam_top", "realsense", "1234", 848, 480, 30.0)),
        ("cam_top=realsense", CameraSource("cam_top", "realsense")),
        ("cam_top=RealSense@15", CameraSource("cam_top", "realsense", fps=15.0)),
        ("wrist=static", CameraSource("wrist", "static")),
        ("wrist=static@64x48", CameraSource("wrist", "static", width=64, height=48)),
        (" wrist = opencv:1", CameraSource("wrist", "opencv", "1")),
    ],
)
def test_good_specs(spec, want):
    got = parse_camera_source(spec)
    assert got == want
    assert parse_camera_source(str(got)) == got  # the canonical form parses back


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("wrist", "needs NAME=SOURCE"),
        ("=opencv:0", "needs NAME=SOURCE"),
        ("wr ist=opencv:0", "may hold only"),
        ("wrist=usb:0", "unknown camera kind 'usb'; known: opencv, realsense, static"),
        ("wrist=opencv", "opencv needs a device index"),
        ("wrist=opencv:@640x480", "opencv needs a device index"),
        ("wrist=opencv:0@0x480", "size 0x480 must be positive"),
        ("wrist=opencv:0@0", "rate 0 must be positive"),
        ("wrist=opencv:0@640x480@320x240", "gives the size twice"),
        ("wrist=opencv:0@30@15", "gives the rate twice"),
        ("wrist=static:grey", "static takes no target"),
        ("wrist=realsense@7.5", "whole frame rates"),
    ],
)
def test_bad_specs_say_why_in_one_line(spec, why):
    with pytest.raises(ValueError) as err:
        parse_camera_source(spec)
    msg = str(err.value)
    assert why in msg and f"camera spec {spec!r}" in msg and "syntax: NAME=SOURCE" in msg
    assert "\n" not in msg


def test_every_profile_camera_needs_exactly_one_source():
    front, wrist = CameraSource("front", "static"), CameraSource("wrist", "static")
    assert list(check_sources([wrist, front], FRANKA_JOINT)) == ["front", "wrist"]  # profile order
    with pytest.raises(ValueError, match=r"missing: wrist \(NAME=static gives a grey placeholder\)"):
        check_sources([front], FRANKA_JOINT)
    with pytest.raises(ValueError, match="has no camera named 'top'; its cameras: front, wrist"):
        check_sources([front, wrist, CameraSource("top", "static")], FRANKA_JOINT)
    with pytest.raises(ValueError, match="'front' is given twice"):
        check_sources([front, wrist, CameraSource("front", "opencv", "0")], FRANKA_JOINT)


def test_static_sources_take_the_given_or_the_profile_size():
    cams = open_cameras([parse_camera_source("front=static@64x48"), parse_camera_source("wrist=static")],
                        FRANKA_JOINT)
    assert isinstance(cams["front"], StaticCamera) and cams["front"].read().shape == (48, 64, 3)
    assert cams["wrist"].read().shape == (224, 224, 3)


def test_a_source_that_fails_closes_the_ones_already_open(monkeypatch):
    closed: list[str] = []

    class Spy(StaticCamera):
        def close(self) -> None:
            closed.append("front")

    import chatvla.client.robots.camera_drivers.sources as sources

    real = sources.open_camera
    monkeypatch.setattr(sources, "open_camera",
                        lambda s, spec, **kw: Spy() if s.name == "front" else real(s, spec, **kw))
    monkeypatch.setitem(sys.modules, "cv2", None)
    expected = r"camera 'wrist' \(opencv:0\) needs the 'cv2' module.*chatvla-serve\[camera\]"
    with pytest.raises(RobotError, match=expected):
        open_cameras([parse_camera_source("front=static"), parse_camera_source("wrist=opencv:0")], FRANKA_JOINT)
    assert closed == ["front"]


def test_opencv_sources_open_the_driver_with_the_spec(monkeypatch):
    opened = {}

    class Recorder:
        def __init__(self, source, **kwargs) -> None:
            opened.update(source=source, **kwargs)

        def start(self) -> Recorder:
            return self

    import chatvla.client.robots.camera_drivers.opencv as opencv

    monkeypatch.setattr(opencv, "OpenCVCamera", Recorder)
    open_camera(parse_camera_source("wrist=opencv:2@640x480@30"), CameraSpec("wrist"), max_age_s=0.4)
    assert opened["source"] == 2  # an index, not the path "2"
    assert (opened["name"], opened["width"], opened["height"], opened["fps"], opened["max_age_s"]) == (
        "wrist", 640, 480, 30.0, 0.4)
    open_camera(parse_camera_source("wrist=opencv:/dev/video2"), CameraSpec("wrist"))
    assert opened["source"] == "/dev/video2" and opened["width"] is None and opened["max_age_s"] is None
