"""Make a robot by name, for the CLI and configs: `make_robot("franky", host="172.16.0.2", cameras=...)`.

Names map to "module:attribute" strings, not to imported classes, so listing or looking up a robot
imports nothing heavy: a robot PC with only franky installed can still say what "arx_r5" would need.

Simulated robots live in `chatvla.client.sim` (MuJoCo, an optional extra). That package registers its
robots ("sim-panda", "sim-bimanual", ...) itself on import by calling `register_robot`; this module
imports it only when a name is not found here, or when all names are listed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from chatvla.client.robots.base import Robot, RobotError

log = logging.getLogger(__name__)

RobotFactory = Callable[..., Robot]

SIM_MODULE = "chatvla.client.sim"
# Names the sim package is expected to register, so an error can say where they come from.
SIM_ROBOTS: tuple[str, ...] = ("sim-panda", "sim-bimanual")

_BUILTIN: dict[str, str] = {
    "panda": "chatvla.client.robots.panda_py:PandaPyRobot",
    "franky": "chatvla.client.robots.franky:FrankyRobot",
    "arx_r5": "chatvla.client.robots.arx_r5:ArxR5Robot",
}
_registered: dict[str, RobotFactory | str] = dict(_BUILTIN)
_sim_loaded = False
_sim_error: Exception | None = None


def register_robot(name: str, factory: RobotFactory | str, *, replace: bool = False) -> None:
    """Add a robot factory (a callable returning a `Robot`, or a lazy "module:attribute" string)."""
    if not replace and name in _registered and _registered[name] != factory:
        raise ValueError(f"robot {name!r} is already registered")
    _registered[name] = factory


def _load_sim() -> Exception | None:
    """Import the sim package once; remember why it failed so the error can be shown on demand.
    Any exception counts: a broken MuJoCo install must not break looking up a real robot."""
    global _sim_loaded, _sim_error
    if not _sim_loaded:
        _sim_loaded = True
        try:
            importlib.import_module(SIM_MODULE)
        except Exception as e:
            _sim_error = e
            log.debug("simulated robots unavailable: %s", e)
    return _sim_error


def available_robots() -> list[str]:
    """Every robot name that can be asked for (sim robots only if the sim package imports)."""
    _load_sim()
    return sorted(_registered)


def _resolve(factory: RobotFactory | str) -> RobotFactory:
    if not isinstance(factory, str):
        return factory
    module, _, attr = factory.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_robot(name: str, **kwargs: Any) -> Robot:
    """Construct (not connect) the robot called `name`; keyword arguments go to its constructor.

    Construction imports no SDK: adapters import theirs in `connect()`, where a missing one becomes a
    RobotError naming the pip extra."""
    if name not in _registered:
        err = _load_sim()
        if name not in _registered:
            if name in SIM_ROBOTS or name.startswith("sim-"):
                why = f": {err}" if err else ""
                raise RobotError(
                    f"robot {name!r} comes from {SIM_MODULE}, which did not provide it{why} "
                    "(pip install 'chatvla-serve[sim]')"
                )
            raise RobotError(f"unknown robot {name!r}; known: {', '.join(sorted(_registered))}")
    return _resolve(_registered[name])(**kwargs)
