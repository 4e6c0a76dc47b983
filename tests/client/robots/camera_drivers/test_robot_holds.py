"""A camera that stalls mid-episode stops the arm: the real path (grab thread -> HardwareRobot.observe ->
ControlLoop) on a fake clock, with a camera fed frame by frame. No observation with a stale frame reaches
the policy, no command follows the stall, and the error names the camera."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.executor import ChunkExecutor
from chatvla.client.fakes import FakeClock, FakePolicyConnection
from chatvla.client.robots.cameras import CameraStalled
from chatvla.client.robots.hardware import HardwareRobot
from chatvla.client.runtime import ControlLoop, TickRecord
from chatvla.client.safety import SafetyFilter

FRESH_TICKS = 5  # frames 0..4: frame 0 before the start, frame k at the end of tick k-1, then nothing
MAX_AGE_S = 0.35  # 3.5 ticks of 0.1 s: frame 4 (t=0.3) is served up to t=0.6 and refused at t=0.7


class Arm(HardwareRobot):
    """A HardwareRobot whose SDK is a list of the calls it got."""

    def __init__(self, profile, cameras, clock: FakeClock) -> None:
        super().__init__(profile, cameras, clock=clock.now)
        self.calls: list[str] = []

    def _open(self) -> None:
        return None

    def _read_state(self) -> np.ndarray:
        return np.asarray(self._profile.home, dtype=np.float64)

    def _send(self, action: np.ndarray) -> None:
        self.calls.append("command")

    def _hold(self) -> None:
        self.calls.append("hold")

    def _stop(self) -> None:
        self.calls.append("stop")

    def _release(self) -> None:
        return None


class Feeder:
    """Delivers one new frame per tick while the camera is alive; frame k is filled with k, and
    `stamps[k]` is the (fake) time it was exposed."""

    def __init__(self, cam, clock: FakeClock, solid) -> None:
        self.cam, self.clock, self.solid = cam, clock, solid
        self.stamps = {0: clock.now()}

    def on_tick(self, record: TickRecord) -> None:
        k = record.tick + 1
        if k < FRESH_TICKS:
            self.stamps[k] = self.clock.now()
            self.cam.push(self.solid(k))


def test_a_stalled_camera_stops_the_arm_and_no_stale_frame_reaches_the_policy(kit, toy):
    clock = FakeClock()
    cam = kit.ScriptedCamera("front", clock=clock.now, max_age_s=MAX_AGE_S)
    cam.queue.put(kit.solid(0))
    cam.start()
    arm = Arm(toy, {"front": cam}, clock)
    arm.connect()

    def policy(req):
        return np.tile(np.asarray(toy.home, dtype=np.float64), (toy.chunk_size, 1))

    conn = FakePolicyConnection(clock, policy, latency=0.0)
    feeder = Feeder(cam, clock, kit.solid)
    loop = ControlLoop(arm, conn, ChunkExecutor(toy), SafetyFilter(toy), clock=clock, observers=[feeder])
    try:
        with pytest.raises(CameraStalled) as err:
            loop.run(max_ticks=50)
    finally:
        arm.close()

    # It stopped at the first tick whose newest frame was too old: t=0.7, 0.4 s after the last frame.
    assert loop.stats.ticks == 7 and isinstance(loop.error, CameraStalled)
    assert err.value.camera == "front" and err.value.max_age_s == MAX_AGE_S
    assert err.value.age_s == pytest.approx(0.4)
    assert "camera 'front' (scripted) stalled" in str(err.value)

    # Every observation sent carried a frame no older than the limit when it was sent.
    assert conn.requests
    for req in conn.requests:
        k = int(req.images["front"][0, 0, 0])
        assert req.tick * toy.dt - feeder.stamps[k] <= MAX_AGE_S + 1e-9

    # The arm was commanded while the frames were fresh, then stopped; nothing was sent after the stop.
    assert "command" in arm.calls
    first_stop = arm.calls.index("stop")
    assert "command" not in arm.calls[first_stop:] and "hold" not in arm.calls[first_stop:]
    assert cam.released == 1  # closing the robot closed its camera
