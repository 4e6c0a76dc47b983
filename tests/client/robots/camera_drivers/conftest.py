"""Fixtures for the camera drivers: a camera fed frame by frame from the test, on the real grab thread.

`ScriptedCamera.push` waits until the grab thread has taken the frame, so what `read()` returns next is
known; frame ages come from a FakeClock, so a stall happens by advancing it, never by sleeping.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import numpy as np
import pytest

from chatvla.client.robots.camera_drivers.threaded import NoFrame, ThreadedCamera


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `cond` until true; only a guard against hangs, never a speed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def solid(value: int, height: int = 4, width: int = 6) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


class ScriptedCamera(ThreadedCamera):
    """A camera whose device is a queue: a frame is an exposure, an exception a device failure, and an
    empty queue a device that delivers nothing (a stall)."""

    def __init__(self, name: str = "front", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        self.queue: queue.Queue[np.ndarray | BaseException] = queue.Queue()
        self.released = 0

    def describe(self) -> str:
        return "scripted"

    def _open(self) -> None:
        return None

    def _grab(self) -> np.ndarray:
        try:
            item = self.queue.get(timeout=0.01)
        except queue.Empty:
            raise NoFrame("nothing queued") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _release(self) -> None:
        self.released += 1

    def push(self, frame: np.ndarray) -> None:
        """Deliver one frame and wait until the grab thread has stored it."""
        n = self.frames
        self.queue.put(frame)
        wait_for(lambda: self.frames > n, what=f"camera {self.name} to take the frame")


class CameraKit:
    """Test modules cannot import conftest under --import-mode=importlib; they get these via a fixture."""

    ScriptedCamera = ScriptedCamera
    wait_for = staticmethod(wait_for)
    solid = staticmethod(solid)


@pytest.fixture
def kit() -> type[CameraKit]:
    return CameraKit
