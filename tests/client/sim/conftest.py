"""Fixtures for the MuJoCo sim tests: skip (not fail) where MuJoCo or offscreen GL is missing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="session")
def mujoco_module():
    return pytest.importorskip("mujoco")


@pytest.fixture(scope="session")
def rendering(mujoco_module) -> str:
    from chatvla.client.sim.render import rendering_available

    ok, detail = rendering_available()
    if not ok:
        pytest.skip(f"no offscreen OpenGL here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {detail}")
    return detail
