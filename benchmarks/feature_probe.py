"""How much of "where things are" the expert's inputs carry: linear probes on the pooled hidden states.

    python benchmarks/feature_probe.py [--model chatvla-tiny-mm] [--model runs/other] [--scenes 240]

The action expert sees an observation only through two vectors: the mean of the prompt's last-layer
hidden rows and the mean of the reasoning's. For each model, this renders `--scenes` math-matching
scenes (training split, task seeds from 910000, never recorded), gives the model the correct
reasoning text for each ("12+34=46. Pick card 46 at (-8, -6), place at (6, -18).", prefilled, not
decoded), pools the rows exactly as serving does, and fits ridge regressions on the first 5/6 of the
scenes to predict the answer card's and the green square's places; it reports the RMSE on the rest
against the spread of the targets (RMSE = spread: the vector carries nothing linearly usable).

  reasoning -> stated place   can the expert read the place the text states? (reasoning-following)
  prompt    -> true place     do the image features say where the card is?

Prints a table and writes benchmarks/results/feature_probe.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result

from chatvla.training.labels import END_MARKER, place_targets, reasoning_for, stated_places

TARGETS = ("card_x", "card_y", "square_x", "square_y")
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)


def collect(model_name: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pooled prompt [n, D], pooled reasoning [n, D], true places [n, 4], stated places [n, 4])."""
    import torch

    from chatvla.client.sim.robot import make_sim_robot
    from chatvla.client.sim.tasks import MathMatchingTask, make_task
    from chatvla.model import load_model

    torch.manual_seed(0)
    model = load_model(model_name)
    robot = None
    prompt, reas, true, stated = [], [], [], []
    try:
        for i in range(n):
            task = make_task("math_matching", seed=910_000 + i, split="train")
            assert isinstance(task, MathMatchingTask)
            if robot is None:
                robot = make_sim_robot("franka_joint", task)
            obs = robot.reset(task)
            poses = robot.object_poses()
            text = f"{reasoning_for(task, poses)} {END_MARKER}"
            out = model.prefill([model.prepare(obs.images, task.instruction)], [text])[0]
            p, r = out.pooled()
            prompt.append(p.numpy())
            reas.append(r.numpy())
            t = place_targets(task, poses)
            true.append(t[[0, 1, 3, 4]])
            stated.append(stated_places(t))
    finally:
        if robot is not None:
            robot.close()
    return np.array(prompt), np.array(reas), np.array(true), np.array(stated)


def ridge_rmse(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Held-out RMSE per target of a ridge fit on standardised features (first 5/6 train, rest test)."""
    k = len(x) * 5 // 6
    mu, sd = x[:k].mean(0), x[:k].std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(a[:k].T @ a[:k] + lam * k * np.eye(a.shape[1]), a[:k].T @ y[:k])
    return np.sqrt(((a[k:] @ w - y[k:]) ** 2).mean(0))


def probe(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The best regularisation's held-out RMSE (cm) per target, and the targets' spread (cm)."""
    fits = {lam: ridge_rmse(x, y, lam) for lam in LAMBDAS}
    lam = min(fits, key=lambda v: float(fits[v].mean()))
    k = len(x) * 5 // 6
    spread = y[k:].std(0)
    return {"lambda": lam, "rmse_cm": [round(float(v) * 100, 2) for v in fits[lam]],
            "spread_cm": [round(float(v) * 100, 2) for v in spread],
            "explained": [round(float(1 - (r / s) ** 2), 3) for r, s in zip(fits[lam], spread)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model name or checkpoint directory (repeatable; "
                    "default: the shipped default)")
    ap.add_argument("--scenes", type=int, default=240, help="scenes per model (default 240)")
    ap.add_argument("--name", default="feature_probe", help="result file name (default feature_probe)")
    args = ap.parse_args()
    from chatvla.model.presets import DEFAULT_MODEL

    models = args.model or [DEFAULT_MODEL]
    rows, results = [], {}
    for m in models:
        t0 = time.monotonic()
        prompt, reas, true, stated = collect(m, args.scenes)
        res = {"reasoning -> stated place": probe(reas, stated), "prompt -> true place": probe(prompt, true)}
        results[m] = {**res, "seconds": round(time.monotonic() - t0, 1)}
        for what, r in res.items():
            rows.append({"model": Path(m).name, "probe": what,
                         **{f"{t} rmse/spread cm": f"{a:.1f}/{b:.1f}" for t, a, b in
                            zip(TARGETS, r["rmse_cm"], r["spread_cm"])},
                         "explained (mean)": round(float(np.mean(r["explained"])), 2)})
    print(table(rows))
    path = write_result(args.name, {"scenes": args.scenes, "targets": list(TARGETS), "models": results,
                                    "command": " ".join(["python", "benchmarks/feature_probe.py", *sys.argv[1:]])})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
