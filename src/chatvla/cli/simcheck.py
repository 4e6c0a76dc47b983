"""One check for the commands that drive simulated robots (`demo`, `eval`): is MuJoCo installed, and
can it render headless here? Says what to do instead of a traceback."""

from __future__ import annotations

import sys


def sim_unavailable(command: str) -> bool:
    """Print why the sims cannot run and return True, or register them and return False."""
    try:
        import chatvla.client.sim  # noqa: F401 - registers the sim robots
        from chatvla.client.sim.render import rendering_available
    except ImportError as e:
        from chatvla.cli.main import missing_optional_message

        message = missing_optional_message(f"chatvla {command}", e)
        print(message or f"chatvla {command}: the simulator does not import ({e}); pip install 'chatvla-serve[sim]'",
              file=sys.stderr)
        return True
    ok, detail = rendering_available()
    if not ok:
        print(f"chatvla {command}: MuJoCo cannot render headless here (need EGL or OSMesa; see docs/robots.md): "
              f"{detail}", file=sys.stderr)
        return True
    return False
