"""Intel RealSense driver: the colour stream of one camera (by serial number, or the only one attached),
through pyrealsense2.

The stream is asked for in librealsense's `rgb8` format, so frames need no colour conversion; they are
copied out of the frameset because librealsense reuses its buffers once a frameset is released. Depth is
not streamed: the profiles carry colour images only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from chatvla.client.robots.camera_drivers.threaded import NoFrame, ThreadedCamera
from chatvla.client.robots.cameras import CameraError

# librealsense's default colour mode: every D400/D500 camera has it.
DEFAULT_WIDTH = 640
DEFAULT_HEIGHT = 480
DEFAULT_FPS = 30
# How long one wait for a frameset may block (ms): bounds how long close() waits for the grab thread.
FRAME_TIMEOUT_MS = 500


def connected_serials(rs: Any) -> list[str]:
    """Serial numbers of the RealSense devices librealsense sees now."""
    return [str(d.get_info(rs.camera_info.serial_number)) for d in rs.context().query_devices()]


class RealSenseCamera(ThreadedCamera):
    """The colour stream of a RealSense at a mode the camera supports (width x height at fps)."""

    def __init__(
        self,
        serial: str | None = None,
        *,
        name: str,
        width: int = DEFAULT_WIDTH,
        height: int = DEFAULT_HEIGHT,
        fps: int = DEFAULT_FPS,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        frame_timeout_ms: int = FRAME_TIMEOUT_MS,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"camera {name!r}: width and height must be positive, got {width}x{height}")
        if fps != int(fps):
            raise ValueError(f"camera {name!r}: a RealSense runs at whole frame rates (6, 15, 30, ...), got {fps}")
        super().__init__(name, fps=int(fps), max_age_s=max_age_s, clock=clock)
        self.serial = serial or None
        self.width = int(width)
        self.height = int(height)
        self._timeout_ms = int(frame_timeout_ms)
        self._pipeline: Any = None

    def describe(self) -> str:
        return f"realsense:{self.serial}" if self.serial else "realsense"

    @property
    def mode(self) -> str:
        return f"{self.width}x{self.height}@{self.fps:g}"

    def _open(self) -> None:
        rs = self._require("pyrealsense2", "realsense")
        if self.serial is not None:
            serials = connected_serials(rs)
            if self.serial not in serials:
                raise CameraError(
                    f"camera {self.name!r}: no RealSense with serial {self.serial} is connected "
                    f"(connected: {', '.join(serials) or 'none'})"
                )
        config = rs.config()
        if self.serial is not None:
            config.enable_device(self.serial)
        config.enable_stream(rs.stream.color, self.width, self.height, rs.format.rgb8, int(self.fps or DEFAULT_FPS))
        pipeline = rs.pipeline()
        try:
            pipeline.start(config)
        except RuntimeError as e:
            raise CameraError(
                f"camera {self.name!r} ({self.describe()}): could not start the colour stream at {self.mode} "
                f"(rgb8): {e}"
            ) from e
        self._pipeline = pipeline

    def _grab(self) -> np.ndarray:
        try:
            frames = self._pipeline.wait_for_frames(self._timeout_ms)
        except RuntimeError as e:  # a timeout; an unplugged camera keeps timing out and so stalls
            raise NoFrame(str(e)) from None
        color = frames.get_color_frame()
        if not color:
            raise NoFrame("the frameset had no colour frame")
        data = np.asanyarray(color.get_data())
        if data.dtype != np.uint8 or data.shape != (self.height, self.width, 3):
            raise ValueError(f"colour frame is {data.dtype} {list(data.shape)}, asked for {self.mode} rgb8")
        return np.array(data, copy=True)

    def _release(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()
        self._pipeline = None
