"""Robot registry: names, the sim hook, and that constructing imports no SDK."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatvla.client.robots import registry
from chatvla.client.robots.arx_r5 import ArxR5Robot
from chatvla.client.robots.base import RobotError
from chatvla.client.robots.cameras import static_cameras
from chatvla.client.robots.franky import FrankyRobot
from chatvla.client.robots.panda_py import PandaPyRobot
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_registered", dict(registry._BUILTIN))
    monkeypatch.setattr(registry, "_sim_loaded", False)
    monkeypatch.setattr(registry, "_sim_error", None)


def test_builtin_names_construct_without_connecting(fresh_registry):
    cams = static_cameras(FRANKA_JOINT)
    assert isinstance(registry.make_robot("panda", host="h", cameras=cams), PandaPyRobot)
    assert isinstance(registry.make_robot("franky", host="h", cameras=cams), FrankyRobot)
    arx = registry.make_robot("arx_r5", cameras=static_cameras(ARX_R5_BIMANUAL))
    assert isinstance(arx, ArxR5Robot)
    assert not arx.connected


def test_unknown_name_lists_known(fresh_registry, monkeypatch):
    monkeypatch.setattr(registry, "SIM_MODULE", "chatvla_no_such_sim_module")
    with pytest.raises(RobotError, match="unknown robot 'ur5'; known: arx_r5, franky, panda"):
        registry.make_robot("ur5")


def test_sim_names_explain_where_they_come_from(fresh_registry, monkeypatch):
    monkeypatch.setattr(registry, "SIM_MODULE", "chatvla_no_such_sim_module")
    with pytest.raises(RobotError, match=r"comes from chatvla_no_such_sim_module.*\[sim\]"):
        registry.make_robot("sim-panda")


def test_sim_package_registers_itself_on_first_lookup(fresh_registry, monkeypatch, tmp_path):
    # What chatvla.client.sim is expected to do at import time.
    (tmp_path / "fake_sim_pkg.py").write_text(
        "from chatvla.client.robots.registry import register_robot\n"
        "MADE = []\n"
        "register_robot('sim-panda', lambda **kw: MADE.append(kw) or 'robot')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "SIM_MODULE", "fake_sim_pkg")
    monkeypatch.delitem(sys.modules, "fake_sim_pkg", raising=False)
    assert registry.make_robot("sim-panda", seed=3) == "robot"
    assert sys.modules["fake_sim_pkg"].MADE == [{"seed": 3}]
    assert "sim-panda" in registry.available_robots()
    with pytest.raises(ValueError, match="already registered"):
        registry.register_robot("sim-panda", lambda **kw: None)


def test_importing_client_robots_and_recording_pulls_in_no_torch_or_sdk():
    code = (
        "import sys\n"
        "import chatvla.client.robots.registry, chatvla.client.robots.panda_py, chatvla.client.robots.franky\n"
        "import chatvla.client.robots.arx_r5, chatvla.client.recording, chatvla.cli.inspect\n"
        "bad = [m for m in ('torch', 'panda_py', 'franky', 'arx_r5_sdk', 'matplotlib', 'mujoco')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
