"""The robot PC installs only the core package (numpy, grpcio, protobuf, pillow, msgpack) plus, maybe, one
robot extra: EVERY module under chatvla.client must import without torch, the server extra (pydantic,
pyyaml, fastapi, ...), the plot extra or an arm SDK, even indirectly.

Each check runs in a fresh interpreter in which the optional modules are blocked (`sys.modules[name] =
None`, so any attempt to import one raises ImportError), as if they were not installed. The static
counterpart, which also sees imports inside functions, is tests/test_layers.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from chatvla.cli.main import OPTIONAL_MODULES

CLIENT_DIR = Path(__file__).resolve().parents[2] / "src" / "chatvla" / "client"

# Every optional dependency's top-level module (each extra's, from the CLI's table) plus what the server's
# settings need, and the server-side packages of this project: none is installed on a plain robot PC.
BLOCKED = tuple(
    sorted(
        set(OPTIONAL_MODULES)
        | {"pydantic", "pydantic_core", "yaml", "starlette", "matplotlib"}
        | {"chatvla.server", "chatvla.engines", "chatvla.model", "chatvla.training"}
    )
)

# Modules that need an optional robot-side extra at import, and the modules that extra brings. Never torch,
# pydantic or yaml. (The arm adapters import their SDK in `connect()`, so they need no exemption.)
EXEMPT: dict[str, tuple[str, ...]] = {
    "chatvla.client.sim.oracle": ("mujoco",),
    "chatvla.client.sim.render": ("mujoco",),
    "chatvla.client.sim.robot": ("mujoco",),
    "chatvla.client.sim.scene": ("mujoco",),
}
NEVER_EXEMPT = ("torch", "transformers", "vllm", "pydantic", "yaml", "fastapi", "uvicorn")


def client_modules() -> list[str]:
    """chatvla.client and every module below it, found from the files (walking the package would import it)."""
    names = []
    for path in sorted(CLIENT_DIR.rglob("*.py")):
        parts = list(path.relative_to(CLIENT_DIR.parents[1]).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


_PROBE = """
import importlib, json, sys, traceback
blocked, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in blocked:
    sys.modules[name] = None
failures = {}
for module in modules:
    try:
        importlib.import_module(module)
    except BaseException:
        failures[module] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def _import_blocked(modules: list[str], blocked: tuple[str, ...]) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(blocked)), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_walk_finds_the_client():
    modules = client_modules()
    assert "chatvla.client" in modules and "chatvla.client.executor" in modules
    assert "chatvla.client.sim.tasks.base" in modules  # sub-packages too
    for module in EXEMPT:
        assert module in modules, f"stale exemption: {module} does not exist"
        assert not set(EXEMPT[module]) & set(NEVER_EXEMPT), f"{module} may never need {EXEMPT[module]}"


def test_every_client_module_imports_without_the_optional_dependencies():
    failures: dict[str, str] = {}
    plain = [m for m in client_modules() if m not in EXEMPT]
    failures.update(_import_blocked(plain, BLOCKED))
    # Each exempt module in a fresh interpreter with only its own extra allowed (if that extra is installed).
    for module, allowed in EXEMPT.items():
        if not all(importlib.util.find_spec(lib) for lib in allowed):
            continue
        failures.update(_import_blocked([module], tuple(b for b in BLOCKED if b not in allowed)))
    assert not failures, "client modules that need a module a robot PC does not have:\n" + "\n".join(
        f"--- {m}\n{tb}" for m, tb in failures.items()
    )


def test_the_probe_notices_a_blocked_import():
    failures = _import_blocked(["json", "yaml"], ("yaml",))
    assert list(failures) == ["yaml"]


_CLI = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
from chatvla.cli.main import main
try:
    code = main(sys.argv[2:])
except SystemExit as e:
    code = e.code
sys.exit(code or 0)
"""


@pytest.mark.parametrize("argv", [["--help"], ["record", "--help"], ["inspect", "--help"], ["loadtest", "--help"]])
def test_client_side_commands_start_without_the_server_extra(argv):
    """The `chatvla` entry point and the commands a robot PC runs must not need the server extra (or the sim,
    plot or arm extras) just to parse their arguments."""
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, json.dumps(BLOCKED), *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"chatvla {' '.join(argv)}: {proc.stderr[-3000:]}"
    assert "usage: chatvla" in proc.stdout
