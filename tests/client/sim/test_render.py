"""Camera images: names, shapes, dtype, content and determinism (needs offscreen GL)."""

from __future__ import annotations

import numpy as np
import pytest

from chatvla.client.sim.tasks import make_task

pytestmark = pytest.mark.sim


@pytest.mark.parametrize("profile", ["franka_joint", "arx_r5_bimanual"])
def test_observation_has_every_profile_camera(profile: str, rendering: str) -> None:
    from chatvla.client.sim.robot import make_sim_robot

    r = make_sim_robot(profile, make_task("math_matching", 0))
    try:
        obs = r.observe()
        assert tuple(obs.images) == r.profile.camera_names
        for cam in r.profile.cameras:
            img = obs.images[cam.name]
            assert img.shape == (cam.height, cam.width, 3) and img.dtype == np.uint8
            assert img.std() > 10  # a scene, not a blank frame
        again = r.observe()
        assert all(np.array_equal(obs.images[k], again.images[k]) for k in obs.images)
        r.command(np.asarray(r.rig.reset_q) + np.asarray(r.profile.max_step) * 0.5)
        moved = r.observe()
        assert any(not np.array_equal(obs.images[k], moved.images[k]) for k in obs.images)
    finally:
        r.close()


def test_whiteboard_text_reaches_the_camera(rendering: str) -> None:
    """Two tasks that differ only in what the board says must give different front images."""
    from chatvla.client.sim.robot import make_sim_robot
    from chatvla.client.sim.tasks.base import FixtureSpec

    task = make_task("math_matching", 0)
    board = next(f for f in task.fixtures if f.kind == "whiteboard")
    other = FixtureSpec(board.name, "whiteboard", board.xy, board.half_size, text="88+1")
    import dataclasses

    changed = dataclasses.replace(task, fixtures=tuple(other if f is board else f for f in task.fixtures))
    images = []
    for t in (task, changed):
        r = make_sim_robot("franka_joint", t)
        images.append(r.observe().images["front"])
        r.close()
    assert not np.array_equal(images[0], images[1])
