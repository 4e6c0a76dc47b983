"""The grab thread every camera driver runs, and the staleness rule of `read()`.

A device delivers frames at its own rate; the control loop reads at its own. Each driver therefore
grabs on a thread of its own and keeps only the newest frame, so `read()` never waits for an exposure.
What `read()` must not do is hand out that frame forever once the device stops: an unplugged camera
would otherwise show the policy a frozen scene while the arm moves. So every frame is stamped when it
arrives, and `read()` raises `CameraStalled` once the newest one is older than `max_age_s`, or
`CameraError` as soon as the device failed or was closed.

A driver subclass supplies `_open`, `_grab` and `_release`; the thread, the locking, the first-frame
wait and the error messages live here once.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import ModuleType

import numpy as np

from chatvla.client.robots.cameras import CameraError, CameraStalled

log = logging.getLogger(__name__)

# The default age limit is this many frame periods of the camera's rate...
STALL_FRAME_PERIODS = 5.0
# ...but never below this (s): USB cameras stretch their period in low light, and a limit of a few
# tens of milliseconds would stop the arm on jitter rather than on a dead camera.
MIN_MAX_AGE_S = 0.25
# Rate assumed when neither the user nor the device says one (frames per second).
DEFAULT_FPS = 30.0
# How long `start()` waits for the first frame (s); exposure control of some cameras takes a second.
FIRST_FRAME_TIMEOUT_S = 5.0
# Pause between attempts after a grab that gave no frame (s), so a dead device does not spin a core.
RETRY_S = 0.01
# How long `close()` waits for the grab thread to leave a blocking device call (s).
CLOSE_TIMEOUT_S = 2.0


def default_max_age_s(fps: float) -> float:
    """The age (s) beyond which a frame of a camera running at `fps` counts as stale."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return max(MIN_MAX_AGE_S, STALL_FRAME_PERIODS / fps)


class NoFrame(Exception):
    """Raised by `_grab` when this attempt gave no frame but the device may still recover (a timeout,
    a dropped frame, the end of a video file). The reason shows up in the stall error if it lasts."""


