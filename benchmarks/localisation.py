"""Does the model read a scene, or remember it? Its own reasoning on recorded layouts against new ones.

    python benchmarks/localisation.py [--model chatvla-tiny-mm] [--model runs/other] [--scenes 30] [--name NAME]

For each model this resets the sim to `--scenes` math-matching tasks whose layouts were recorded for
training (task seeds 0.., the first frame of each training episode) and to as many it never saw (task
seeds from 920000, training split), lets the model decode its reasoning from the two camera images
(greedy, as served), and judges the text: sum and card right, the answer card's stated place within
`labels.PLACE_TOL_CM`, and how far the stated card's stated place is from where that card lies. A
model that is right on recorded layouts and wrong on new ones has learnt the layouts by heart.

Prints a table and writes benchmarks/results/localisation.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rendering_missing, table, write_result

from chatvla.training.labels import (
    PLACE_TOL_CM,
    answer_place,
    judge_reasoning,
    place_error_cm,
    stated_place_error_cm,
    where_is_card,
)

SETS = {"recorded layouts": 0, "new layouts": 920_000}  # first task seed of each set


def judge_set(model: Any, robot_box: list[Any], first_seed: int, n: int) -> dict[str, Any]:
    """Decode and judge `n` scenes from task seed `first_seed`; `robot_box` keeps one sim robot."""
    from chatvla.client.sim.robot import make_sim_robot
    from chatvla.client.sim.tasks import MathMatchingTask, make_task
    from chatvla.client.sim.tasks.math_matching import card_name

    right = placed = asked = found = 0
    errors: list[float] = []
    card_errors: list[float] = []
    distinct: list[int] = []
    for i in range(n):
        task = make_task("math_matching", seed=first_seed + i, split="train")
        assert isinstance(task, MathMatchingTask)
        if not robot_box:
            robot_box.append(make_sim_robot("franka_joint", task))
        obs = robot_box[0].reset(task)
        poses = robot_box[0].object_poses()
        text = model.reason([model.prepare(obs.images, task.instruction)])[0].text
        j = judge_reasoning(task, text, poses)
        right += j.correct
        placed += bool(j.place_ok)
        err = stated_place_error_cm(text, poses)
        if err is not None:
            errors.append(err)
        # Every card of the scene, asked for by number: a model that finds card N by its label states
        # a different place for each card; one that cannot states one place for all of them.
        answers = model.reason([model.prepare(obs.images, where_is_card(c)) for c in task.card_numbers])
        places = set()
        for c, a in zip(task.card_numbers, answers):
            asked += 1
            stated = answer_place(a.text)
            if stated is not None:
                ce = place_error_cm(stated, poses[card_name(c)])
                card_errors.append(ce)
                found += ce <= PLACE_TOL_CM
                places.add(stated)
        distinct.append(len(places))
    e = np.asarray(errors, float)
    ce_all = np.asarray(card_errors, float)
    return {
        "scenes": n, "reasoning_right": right, f"place_within_{PLACE_TOL_CM}cm": placed,
        "stated_card_on_table": int(e.size),
        "place_error_cm_median": round(float(np.median(e)), 1) if e.size else None,
        "place_error_cm_p90": round(float(np.percentile(e, 90)), 1) if e.size else None,
        "card_questions": asked, f"card_question_within_{PLACE_TOL_CM}cm": found,
        "card_question_error_cm_median": round(float(np.median(ce_all)), 1) if ce_all.size else None,
        "distinct_places_per_scene_mean": round(float(np.mean(distinct)), 2),
        "cards_per_scene_mean": round(asked / n, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="model to test (repeatable; default chatvla-tiny-mm)")
    ap.add_argument("--scenes", type=int, default=30, help="scenes per set (default 30)")
    ap.add_argument("--name", default="localisation",
                    help="result file under benchmarks/results/ (default localisation; another name keeps that one)")
    args = ap.parse_args()
    import torch

    from chatvla.model import load_model

    if rendering_missing("localisation"):
        return 2
    torch.manual_seed(0)
    rows, results = [], {}
    for name in args.model or ["chatvla-tiny-mm"]:
        model = load_model(name)
        robot_box: list[Any] = []
        t0 = time.perf_counter()
        try:
            for set_name, first in SETS.items():
                r = judge_set(model, robot_box, first, args.scenes)
                results.setdefault(name, {})[set_name] = r
                rows.append({"model": name, "set": set_name, "right": f"{r['reasoning_right']}/{r['scenes']}",
                             f"place<={PLACE_TOL_CM}cm": f"{r[f'place_within_{PLACE_TOL_CM}cm']}/{r['scenes']}",
                             "err median cm": r["place_error_cm_median"], "err p90 cm": r["place_error_cm_p90"],
                             f"card N asked, <={PLACE_TOL_CM}cm":
                                 f"{r[f'card_question_within_{PLACE_TOL_CM}cm']}/{r['card_questions']}",
                             "card N err median": r["card_question_error_cm_median"],
                             "places/scene": f"{r['distinct_places_per_scene_mean']} of {r['cards_per_scene_mean']}"})
        finally:
            if robot_box:
                robot_box[0].close()
        print(f"[localisation] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows))
    path = write_result(args.name, {"scenes_per_set": args.scenes, "sets": SETS, "models": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
