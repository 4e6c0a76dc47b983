"""Reasoning tokens/s and action chunks/s of the tiny preset on this CPU, at batch 1, 4 and 16.

    python benchmarks/model_cpu.py [--model tiny] [--repeats 5]

Prints a table and writes benchmarks/results/model_cpu.json. Throughput is per batch call (median
of the repeats, after one warm-up call); tokens/s counts the generated reasoning tokens of all rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_result

from chatvla.model import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model(args.model)
    prof = model.cfg.profile
    rng = np.random.default_rng(0)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prepared = [
            model.prepare({c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in prof.cameras},
                          f"put the card {i} on the plate")
            for i in range(b)
        ]
        states = np.zeros((b, prof.state_dim), np.float32)
        model.reason(prepared)  # warm-up
        r_times, tokens, a_times = [], [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            outs = model.reason(prepared)
            r_times.append(time.perf_counter() - t0)
            tokens.append(sum(len(o.token_ids) for o in outs))
            t0 = time.perf_counter()
            model.sample_actions(outs, states, seeds=list(range(rep * b, rep * b + b)))
            a_times.append(time.perf_counter() - t0)
        r, a = median(r_times), median(a_times)
        rows.append({
            "batch": b,
            "reasoning_s": r,
            "tokens_per_s": median(tokens) / r,
            "expert_s": a,
            "chunks_per_s": b / a,
            "prompt_tokens": len(prepared[0].input_ids),
            "new_tokens": median(tokens) / b,
        })
        print(f"batch {b}: done", file=sys.stderr)
    print(f"model {model.cfg.model_id}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model.cfg.sampler.num_inference_steps} DDIM steps")
    print(table(rows))
    path = write_result("model_cpu", {"model": args.model, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
