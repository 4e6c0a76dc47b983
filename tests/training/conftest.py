"""Fixtures for the training tests: a few oracle episodes recorded once per session through the real
`chatvla record` command (skipped where MuJoCo cannot render)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="session")
def rendering() -> str:
    pytest.importorskip("mujoco")
    from chatvla.client.sim.render import rendering_available

    ok, detail = rendering_available()
    if not ok:
        pytest.skip(f"no offscreen OpenGL here: {detail}")
    return detail


@pytest.fixture(scope="session")
def episodes_dir(rendering, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("episodes")
    subprocess.run([sys.executable, "-m", "chatvla.cli.main", "record", "--robot", "sim-panda", "--policy", "oracle",
                    "--task", "math_matching", "--split", "train", "--episodes", "3", "--seed", "7", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def toy_episodes_dir(rendering, tmp_path_factory) -> Path:
    """Two oracle toy-placement episodes on the simulated bimanual rig, recorded by `chatvla record`."""
    out = tmp_path_factory.mktemp("toy_episodes")
    subprocess.run([sys.executable, "-m", "chatvla.cli.main", "record", "--robot", "sim-bimanual", "--policy",
                    "oracle", "--task", "toy_placement", "--split", "train", "--episodes", "2", "--seed", "7",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def recovery_episodes_dir(rendering, tmp_path_factory) -> Path:
    """One recovery demonstration (`chatvla record --oracle-miss`): a missed grasp, then the retry."""
    out = tmp_path_factory.mktemp("recovery_episodes")
    subprocess.run([sys.executable, "-m", "chatvla.cli.main", "record", "--robot", "sim-panda", "--policy", "oracle",
                    "--task", "math_matching", "--split", "train", "--oracle-miss", "0.05", "--seed", "0",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    return out
