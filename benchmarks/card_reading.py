"""Can the model read the cards? Decoded answers, and a linear probe on the vision tokens.

    python benchmarks/card_reading.py [--model chatvla-tiny-mm] [--model runs/other] [--scenes 40]
                                      [--probe-scenes 800] [--name card_reading]

Finding card N needs its label read from the pixels: about 20 px wide and 6-10 px high in the
224x224 front and wrist images. For each model this measures two things on math-matching scenes of
the training split that no recording or training scene used (task seeds from 920000 and 940000):

  decoded    "Read the cards on the table from left to right." (a stage-1 question), answered by
             greedy decoding as served: the whole row right, and cards right in their place.
  probe      do the vision tokens carry the card's number at all? Each card's centre is projected
             into each camera (`SimRobot.pixels_of`); the merged vision token that holds it (the
             vision tower's output row, what the decoder reads) is a sample labelled with the number.
             A logistic regression fitted on the first 3/4 of `--probe-scenes` scenes is tested on
             the rest, per camera. The same probe on the untrained `tiny-sim` preset (random
             weights) is the baseline a trained tower has to beat; `chance` is the commonest number.

  place      do the decoder's image rows know where their card lies? The same tokens' rows after
             the first two decoder layers (what `--card-place-weight` trains), prompt "Read the
             cards...": a ridge regression fitted on the first 3/4 of the scenes predicts the card's
             place on the table (task frame) on the rest; median error and share within 2 cm.

A token that holds two cards' centres is left out. Prints a table and writes
benchmarks/results/NAME.json (`--name`, default card_reading).
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

READ = "Read the cards on the table from left to right."
DECODE_SEED, PROBE_SEED = 920_000, 940_000
BASELINE = "tiny-sim"


def render(first_seed: int, n: int) -> list[tuple[dict[str, np.ndarray], list[int], dict[str, dict[int, tuple]],
                                                 dict[int, tuple[float, float]]]]:
    """`n` scenes at rest: (images, card numbers left to right, camera -> number -> (col, row) px,
    number -> (x, y) on the table in metres)."""
    from chatvla.client.sim.robot import make_sim_robot
    from chatvla.client.sim.tasks import make_task
    from chatvla.client.sim.tasks.math_matching import card_name
    from chatvla.training.data import card_pixels, card_places

    robot = None
    out = []
    try:
        for i in range(n):
            task = make_task("math_matching", seed=first_seed + i, split="train")
            if robot is None:
                robot = make_sim_robot("franka_joint", task)
            obs = robot.reset(task)
            poses = robot.object_poses()
            cards = sorted((int(c) for c in task.card_numbers), key=lambda c: -float(poses[card_name(c)].pos[1]))
            out.append((dict(obs.images), cards, card_pixels(robot, task), card_places(task, poses)))
    finally:
        if robot is not None:
            robot.close()
    return out


def decoded(model: Any, scenes: list) -> dict[str, Any]:
    rows = cards = right = 0
    examples = []
    for images, numbers, _, _ in scenes:
        text = model.reason([model.prepare(images, READ)])[0].text
        said = [s.strip(" .") for s in text.split("Next action:")[0].split(",")]
        rows += said == [str(c) for c in numbers]
        cards += len(numbers)
        right += sum(a == str(c) for a, c in zip(said, numbers))
        if len(examples) < 5:
            examples.append({"cards": numbers, "answer": text})
    return {"scenes": len(scenes), "row_right": rows, "cards": cards, "cards_right": right, "examples": examples}


def token_samples(model: Any, scenes: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """camera -> (features [N, D] of the tokens holding one card's centre, numbers [N])."""
    import torch

    from chatvla.training.labels import card_token_labels

    feats: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[int]] = {}
    visual = model.vlm.model.visual
    merge = model.prompts.merge_size
    for images, numbers, pixels, _ in scenes:
        prompt = model.prepare(images, READ)
        with torch.no_grad():
            tokens = visual(prompt.pixel_values.to(model.device), grid_thw=prompt.image_grid_thw.to(model.device))
        tokens = getattr(tokens, "pooler_output", tokens).float().cpu().numpy()
        start = 0
        for cam, (t, gh, gw) in zip(model.camera_order, prompt.image_grid_thw.tolist()):
            th, tw = gh // merge, gw // merge
            grid = card_token_labels(pixels[cam], images[cam].shape[:2], (th, tw)).reshape(-1)
            for c in numbers:  # left to right; a card is labelled on a token that holds its centre alone
                for i in np.flatnonzero(grid == c):
                    feats.setdefault(cam, []).append(tokens[start + i])
                    labels.setdefault(cam, []).append(c)
            start += t * th * tw
    return {cam: (np.array(feats[cam]), np.array(labels[cam])) for cam in feats}


