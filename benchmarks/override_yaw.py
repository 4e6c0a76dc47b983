"""Does the card's yaw decide whether an override is followed? A look back at committed eval results.

    python benchmarks/override_yaw.py [EVAL_JSON ...] [--name NAME]

The reasoning text states where a card lies but not how it is turned (up to 20 degrees either way), so
a grasp that misses because the gripper meets the card turned should miss more on the more turned
cards. For every override episode of the given `chatvla eval` results (default: every committed math
matching one) this rebuilds the episode's task from its seed, takes the yaw of the card the text
named, and counts how often that card was placed, by thirds of the yaw range. No model runs: it only
reads the JSON files and the tasks' seeds.

Prints a table and writes benchmarks/results/override_yaw.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, table, write_result

from chatvla.client.sim.tasks.math_matching import card_name
from chatvla.training.evaluate import EVAL_SEED_BASE, MODE_SEED_OFFSETS, episode_task

BINS_DEG = ((0.0, 7.0), (7.0, 14.0), (14.0, 21.0))  # the task draws yaw uniformly in +-0.35 rad (20 degrees)


def named_card_yaws(path: Path) -> list[tuple[float, bool]]:
    """(|yaw| in degrees of the named card, was it placed) per override episode of one eval result."""
    doc = json.loads(path.read_text())
    rows = []
    for ep in doc.get("episodes", []):
        if ep.get("mode") != "override" or ep.get("override_card") is None or ep.get("error"):
            continue
        task = episode_task("override", ep["seed"] - EVAL_SEED_BASE - MODE_SEED_OFFSETS["override"])
        spec = next(o for o in task.objects if o.name == card_name(ep["override_card"]))
        rows.append((abs(math.degrees(spec.yaw)), bool(ep["override_followed"])))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="eval JSON files (default: the committed ones)")
    ap.add_argument("--name", default="override_yaw")
    args = ap.parse_args()
    paths = args.results or sorted(p for p in RESULTS.glob("eval_math_matching*.json")
                                   if p.name != "eval_math_matching.json")  # that one is a copy of a run's
    out: list[dict[str, Any]] = []
    pooled = {b: [0, 0] for b in BINS_DEG}
    for path in paths:
        rows = named_card_yaws(path)
        if not rows:
            continue
        row: dict[str, Any] = {"result": path.name, "episodes": len(rows)}
        for lo, hi in BINS_DEG:
            hits = [ok for yaw, ok in rows if lo <= yaw < hi]
            row[f"{lo:.0f}-{hi:.0f} deg"] = f"{sum(hits)}/{len(hits)}"
            pooled[(lo, hi)][0] += sum(hits)
            pooled[(lo, hi)][1] += len(hits)
        out.append(row)
    if not out:
        print("no override episodes in", [str(p) for p in paths], file=sys.stderr)
        return 1
    total: dict[str, Any] = {"result": "all", "episodes": sum(r["episodes"] for r in out)}
    for (lo, hi), (k, n) in pooled.items():
        total[f"{lo:.0f}-{hi:.0f} deg"] = f"{k}/{n} = {k / n:.0%}" if n else "-"
    out.append(total)
    print(table(out))
    print("wrote", write_result(args.name, {"rows": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