class ThreadedCamera(ABC):
    """Base of the drivers: a daemon grab thread, the newest frame and the time it arrived.

    `clock` is the time base of frame ages (monotonic seconds); tests pass a fake one to make a stall
    happen without waiting. `max_age_s=None` derives the limit from the camera's rate."""

    def __init__(
        self,
        name: str,
        *,
        fps: float | None = None,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"camera {name!r}: max_age_s must be positive, got {max_age_s}")
        if fps is not None and fps <= 0:
            raise ValueError(f"camera {name!r}: fps must be positive, got {fps}")
        self.name = name
        self.fps = fps
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._frame: np.ndarray | None = None
        self._stamp = 0.0
        self._frames = 0
        self._miss = ""  # why the last attempt gave no frame
        self._failure: BaseException | None = None
        self._closed = False

    # ---- what a driver supplies -----------------------------------------------------------------
    @abstractmethod
    def describe(self) -> str:
        """The source as a user wrote it (e.g. `opencv:/dev/video0`), for error messages."""

    @abstractmethod
    def _open(self) -> None:
        """Import the library and open the device; raise CameraError with an actionable message.
        May set `self.fps` from what the device reports when the user gave none."""

    @abstractmethod
    def _grab(self) -> np.ndarray:
        """Block until the next frame and return it as HxWx3 uint8 RGB; raise NoFrame for a miss the
        device may recover from. Any other exception ends the camera (reported by `read()`)."""

    @abstractmethod
    def _release(self) -> None:
        """Free the device; called once, after the grab thread has stopped (or never started)."""

    def _require(self, module: str, extra: str) -> ModuleType:
        """Import a camera library when the camera opens, never at import: a robot PC installs only the
        extra of the cameras it has, and the client must import without any of them."""
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise CameraError(
                f"camera {self.name!r} ({self.describe()}) needs the '{module}' module: "
                f"pip install 'chatvla-serve[{extra}]'"
            ) from e

    # ---- lifecycle --------------------------------------------------------------------------------
    @property
    def max_age_s(self) -> float:
        """The age limit of a frame `read()` returns (s)."""
        if self._max_age_s is not None:
            return self._max_age_s
        return default_max_age_s(self.fps or DEFAULT_FPS)

    @property
    def frames(self) -> int:
        """Frames grabbed so far (for tests and bring-up logs)."""
        with self._lock:
            return self._frames

    def start(self, first_frame_timeout_s: float = FIRST_FRAME_TIMEOUT_S) -> ThreadedCamera:
        """Open the device, start the grab thread and wait for the first frame.

        Done at set-up, outside any control tick, so that a wrong index, a busy device or a camera that
        never streams is an error before the arm moves, not a stall on the first tick."""
        if self._thread is not None or self._closed:
            raise CameraError(f"camera {self.name!r} ({self.describe()}) starts once; make a new one")
        try:
            self._open()
        except BaseException as e:
            self.close()  # releases whatever the failed open left behind
            if isinstance(e, Exception) and not isinstance(e, CameraError):  # a library's own error type
                raise CameraError(f"camera {self.name!r} ({self.describe()}) could not open: {e}") from e
            raise
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        got = self._first.wait(first_frame_timeout_s)
        with self._lock:
            failure, miss = self._failure, self._miss
        if failure is not None or not got:
            self.close()
            if failure is not None:
                raise CameraError(f"camera {self.name!r} ({self.describe()}) failed at start: {failure}") from failure
            why = f" (last grab: {miss})" if miss else ""
            raise CameraError(
                f"camera {self.name!r} ({self.describe()}) gave no frame within {first_frame_timeout_s:g} s{why}"
            )
        return self

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                frame = self._grab()
            except NoFrame as e:
                with self._lock:
                    self._miss = str(e)
                self._closing.wait(RETRY_S)
                continue
            except Exception as e:
                if not self._closing.is_set():
                    log.error("camera %r (%s) failed: %s", self.name, self.describe(), e)
                    with self._lock:
                        self._failure = e
                self._first.set()  # wake a start() that waits, so it reports the failure at once
                return
            frame.setflags(write=False)  # handed to every reader until the next frame: nobody may edit it
            with self._lock:
                self._frame = frame
                self._stamp = self._clock()
                self._frames += 1
                self._miss = ""
            self._first.set()

    def read(self) -> np.ndarray:
        """The newest frame, at once; CameraStalled if it is older than `max_age_s`, CameraError if the
        device failed or the camera is closed."""
        with self._lock:
            frame, stamp, failure, miss = self._frame, self._stamp, self._failure, self._miss
        if failure is not None:
            raise CameraError(f"camera {self.name!r} ({self.describe()}) failed: {failure}")
        if self._closed:
            raise CameraError(f"camera {self.name!r} ({self.describe()}) is closed")
        if frame is None:
            raise CameraError(f"camera {self.name!r} ({self.describe()}) has no frame: call start() first")
        age = self._clock() - stamp
        if age > self.max_age_s:
            raise CameraStalled(self.name, age, self.max_age_s, source=self.describe(), reason=miss)
        return frame

    def close(self) -> None:
        """Stop the grab thread and release the device. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        thread = self._thread
        if thread is not None:
            thread.join(CLOSE_TIMEOUT_S)
            if thread.is_alive():
                # Releasing a device under a thread blocked inside it can crash the library; the daemon
                # thread and the handle go with the process instead.
                log.warning("camera %r (%s): grab thread still blocked; device left open", self.name, self.describe())
                return
        try:
            self._release()
        except Exception as e:  # closing must not fail a shutdown
            log.warning("camera %r (%s): release failed: %s", self.name, self.describe(), e)

    def __enter__(self) -> ThreadedCamera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
