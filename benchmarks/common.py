"""Shared by the benchmark scripts: environment facts, a plain-text table, the JSON result file, and random
prompts for timing a model."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def random_prompts(model: Any, count: int, rng: Any) -> list[Any]:
    """`count` prepared prompts of random camera images (one per camera of the model's profile) and
    distinct instructions: inputs whose content does not matter when only the time is measured."""
    return [
        model.prepare({c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype="uint8")
                       for c in model.cfg.profile.cameras}, f"put the card {i} on the plate")
        for i in range(count)
    ]


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    cols = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep, *("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=2) + "\n")
    return path


def rendering_missing(tool: str) -> bool:
    """True (and says why on stderr) when MuJoCo cannot render offscreen here: the scene benchmarks
    then exit with status 2 instead of failing halfway."""
    from chatvla.client.sim.render import rendering_available

    ok, detail = rendering_available()
    if not ok:
        print(f"{tool}: needs offscreen rendering ({detail})", file=sys.stderr)
    return not ok
