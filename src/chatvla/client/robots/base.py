"""The `Robot` interface every adapter (real arm, MuJoCo sim, fake) implements.

The executor calls `observe()` and `command()` once per control tick from its own thread, so both
must return quickly (well under one tick); adapters that talk to slow SDKs keep their own background
loop and return the latest reading / queue the newest target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from chatvla.profiles import RobotProfile


class RobotError(RuntimeError):
    """A robot cannot be used safely (not connected, SDK missing, implausible state)."""


@dataclass(frozen=True)
class RobotObservation:
    images: dict[str, np.ndarray]  # camera name -> HxWx3 uint8
    state: np.ndarray  # float32 [profile.state_dim], robot units
    timestamp: float  # time.monotonic() at capture


class Robot(ABC):
    """One embodiment. `command` takes a full action vector in the profile's action space."""

    @property
    @abstractmethod
    def profile(self) -> RobotProfile: ...

    def connect(self) -> None:
        """Open the connection; raise RobotError with a clear message if the robot is unusable."""

    def close(self) -> None:
        """Stop motion and release the connection. Safe to call twice."""

    @abstractmethod
    def observe(self) -> RobotObservation:
        """Latest camera images and joint/EE state."""

    @abstractmethod
    def command(self, action: np.ndarray) -> None:
        """Set the target for the current control tick (already checked by the safety filter)."""

    @abstractmethod
    def hold(self) -> None:
        """Keep the arm where it is now (used when no fresh, safe command exists)."""

    def stop(self) -> None:
        """Bring the arm to a standstill and stop following commands until the next `command`.
        Defaults to `hold()`; adapters with a brake or a stop primitive override it."""
        self.hold()