def row_places(model: Any, scenes: list, layer: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(decoder image rows [N, D] after `layer` layers of the tokens holding one card's centre, the
    card's (x, y) [N, 2] in metres), both cameras."""
    import torch

    from chatvla.training.batches import Item, collate
    from chatvla.training.stages import vlm_forward_layer

    feats, places = [], []
    for images, _, pixels, where in scenes:
        batch = collate(model, [Item(images, READ, "", card_pixels=pixels, card_places=where)])
        assert batch.card_places is not None
        with torch.no_grad():
            _, rows = vlm_forward_layer(model, batch, layer)
        known = torch.isfinite(batch.card_places).all(-1)
        feats.append(rows[known.to(rows.device)].float().cpu().numpy())
        places.append(batch.card_places[known].numpy())
    return np.concatenate(feats), np.concatenate(places)


def place_probe(x: np.ndarray, y: np.ndarray, fit_fraction: float = 0.75, ridge: float = 1.0) -> dict[str, Any]:
    """Held-out error of a ridge regression (standardised features) from rows to places, in cm."""
    k = int(len(x) * fit_fraction)
    mu, sd = x[:k].mean(0), x[:k].std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(a[:k].T @ a[:k] + ridge * np.eye(a.shape[1]), a[:k].T @ y[:k])
    err = 100 * np.linalg.norm(a[k:] @ w - y[k:], axis=1)
    spread = 100 * np.linalg.norm(y[k:] - y[:k].mean(0), axis=1)
    return {"fit": k, "test": int(len(x) - k), "error_cm_median": round(float(np.median(err)), 2),
            "within_2cm": int((err <= 2).sum()), "mean_guess_error_cm_median": round(float(np.median(spread)), 2)}


def probe_accuracy(x: np.ndarray, y: np.ndarray, fit_fraction: float = 0.75) -> dict[str, Any]:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L2)."""
    import torch

    k = int(len(x) * fit_fraction)
    classes = np.unique(y[:k])
    index = {c: i for i, c in enumerate(classes)}
    keep = np.array([c in index for c in y[k:]])
    mu, sd = x[:k].mean(0), x[:k].std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.tensor([index.get(c, -1) for c in y])
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt[:k]), yt[:k]) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = lin(xt[k:]).argmax(1)
    test = yt[k:][torch.from_numpy(keep)]
    right = int((pred[torch.from_numpy(keep)] == test).sum())
    commonest = int(np.bincount(yt[:k].numpy()).max())
    return {"fit": k, "test": int(keep.sum()), "right": right, "accuracy": round(right / max(int(keep.sum()), 1), 3),
            "chance": round(commonest / k, 3), "numbers": len(classes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="model to test (repeatable; default chatvla-tiny-mm)")
    ap.add_argument("--scenes", type=int, default=40, help="scenes for the decoded answers (default 40)")
    ap.add_argument("--probe-scenes", type=int, default=800, help="scenes for the token probe (default 800)")
    ap.add_argument("--name", default="card_reading",
                    help="result file benchmarks/results/NAME.json (default card_reading)")
    args = ap.parse_args()
    import torch

    from chatvla.model import load_model

    if rendering_missing("card_reading"):
        return 2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    decode_scenes = render(DECODE_SEED, args.scenes)
    probe_scenes = render(PROBE_SEED, args.probe_scenes)
    print(f"[card_reading] rendered {args.scenes + args.probe_scenes} scenes in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    rows, results = [], {}
    for name in [BASELINE, *(args.model or ["chatvla-tiny-mm"])]:
        t0 = time.perf_counter()
        model = load_model(name)
        r: dict[str, Any] = {"trained": name != BASELINE}
        if name != BASELINE:
            r["decoded"] = decoded(model, decode_scenes)
        r["probe"] = {cam: probe_accuracy(x, y) for cam, (x, y) in token_samples(model, probe_scenes).items()}
        r["place"] = place_probe(*row_places(model, probe_scenes))
        results[name] = r
        d = r.get("decoded")
        row = {"model": name,
               "row read": f"{d['row_right']}/{d['scenes']}" if d else "-",
               "cards read": f"{d['cards_right']}/{d['cards']}" if d else "-"}
        for cam, p in r["probe"].items():
            row[f"probe {cam}"] = f"{p['right']}/{p['test']} ({p['accuracy']:.0%}, chance {p['chance']:.0%})"
        pl = r["place"]
        row["rows -> place <=2cm"] = f"{pl['within_2cm']}/{pl['test']}"
        row["median cm (mean guess)"] = f"{pl['error_cm_median']} ({pl['mean_guess_error_cm_median']})"
        rows.append(row)
        print(f"[card_reading] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows))
    path = write_result(args.name, {"decode_scenes": args.scenes, "probe_scenes": args.probe_scenes,
                                         "seeds": {"decoded": DECODE_SEED, "probe": PROBE_SEED},
                                         "baseline": BASELINE, "models": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
