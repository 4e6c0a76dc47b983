"""Where stating a card's place fails: finding the card (the look-up) or writing what was found (the copy).

    python benchmarks/pointer.py [--model runs/a] [--model runs/b] [--scenes 24] [--head 0] [--layer 2]
                                 [--name NAME]

On `--scenes` rendered math-matching scenes the model never saw (task seeds from 3,000,000, training
split) this feeds, teacher-forced, two texts that state a card's place: the task's reasoning ("...
Pick card N at (x, y), ...") and the answer to "Where is card N?" ("Card N is ..., at (x, y)."). On
each row that writes a token of "(x, y)" it measures:

- the attention mass one head (`--head` of decoder layer `--layer`: the head `chatvla train
  --pointer-weight` trains) puts on the image rows that show card N (the look-up);
- whether the model's most likely next token is the right one (the copy), and whether the whole
  "(x, y)" is right, token by token.

A model whose head finds the card while its digits are wrong fails in the copy, not the look-up.
Prints a table and writes benchmarks/results/pointer.json (or NAME.json).
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

FIRST_SEED = 3_000_000  # new layouts: far from recorded episodes (0..) and rendered training scenes (1,000,000..)


def measure(model: Any, scenes: list[Any], head: int, layer: int) -> dict[str, Any]:
    import torch

    from chatvla.training.batches import Item, collate
    from chatvla.training.labels import cm, where_is_card
    from chatvla.training.stages import AttentionTap, vlm_forward

    items = []
    for s in scenes:
        n = sorted(s.card_places)[0]
        x, y = s.card_places[n]
        items.append(Item(s.images, where_is_card(n), f"Card {n} is on the table, at ({cm(x)}, {cm(y)}).",
                          card_pixels=s.card_pixels, card_places=s.card_places))
        items.append(Item(s.images, s.instruction, s.reasoning, reasoning=True, card_pixels=s.card_pixels,
                          card_places=s.card_places))
    masses: list[float] = []
    tokens_right = tokens = places_right = places = 0
    tap = AttentionTap(model, layer)
    try:
        with torch.no_grad():
            for i in range(0, len(items), 8):
                batch = collate(model, items[i:i + 8])
                hidden = vlm_forward(model, batch)
                weights = tap.take()
                assert weights is not None
                for p in batch.pointers:
                    q = list(p.queries)
                    masses += weights[p.row, head][q][:, list(p.keys)].sum(-1).tolist()
                    guess = model.vlm.lm_head(hidden[p.row, q]).argmax(-1)
                    right = guess == batch.input_ids[p.row, [k + 1 for k in q]].to(guess.device)
                    tokens_right += int(right.sum())
                    tokens += len(q)
                    places_right += bool(right.all())
                    places += 1
    finally:
        tap.close()
    m = np.asarray(masses, float)
    return {"texts": places, "attention_mass_mean": round(float(m.mean()), 3),
            "attention_mass_above_half": round(float((m > 0.5).mean()), 3),
            "place_tokens_right": round(tokens_right / max(tokens, 1), 3),
            "places_right": places_right}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="model to test (repeatable; default chatvla-tiny-mm)")
    ap.add_argument("--scenes", type=int, default=24, help="new scenes (default 24; two texts each)")
    ap.add_argument("--head", type=int, default=0, help="attention head measured (default 0)")
    ap.add_argument("--layer", type=int, default=2, help="decoder layer of that head (default 2)")
    ap.add_argument("--name", default="pointer", help="result file under benchmarks/results/ (default pointer)")
    args = ap.parse_args()
    import torch

    from chatvla.model import load_model
    from chatvla.profiles import FRANKA_JOINT
    from chatvla.training.data import render_scenes

    if rendering_missing("pointer"):
        return 2
    torch.manual_seed(0)
    scenes = render_scenes(FRANKA_JOINT, args.scenes, seed=0, first_task_seed=FIRST_SEED, progress=False)
    rows, results = [], {}
    for name in args.model or ["chatvla-tiny-mm"]:
        t0 = time.perf_counter()
        model = load_model(name)
        model.eval()
        r = measure(model, scenes, args.head, args.layer)
        results[name] = r
        rows.append({"model": name, "texts": r["texts"],
                     f"head {args.head} mass on card N": r["attention_mass_mean"],
                     "mass > 0.5": r["attention_mass_above_half"],
                     "place tokens right": r["place_tokens_right"],
                     "whole place right": f"{r['places_right']}/{r['texts']}"})
        print(f"[pointer] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows))
    path = write_result(args.name, {"scenes": args.scenes, "first_task_seed": FIRST_SEED, "head": args.head,
                                    "layer": args.layer, "models": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
