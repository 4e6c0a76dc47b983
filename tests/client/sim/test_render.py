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


@pytest.mark.parametrize("camera", ["front", "wrist"])
def test_pixels_of_lands_on_the_card_in_the_image(camera: str, rendering: str) -> None:
    """Take one card off the table: the pixels that change are that card, and their centre is where
    `pixels_of` says the card is (the scene labels that say which image token shows which card)."""
    from chatvla.client.sim.robot import make_sim_robot
    from chatvla.client.sim.tasks.math_matching import card_name

    task = make_task("math_matching", 3)
    r = make_sim_robot("franka_joint", task)
    try:
        for n in task.card_numbers:
            name = card_name(n)
            col, row = r.pixels_of(name, camera)
            with_card = r.observe().images[camera].astype(int)
            pose = r.object_poses()[name]
            r.set_object_pose(name, 3.0, 3.0)  # far off the table, out of every camera
            without = r.observe().images[camera].astype(int)
            r.set_object_pose(name, float(pose.pos[0]), float(pose.pos[1]),
                              yaw=float(np.arctan2(pose.rot[1, 0], pose.rot[0, 0])))
            changed = np.abs(with_card - without).sum(axis=2) > 60
            rows, cols = np.nonzero(changed)
            assert rows.size > 10, f"card {n} not visible from {camera}"
            assert abs(cols.mean() - col) < 4 and abs(rows.mean() - row) < 4, (n, camera, col, row,
                                                                               cols.mean(), rows.mean())
        with pytest.raises(KeyError, match="no camera"):
            r.pixels_of(card_name(task.card_numbers[0]), "top")
        with pytest.raises(KeyError, match="no task object"):
            r.pixels_of("card_99", camera)
    finally:
        r.close()


def test_robots_on_several_threads_take_turns_at_the_gl(rendering: str) -> None:
    """Robots that render on their own threads (as `chatvla eval --robots N` runs them) never render
    at the same moment (Mesa's software rasteriser has crashed a process whose robots did), and
    taking turns changes no pixel."""
    import threading

    from chatvla.client.sim import render
    from chatvla.client.sim.robot import make_sim_robot

    inside, overlaps = [0], [0]
    counter = threading.Lock()
    real = render.mujoco.Renderer.render

    def counting(self: object) -> object:
        with counter:
            inside[0] += 1
            overlaps[0] = max(overlaps[0], inside[0])
        try:
            return real(self)
        finally:
            with counter:
                inside[0] -= 1

    start = threading.Barrier(2)
    same: list[bool] = []
    errors: list[BaseException] = []

    def robot_thread(seed: int) -> None:
        try:
            r = make_sim_robot("franka_joint", make_task("math_matching", seed))  # a context is per thread
            try:
                alone = r.observe().images
                start.wait(timeout=30)
                for _ in range(20):
                    imgs = r.observe().images
                    same.append(all(np.array_equal(imgs[c], alone[c]) for c in imgs))
            finally:
                r.close()
        except BaseException as e:  # reported on the test's thread
            errors.append(e)

    render.mujoco.Renderer.render = counting
    try:
        threads = [threading.Thread(target=robot_thread, args=(s,)) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        render.mujoco.Renderer.render = real
    assert not errors, errors
    assert len(same) == 40 and all(same)
    assert overlaps[0] == 1
