"""OpenCV driver: USB/V4L2 cameras by index (`0`) or device path (`/dev/video0`), and video files.

A video file plays once at the camera's rate (the requested fps, else the file's own) and then stalls
like an unplugged camera: useful for bring-up without hardware, and it is how the tests drive this
driver. OpenCV delivers BGR (or grey / BGRA); frames leave here as HxWx3 uint8 RGB.

The requested size and rate are asked of the device, which may pick the nearest mode it has; the frame
size actually delivered is logged once if it differs (frames are not resized here: the policy client
resizes to the profile's size anyway, and doing it twice costs quality).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from chatvla.client.robots.camera_drivers.threaded import DEFAULT_FPS, NoFrame, ThreadedCamera
from chatvla.client.robots.cameras import CameraError

log = logging.getLogger(__name__)

# A reported rate further than this from the requested one (frames per second) is worth a warning.
FPS_TOLERANCE = 0.5


def to_rgb(cv2: Any, frame: np.ndarray) -> np.ndarray:
    """OpenCV's frame (BGR, BGRA or grey, uint8) as a new HxWx3 RGB array."""
    if frame.dtype != np.uint8:
        raise ValueError(f"frames are {frame.dtype}, need 8-bit (configure the device for an 8-bit format)")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"frames have shape {list(frame.shape)}, need HxW, HxWx3 or HxWx4")


@contextlib.contextmanager
def _quiet(cv2: Any) -> Iterator[None]:
    """Silence OpenCV's own warnings while a device opens: a failed open prints a WARN line per backend
    it tried, and the CameraError raised instead says what to check in one line."""
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is None:
        yield
        return
    old = logging_api.getLogLevel()
    logging_api.setLogLevel(logging_api.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging_api.setLogLevel(old)


class OpenCVCamera(ThreadedCamera):
    """One camera read through `cv2.VideoCapture`.

    `source` is a device index, a device path, a video file or anything else VideoCapture opens (an
    `rtsp://` URL). `open_capture` replaces `cv2.VideoCapture` (tests pass a scripted capture)."""

    def __init__(
        self,
        source: int | str,
        *,
        name: str,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        open_capture: Callable[[int | str], Any] | None = None,
    ) -> None:
        if (width is None) != (height is None):
            raise ValueError(f"camera {name!r}: give both width and height, or neither")
        if width is not None and height is not None and (width <= 0 or height <= 0):
            raise ValueError(f"camera {name!r}: width and height must be positive, got {width}x{height}")
        super().__init__(name, fps=fps, max_age_s=max_age_s, clock=clock)
        self.source = source
        self.width = width
        self.height = height
        self.is_file = isinstance(source, str) and os.path.isfile(source)
        self._open_capture = open_capture
        self._cv2: Any = None
        self._cap: Any = None
        self._period = 0.0  # files only: seconds between frames, so a file plays at the camera's rate
        self._due = 0.0
        self._size_checked = False

    def describe(self) -> str:
        return f"opencv:{self.source}"

    def _open(self) -> None:
        cv2 = self._require("cv2", "camera")
        self._cv2 = cv2
        src = self.source
        if isinstance(src, str) and not self.is_file and "://" not in src and not os.path.exists(src):
            raise CameraError(f"camera {self.name!r} ({self.describe()}): no such device or file")
        with _quiet(cv2):
            cap = (self._open_capture or cv2.VideoCapture)(src)
        self._cap = cap
        if not cap.isOpened():
            hint = (
                "not a video OpenCV can decode"
                if self.is_file
                else "check the index or path (ls /dev/video*), that no other process holds the device, and "
                "that this user may read it (group video)"
            )
            raise CameraError(f"camera {self.name!r} ({self.describe()}): OpenCV could not open it: {hint}")
        if not self.is_file:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
            if self.width is not None and self.height is not None:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps is not None:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        reported = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if self.fps is None:
            self.fps = reported if reported > 0 else DEFAULT_FPS
        elif not self.is_file and reported > 0 and abs(reported - self.fps) > FPS_TOLERANCE:
            log.warning("camera %r (%s): asked for %g fps, the device reports %g", self.name, self.describe(),
                        self.fps, reported)
        if self.is_file:
            self._period = 1.0 / self.fps

    def _grab(self) -> np.ndarray:
        if self._period:
            now = time.monotonic()
            if now < self._due and self._closing.wait(self._due - now):
                raise NoFrame("closing")
            self._due = max(now, self._due) + self._period
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise NoFrame("end of the video file" if self.is_file else "the device returned no frame")
        rgb = to_rgb(self._cv2, frame)
        if not self._size_checked:
            self._size_checked = True
            h, w = rgb.shape[:2]
            if self.width is not None and (w, h) != (self.width, self.height):
                log.warning("camera %r (%s): delivers %dx%d, asked for %dx%d", self.name, self.describe(), w, h,
                            self.width, self.height)
        return rgb

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = None
