"""MuJoCo simulations of the ChatVLA-2 tabletop tasks for the robot profiles we serve.

    from chatvla.client.sim import make_sim_robot, make_task, solve_task
    robot = make_sim_robot("franka_joint", make_task("math_matching", seed=3, split="heldout"))
    obs = robot.observe(); robot.command(action); robot.check_success()

The tasks (`chatvla.client.sim.tasks`) are pure Python and import without MuJoCo; the robot, scene
and oracle need the `sim` extra and are imported on first use. `chatvla.client` itself never imports
this package. Headless EGL rendering is the default: MUJOCO_GL must be chosen before MuJoCo is first
imported, so it is set here unless the caller already chose (e.g. osmesa).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

_LAZY = {
    "SimRobot": "chatvla.client.sim.robot",
    "make_sim_robot": "chatvla.client.sim.robot",
    "PickPlacePlanner": "chatvla.client.sim.oracle",
    "OracleConfig": "chatvla.client.sim.oracle",
    "PlanningError": "chatvla.client.sim.oracle",
    "solve_task": "chatvla.client.sim.oracle",
    "solve_task_with_retry": "chatvla.client.sim.oracle",
    "solve_ik": "chatvla.client.sim.oracle",
    "rendering_available": "chatvla.client.sim.render",
    "RIGS": "chatvla.client.sim.rigs",
    "get_rig": "chatvla.client.sim.rigs",
    "make_task": "chatvla.client.sim.tasks",
    "TASK_KINDS": "chatvla.client.sim.tasks",
    "Task": "chatvla.client.sim.tasks",
    "TaskResult": "chatvla.client.sim.tasks",
    "Pose": "chatvla.client.sim.tasks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_robots() -> None:
    """Make the sims reachable by name (`make_robot("sim-panda")`) without importing MuJoCo yet."""
    from chatvla.client.robots.registry import register_robot

    register_robot("sim-panda", "chatvla.client.sim.robot:make_sim_panda", replace=True)
    register_robot("sim-bimanual", "chatvla.client.sim.robot:make_sim_bimanual", replace=True)


_register_robots()
