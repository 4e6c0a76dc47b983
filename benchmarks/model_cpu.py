"""Reasoning tokens/s and action chunks/s of the tiny preset on this CPU, at batch 1, 4 and 16.

    python benchmarks/model_cpu.py [--model tiny] [--repeats 5] [--moe-path both]

Prints a table and writes benchmarks/results/model_cpu.json. Throughput is per batch call (median
of the repeats, after one warm-up call); tokens/s counts the generated reasoning tokens of all rows.
`--moe-path both` times every batch twice, interleaved: with the MoE blocks' dense path for small calls
(the default, `moe.DENSE_ROUTING_MAX_TOKENS`) and with every call gathering per expert, and reports the
ratio of the reasoning times (gather / dense: above 1, the dense path is faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, random_prompts, table, write_result

from chatvla.model import load_model, moe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--moe-path", choices=("dense", "gather", "both"), default="dense",
                    help="MoE path for small calls: the default dense one, gathering per expert, or both")
    args = ap.parse_args()
    paths = ("dense", "gather") if args.moe_path == "both" else (args.moe_path,)
    dense_max = moe.DENSE_ROUTING_MAX_TOKENS
    model = load_model(args.model)
    prof = model.cfg.profile
    rng = np.random.default_rng(0)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prepared = random_prompts(model, b, rng)
        states = np.zeros((b, prof.state_dim), np.float32)
        model.reason(prepared)  # warm-up
        times: dict[str, dict[str, list[float]]] = {p: {"r": [], "a": [], "tok": []} for p in paths}
        for rep in range(args.repeats):
            for path in paths:  # interleaved, so both see the same machine
                moe.DENSE_ROUTING_MAX_TOKENS = dense_max if path == "dense" else 0
                t = times[path]
                t0 = time.perf_counter()
                outs = model.reason(prepared)
                t["r"].append(time.perf_counter() - t0)
                t["tok"].append(sum(len(o.token_ids) for o in outs))
                t0 = time.perf_counter()
                model.sample_actions(outs, states, seeds=list(range(rep * b, rep * b + b)))
                t["a"].append(time.perf_counter() - t0)
        moe.DENSE_ROUTING_MAX_TOKENS = dense_max
        for path in paths:
            t = times[path]
            r, a = median(t["r"]), median(t["a"])
            row = {
                "batch": b,
                "moe_path": path,
                "reasoning_s": r,
                "tokens_per_s": median(t["tok"]) / r,
                "expert_s": a,
                "chunks_per_s": b / a,
                "prompt_tokens": len(prepared[0].input_ids),
                "new_tokens": median(t["tok"]) / b,
            }
            if path == "gather" and "dense" in times:
                row["gather_over_dense"] = r / median(times["dense"]["r"])
            rows.append(row)
        print(f"batch {b}: done", file=sys.stderr)
    print(f"model {model.cfg.model_id}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{model.cfg.sampler.num_inference_steps} DDIM steps")
    print(table(rows))
    for row in rows:
        if "gather_over_dense" in row:
            print(f"batch {row['batch']}: reasoning with the gather path takes {row['gather_over_dense']:.2f}x "
                  "the dense path's time")
    path = write_result("model_cpu", {"model": args.model, "moe_path": args.moe_path, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
