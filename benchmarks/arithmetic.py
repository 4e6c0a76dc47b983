"""Held-out answers: does the model misread the board, or add wrong? Reading and adding, measured apart.

    python benchmarks/arithmetic.py [--model chatvla-tiny-mm] [--model runs/other] [--boards 40] [--name NAME]

For each model, two open-loop sets (greedy decoding, as served; no server):

  boards   rendered math-matching scenes at rest (held-out split from task seed 700000, training split
           from 710000: layouts no run records), the model's own reasoning judged for the operands it
           read off the whiteboard, the sum it wrote, and whether that sum is the sum of what it read
  words    the same held-out problems asked in text alone ("What is 18+23?", no camera): adding
           without reading, in the format `chatvla train --arithmetic` teaches

A held-out answer never appears in training, so a model that learnt the training sums as a table
writes a neighbour ("18+23=40."); one that adds writes 41. Prints a table and writes
benchmarks/results/arithmetic.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rendering_missing, table, write_result

from chatvla.training.labels import stated_sum

SETS = {"heldout": 700_000, "train": 710_000}  # split -> first task seed


def judge_boards(model: Any, split: str, first: int, n: int) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Decode `n` rendered scenes; counts of boards read right, sums right, and sums that add what was
    read; and the (a, b) problems, for the text-only set."""
    from chatvla.client.sim.robot import make_sim_robot
    from chatvla.client.sim.tasks import MathMatchingTask, make_task

    read = right = consistent = 0
    problems, samples = [], []
    robot = None
    try:
        for i in range(n):
            task = make_task("math_matching", seed=first + i, split=split)
            assert isinstance(task, MathMatchingTask)
            robot = robot or make_sim_robot("franka_joint", task)
            obs = robot.reset(task)
            text = model.reason([model.prepare(obs.images, task.instruction)])[0].text
            stated = stated_sum(text)
            problems.append((task.a, task.b))
            if stated is None:
                continue
            a, b, s = stated
            read += (a, b) == (task.a, task.b)
            right += (a, b, s) == (task.a, task.b, task.answer)
            consistent += a + b == s
            if len(samples) < 6:
                samples.append(f"{task.a}+{task.b}: {a}+{b}={s}")
    finally:
        if robot is not None:
            robot.close()
    return {"boards": n, "read_right": read, "sum_right": right, "adds_what_it_read": consistent,
            "samples": samples}, problems


def answer_in_words(model: Any, question: str, max_new_tokens: int = 16) -> str:
    """Greedy answer to a prompt with no camera (the served path always has cameras; this one is short
    and uncached)."""
    import torch

    from chatvla.training.stages import text_forward

    b = model.prompts
    ids = b.encode_text(b.prompt_text(0, question))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + out])
            hidden = text_forward(model, x, torch.ones_like(x))
            token = int(model.vlm.lm_head(hidden[:, -1]).argmax(-1))
            if token == b.eos_id:
                break
            out.append(token)
    return b.tokenizer.decode(out)


def judge_words(model: Any, problems: list[tuple[int, int]]) -> dict[str, Any]:
    """The same problems asked in text alone (no camera)."""
    from chatvla.training.labels import arithmetic_question

    right, samples = 0, []
    for a, b in problems:
        text = answer_in_words(model, arithmetic_question(a, b))
        right += stated_sum(text) == (a, b, a + b)
        if len(samples) < 6:
            samples.append(f"{a}+{b}: {text.strip()[:16]}")
    return {"problems": len(problems), "sum_right": right, "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="model to test (repeatable; default chatvla-tiny-mm)")
    ap.add_argument("--boards", type=int, default=40, help="scenes per split (default 40)")
    ap.add_argument("--name", default="arithmetic",
                    help="result file under benchmarks/results/ (default arithmetic; another name keeps that one)")
    args = ap.parse_args()
    import torch

    from chatvla.model import load_model

    if rendering_missing("arithmetic"):
        return 2
    torch.manual_seed(0)
    rows, results = [], {}
    for name in args.model or ["chatvla-tiny-mm"]:
        model = load_model(name)
        t0 = time.perf_counter()
        for split, first in SETS.items():
            boards, problems = judge_boards(model, split, first, args.boards)
            words = judge_words(model, problems)
            results.setdefault(name, {})[split] = {"boards": boards, "words": words}
            n = boards["boards"]
            rows.append({"model": name, "split": split, "board read": f"{boards['read_right']}/{n}",
                         "sum right": f"{boards['sum_right']}/{n}",
                         "adds what it read": f"{boards['adds_what_it_read']}/{n}",
                         "in words, sum right": f"{words['sum_right']}/{words['problems']}"})
        print(f"[arithmetic] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows))
    path = write_result(args.name, {"boards_per_split": args.boards, "sets": SETS, "models": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
