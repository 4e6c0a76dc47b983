"""What more DDIM steps cost: the action expert's time per chunk at several step counts, on this CPU.

    python benchmarks/ddim_steps.py [--model chatvla-tiny-mm] [--steps 10,20,40] [--batches 1,3,16]

The sampler's step count is a serving choice (config.json `chatvla.sampler.num_inference_steps`): more
steps can place a chunk more precisely, and every step is one more pass of the expert's head. This
times the expert stage alone (the VLM's reasoning is computed once and reused), every step count
interleaved within each repeat so they all see the same machine, and reports each count's time as
a ratio to the first count's. Prints a table and writes benchmarks/results/ddim_steps.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, random_prompts, table, write_result

from chatvla.model import load_model
from chatvla.model.ddim import DDIM


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="chatvla-tiny-mm")
    ap.add_argument("--steps", default="10,20,40", help="comma-separated DDIM step counts; the first is the baseline")
    ap.add_argument("--batches", default="1,3,16")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    counts = [int(x) for x in args.steps.split(",")]
    model = load_model(args.model)
    prof = model.cfg.profile
    base_cfg = model.cfg.sampler
    samplers = {n: DDIM(dataclasses.replace(base_cfg, num_inference_steps=n)) for n in counts}
    rng = np.random.default_rng(0)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prepared = random_prompts(model, b, rng)
        outs = model.reason(prepared)
        states = np.zeros((b, prof.state_dim), np.float32)
        times: dict[int, list[float]] = {n: [] for n in counts}
        for rep in range(args.repeats + 1):
            for n in counts:
                model.expert.ddim = samplers[n]
                t0 = time.perf_counter()
                model.sample_actions(outs, states, seeds=[None] * b)
                if rep:  # the first round warms up
                    times[n].append(time.perf_counter() - t0)
        for n in counts:
            t = median(times[n])
            rows.append({"batch": b, "ddim_steps": n, "expert_ms": 1000 * t,
                         "ratio_to_first": t / median(times[counts[0]])})
        print(f"batch {b}: done", file=sys.stderr)
    print(f"model {model.cfg.model_id}: serves {base_cfg.num_inference_steps} DDIM steps")
    print(table(rows))
    path = write_result("ddim_steps", {"model": args.model, "steps": counts, "repeats": args.repeats, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
