"""How far the action expert's chunk lands from the demonstration, row by row, open loop.

    python benchmarks/expert_precision.py --model runs/mm22 [--model runs/mm20 ...] \
        --features runs/mm20/train/stage2_features.safetensors [--ticks 768] [--name expert_precision]

`--features` is a stage-2 feature cache (`chatvla train` writes it to OUT/train/): the frozen VLM's
pooled prompt and reasoning rows of strided training ticks, with each tick's joint state and the
demonstrated chunk. Every model is given the same ticks and samples from zero noise, as
`chatvla serve` does by default; the VLMs of the compared models must be the same (the cache holds
one VLM's features; a stage-2 run from `--init` keeps it).

Two sets of ticks:

  all      ticks drawn uniformly from the cache
  pause    the pause before the fingers close: gripper open in the state and in the chunk's first row,
           closing by row 8. The demonstration holds still here, so whatever the expert gets wrong is
           precision, not a guess about when the next motion starts; 1 cm of tool height is about
           0.02 rad on the Panda's shoulder and elbow

Per model, set and row: the RMS error over the arm's joints (robot units, rad). Rows 0-8 are the ones
a robot executes (the rest is overwritten by the next chunk). Two baselines on the pause ticks put the
figures in scale: `stay` (every target is the current joint state) and `ridge` (a ridge regression from
the joint state and both pooled feature vectors to the chunk's offsets, feature_probe.py's: fitted on
the first five sixths of the cache's pause ticks and scored on the rest, which the cache's episode order
makes other episodes). Prints a table and writes benchmarks/results/expert_precision.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result
from feature_probe import LAMBDAS, ridge_rmse

from chatvla.model import load_model

GRIPPER_OPEN = 0.075  # metres: fully open is 0.08
GRIPPER_CLOSING = 0.07
SHOWN_ROWS = (0, 2, 4, 6, 8, 12, 15)


def pause_ticks(feats: dict[str, torch.Tensor], gripper: int) -> torch.Tensor:
    g, sg = feats["chunks"][:, :, gripper], feats["states"][:, gripper]
    return torch.nonzero((sg > GRIPPER_OPEN) & (g[:, 0] > GRIPPER_OPEN) & (g[:, 8] < GRIPPER_CLOSING)).flatten()


def row_errors(model: Any, feats: dict[str, torch.Tensor], idx: torch.Tensor, arm: list[int]) -> list[float]:
    """RMS over samples and arm joints of (zero-noise chunk - demonstrated chunk), per row."""
    ex = model.expert.eval()
    h, a = feats["chunks"].shape[1:]
    with torch.no_grad():
        pred = ex.sample(feats["prompt"][idx], feats["reasoning"][idx], feats["states"][idx],
                         torch.zeros(len(idx), h, a))
    err = (pred - feats["chunks"][idx].float())[..., arm]
    return [float(v) for v in err.pow(2).mean((0, 2)).sqrt()]


def baselines(feats: dict[str, torch.Tensor], pause: torch.Tensor, arm: list[int]) -> dict[str, list[float]]:
    """Per-row RMS of the `stay` and `ridge` predictors on the pause ticks (see the module docstring);
    the ridge is feature_probe.py's (standardised features, the cache's first 5/6 of these ticks to fit,
    the rest to score, the best of its regularisations)."""
    states, chunks = feats["states"][pause].double(), feats["chunks"][pause].double()
    off = (chunks[..., arm] - states[:, None, arm]).numpy()
    x = np.concatenate([states.numpy(), feats["prompt"][pause].double().numpy(),
                        feats["reasoning"][pause].double().numpy()], 1)
    y = off.reshape(len(pause), -1)
    fits = [ridge_rmse(x, y, lam) for lam in LAMBDAS]
    ridge = min(fits, key=lambda f: float((f ** 2).mean())).reshape(off.shape[1:])
    return {"stay": [float(v) for v in np.sqrt((off ** 2).mean((0, 2)))],
            "ridge": [float(v) for v in np.sqrt((ridge ** 2).mean(1))]}


def row_summary(errs: list[float]) -> dict[str, Any]:
    return {**{f"row{r}": round(errs[r], 4) for r in SHOWN_ROWS}, "rows_0_8_mean": round(sum(errs[:9]) / 9, 4),
            "per_row_rad": [round(e, 5) for e in errs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="checkpoint directory (repeatable)")
    ap.add_argument("--features", required=True, help="a stage-2 feature cache (OUT/train/stage2_features.safetensors)")
    ap.add_argument("--ticks", type=int, default=768, help="ticks per set (default 768)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="expert_precision")
    args = ap.parse_args()
    if args.ticks < 1:
        print("expert_precision.py: --ticks must be positive", file=sys.stderr)
        return 2
    path = Path(args.features)
    if not path.is_file():
        print(f"expert_precision.py: no feature cache at {path} (chatvla train writes OUT/train/"
              "stage2_features.safetensors)", file=sys.stderr)
        return 2
    feats = load_file(str(path))
    gen = torch.Generator().manual_seed(args.seed)
    n = feats["prompt"].shape[0]
    pause = pause_ticks(feats, gripper=feats["chunks"].shape[2] - 1)
    sets = {"all": torch.randint(0, n, (args.ticks,), generator=gen),
            "pause": pause[torch.randperm(len(pause), generator=gen)[: args.ticks]]}
    rows: list[dict[str, Any]] = []
    for name in args.model:
        model = load_model(name)
        dims = feats["chunks"].shape[2]
        grip = set(model.cfg.profile.gripper_indices) if model.cfg.profile is not None else {dims - 1}
        arm = [i for i in range(dims) if i not in grip]
        per_row = model.stats is not None and model.stats.per_row
        for set_name, idx in sets.items():
            errs = row_errors(model, feats, idx, arm)
            rows.append({"model": name, "action_ranges": "per-row" if per_row else "per-dim",
                         "prediction": model.cfg.sampler.prediction_type, "ticks": set_name, "n": len(idx),
                         **row_summary(errs)})
    for base, errs in baselines(feats, pause, arm).items():
        rows.append({"model": f"baseline: {base}", "action_ranges": "", "prediction": "", "ticks": "pause",
                     "n": len(pause) if base == "stay" else len(pause) - len(pause) * 5 // 6,
                     **row_summary(errs)})
    print(table(rows, ["model", "action_ranges", "prediction", "ticks", "n", *(f"row{r}" for r in SHOWN_ROWS),
                       "rows_0_8_mean"]))
    out = write_result(args.name, {"features": str(path), "ticks": args.ticks, "seed": args.seed,
                                   "pause_ticks_in_cache": len(pause), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
