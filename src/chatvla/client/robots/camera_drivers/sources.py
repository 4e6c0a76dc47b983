"""Camera sources as the command line names them, and opening them for a robot profile.

One spec per camera of the profile: `NAME=SOURCE[@WIDTHxHEIGHT][@FPS]`

    front=opencv:0                   USB/V4L2 device index 0, at the device's default mode
    wrist=opencv:/dev/video2@640x480@30
    front=opencv:clips/front.mp4@15  a video file, played once at 15 fps, then it stalls
    top=realsense:123456789012@848x480@30
    top=realsense                    the only RealSense attached (640x480@30 unless given)
    wrist=static                     a flat grey frame (dry runs; size: given or the profile's)

The size and rate suffixes are peeled off the end, so a path that contains `@` still works as long as
what follows its last `@` is not itself a size or a rate. FPS may be written `30` or `30fps`.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from chatvla.client.robots.cameras import Camera, StaticCamera
from chatvla.profiles import CameraSpec, RobotProfile

KINDS = ("opencv", "realsense", "static")
SYNTAX = "NAME=SOURCE[@WIDTHxHEIGHT][@FPS], SOURCE one of opencv:INDEX|PATH, realsense[:SERIAL], static"

_SIZE = re.compile(r"(\d+)x(\d+)")
_FPS = re.compile(r"(\d+(?:\.\d+)?)(?:fps)?")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class CameraSource:
    """One parsed `--camera` spec. `target` is the device index or path (opencv), the serial number
    (realsense, may be empty) or empty (static)."""

    name: str
    kind: str
    target: str = ""
    width: int | None = None
    height: int | None = None
    fps: float | None = None

    def __str__(self) -> str:
        out = f"{self.name}={self.kind}" + (f":{self.target}" if self.target else "")
        if self.width is not None:
            out += f"@{self.width}x{self.height}"
        if self.fps is not None:
            out += f"@{self.fps:g}"
        return out


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"camera spec {spec!r}: {why} (syntax: {SYNTAX})")


def parse_camera_source(spec: str) -> CameraSource:
    """Parse `NAME=SOURCE[@WxH][@FPS]`; ValueError with one line saying what is wrong."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise _bad(spec, "needs NAME=SOURCE")
    if not _NAME.fullmatch(name):
        raise _bad(spec, f"camera name {name!r} may hold only letters, digits, '_', '-' and '.'")
    width = height = None
    fps: float | None = None
    while "@" in rest:
        head, _, tail = rest.rpartition("@")
        size, rate = _SIZE.fullmatch(tail), _FPS.fullmatch(tail)
        if size:
            if width is not None:
                raise _bad(spec, "gives the size twice")
            width, height = int(size.group(1)), int(size.group(2))
            if width <= 0 or height <= 0:
                raise _bad(spec, f"size {tail} must be positive")
        elif rate:
            if fps is not None:
                raise _bad(spec, "gives the rate twice")
            fps = float(rate.group(1))
            if fps <= 0:
                raise _bad(spec, f"rate {tail} must be positive")
        else:
            break  # part of the source (a path with an '@' in it)
        rest = head
    kind, _, target = rest.partition(":")
    kind, target = kind.strip().lower(), target.strip()
    if kind not in KINDS:
        raise _bad(spec, f"unknown camera kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "opencv" and not target:
        raise _bad(spec, "opencv needs a device index, a device path or a video file: opencv:0, opencv:/dev/video0")
    if kind == "static" and target:
        raise _bad(spec, "static takes no target")
    if kind == "realsense" and fps is not None and fps != int(fps):
        raise _bad(spec, "a RealSense runs at whole frame rates (6, 15, 30, ...)")
    return CameraSource(name, kind, target, width, height, fps)


def open_camera(
    source: CameraSource,
    spec: CameraSpec | None = None,
    *,
    max_age_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Camera:
    """Build and start the camera `source` names. `spec` is the profile's camera (the size of a static
    source given no size). Drivers are imported here, so only the kinds in use need their extra."""
    if source.kind == "static":
        w = source.width or (spec.width if spec else 224)
        h = source.height or (spec.height if spec else 224)
        return StaticCamera(h, w)
    if source.kind == "opencv":
        from chatvla.client.robots.camera_drivers.opencv import OpenCVCamera

        target: int | str = int(source.target) if source.target.isdigit() else source.target
        return OpenCVCamera(target, name=source.name, width=source.width, height=source.height, fps=source.fps,
                            max_age_s=max_age_s, clock=clock).start()
    if source.kind == "realsense":
        from chatvla.client.robots.camera_drivers import realsense

        return realsense.RealSenseCamera(
            source.target or None,
            name=source.name,
            width=source.width or realsense.DEFAULT_WIDTH,
            height=source.height or realsense.DEFAULT_HEIGHT,
            fps=int(source.fps or realsense.DEFAULT_FPS),
            max_age_s=max_age_s,
            clock=clock,
        ).start()
    raise ValueError(f"unknown camera kind {source.kind!r}")


def check_sources(sources: Iterable[CameraSource], profile: RobotProfile) -> dict[str, CameraSource]:
    """Exactly one source per camera of `profile`, checked before any device is opened."""
    by_name: dict[str, CameraSource] = {}
    for s in sources:
        if s.name in by_name:
            raise ValueError(f"camera {s.name!r} is given twice ({by_name[s.name]} and {s})")
        by_name[s.name] = s
    wanted = list(profile.camera_names)
    unknown = [n for n in by_name if n not in wanted]
    if unknown:
        raise ValueError(f"profile {profile.name} has no camera named {', '.join(map(repr, unknown))}; its cameras: "
                         f"{', '.join(wanted)}")
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(f"profile {profile.name} needs a source for every camera; missing: {', '.join(missing)} "
                         "(NAME=static gives a grey placeholder)")
    return {n: by_name[n] for n in wanted}


def open_cameras(
    sources: Iterable[CameraSource],
    profile: RobotProfile,
    *,
    max_age_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Camera]:
    """Open one camera per camera of `profile`; if one fails, the ones already open are closed again
    (their grab threads and device handles must not outlive a failed start)."""
    checked = check_sources(sources, profile)
    specs: Mapping[str, CameraSpec] = {c.name: c for c in profile.cameras}
    opened: dict[str, Camera] = {}
    try:
        for name, source in checked.items():
            opened[name] = open_camera(source, specs[name], max_age_s=max_age_s, clock=clock)
    except BaseException:
        close_cameras(opened)
        raise
    return opened


def close_cameras(cameras: Mapping[str, Camera]) -> None:
    """Close every camera, even if one's close fails (cleanup after a failed start)."""
    for cam in cameras.values():
        with contextlib.suppress(Exception):  # best effort: the caller is already reporting the real error
            cam.close()
