"""Camera sources for the real-robot adapters.

The adapters do not know how a frame is grabbed (USB, RealSense, GigE...): they take one `Camera` per
camera name of the robot profile and check every frame they get. A source only has to satisfy the
`Camera` protocol below, and must keep its own grab thread so that `read()` returns the latest frame at
once (the adapter calls it inside the control tick).

A source that cannot deliver a fresh frame raises `CameraError` from `read()` (`CameraStalled` when its
newest frame is too old): a `RobotError`, so the control loop stops the arm instead of letting the
policy act on an image that no longer shows the scene.

Drivers live in `chatvla.client.robots.camera_drivers` (OpenCV for USB/V4L2 devices and video files,
Intel RealSense; each an optional extra imported when the camera opens). `StaticCamera` is the
OpenCV-free stand-in used by tests, dry runs and bring-up without cameras.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from chatvla.client.robots.base import RobotError
from chatvla.profiles import RobotProfile


class CameraError(RobotError):
    """A camera cannot give a usable frame (device missing, closed or failed). Names the camera, so the
    operator knows which cable to check."""


class CameraStalled(CameraError):
    """The newest frame of a camera is older than its limit: the device stopped delivering (unplugged,
    USB bandwidth, a file that ended). Raised instead of returning the old frame, which would let the
    policy steer on a scene that has changed."""

    def __init__(self, camera: str, age_s: float, max_age_s: float, *, source: str = "", reason: str = "") -> None:
        self.camera = camera
        self.age_s = age_s
        self.max_age_s = max_age_s
        where = f" ({source})" if source else ""
        why = f"; last grab: {reason}" if reason else ""
        super().__init__(
            f"camera {camera!r}{where} stalled: newest frame is {age_s:.3f} s old, limit {max_age_s:.3f} s{why}"
        )


@runtime_checkable
class Camera(Protocol):
    """A source of HxWx3 uint8 RGB frames. `read()` must not wait for the next exposure."""

    def read(self) -> np.ndarray: ...

    def close(self) -> None: ...


class StaticCamera:
    """Returns the same frame forever: lets a robot run (and be recorded) before cameras are wired,
    without pretending the frames mean anything."""

    def __init__(self, height: int = 224, width: int = 224, rgb: tuple[int, int, int] = (127, 127, 127)) -> None:
        frame = np.empty((height, width, 3), dtype=np.uint8)
        frame[...] = np.asarray(rgb, dtype=np.uint8)
        frame.setflags(write=False)  # shared across ticks: nobody may scribble on it
        self._frame = frame

    @classmethod
    def from_image(cls, image: np.ndarray) -> StaticCamera:
        cam = cls(1, 1)
        frame = np.array(image, dtype=np.uint8, copy=True)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"need an HxWx3 image, got shape {list(frame.shape)}")
        frame.setflags(write=False)
        cam._frame = frame
        return cam

    def read(self) -> np.ndarray:
        return self._frame

    def close(self) -> None:
        return None


def static_cameras(profile: RobotProfile) -> dict[str, Camera]:
    """One grey `StaticCamera` per camera of `profile`, at the size the profile asks for."""
    return {c.name: StaticCamera(c.height, c.width) for c in profile.cameras}


def bind_cameras(profile: RobotProfile, cameras: Mapping[str, Camera] | None) -> dict[str, Camera]:
    """Check that every camera the model expects has a source, before any hardware is touched.

    A missing camera is an error rather than a silent black frame: the policy would act on an image
    that does not show the scene."""
    given = dict(cameras or {})
    missing = [n for n in profile.camera_names if n not in given]
    if missing:
        raise RobotError(
            f"profile {profile.name} needs cameras {list(profile.camera_names)}; no source for {missing}. "
            "Pass cameras={name: Camera} (see chatvla.client.robots.cameras; StaticCamera for dry runs)."
        )
    extra = sorted(set(given) - set(profile.camera_names))
    if extra:
        raise RobotError(f"profile {profile.name} has no cameras named {extra}")
    for name, cam in given.items():
        if not isinstance(cam, Camera):
            raise RobotError(f"camera {name!r} has no read()/close(): {type(cam).__name__}")
    return {n: given[n] for n in profile.camera_names}


def capture(cameras: Mapping[str, Camera], profile: RobotProfile) -> dict[str, np.ndarray]:
    """Read one frame per camera and refuse frames that are not HxWx3 uint8 (a driver returning BGRA,
    greyscale or None would otherwise reach the model as garbage). Size is not forced here: resizing
    is the policy client's job and the wire format carries the size."""
    images: dict[str, np.ndarray] = {}
    for spec in profile.cameras:
        try:
            frame = cameras[spec.name].read()
        except CameraError:
            raise  # already names the camera, and its type (stalled or failed) is worth keeping
        except Exception as e:
            raise RobotError(f"camera {spec.name!r} failed: {e}") from e
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            desc = f"{frame.dtype} {list(frame.shape)}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise RobotError(f"camera {spec.name!r} returned {desc}, need an HxWx3 uint8 RGB frame")
        images[spec.name] = frame
    return images
