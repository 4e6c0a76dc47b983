"""Cost of one simulated control step (physics for one tick + rendering every profile camera at
224x224), per rig, against the control period it must fit in.

Run: MUJOCO_GL=egl .venv/bin/python benchmarks/sim_step.py [--steps 150]
Prints a table and writes benchmarks/results/sim_step.json. Figures are medians and p90 over a
moving arm (a slow sine on every joint), so contact-free physics plus full renders; the 2-core
machines this runs on are shared, hence p90 as well as the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np

from chatvla.client.sim.robot import make_sim_robot
from chatvla.client.sim.tasks import make_task

RESULTS = Path(__file__).resolve().parent / "results" / "sim_step.json"


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "median": round(float(np.median(a)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "min": round(float(a.min()), 2),
    }


def bench(profile: str, steps: int) -> dict:
    t0 = time.perf_counter()
    robot = make_sim_robot(profile, make_task("math_matching", 0))
    build_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    robot.reset(make_task("toy_placement", 1))  # a new episode: rebuild the scene and its renderers
    reset_ms = (time.perf_counter() - t0) * 1e3
    home = np.asarray(robot.rig.reset_q, float)
    step = np.asarray(robot.profile.max_step) * 0.3
    physics, render, total = [], [], []
    for i in range(steps + 10):
        action = home + step * np.sin(i / 15.0) * 10
        action[list(robot.profile.gripper_indices)] = home[list(robot.profile.gripper_indices)]
        a = time.perf_counter()
        robot.command(action)
        b = time.perf_counter()
        robot.observe()
        c = time.perf_counter()
        if i >= 10:  # warm-up
            physics.append((b - a) * 1e3)
            render.append((c - b) * 1e3)
            total.append((c - a) * 1e3)
    n_cams = len(robot.profile.cameras)
    budget = robot.profile.dt * 1e3
    faces = int(robot.model.nmeshface)
    robot.close()
    tot = _stats(total)
    return {
        "profile": profile,
        "cameras": n_cams,
        "rate_hz": robot.profile.control_rate_hz,
        "budget_ms": round(budget, 1),
        "substeps": robot.rig.n_substeps,
        "mesh_faces": faces,
        "first_build_ms": round(build_ms, 1),
        "reset_new_task_ms": round(reset_ms, 1),
        "physics_ms": _stats(physics),
        "render_ms": _stats(render),
        "render_per_frame_ms": round(_stats(render)["median"] / n_cams, 2),
        "step_ms": tot,
        "budget_used_median": round(tot["median"] / budget, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    rows = [bench(p, args.steps) for p in ("franka_joint", "arx_r5_bimanual")]
    head = (
        f"{'profile':<17}{'cams':>5}{'Hz':>5}{'budget':>8}{'physics':>9}{'render':>9}{'/frame':>8}"
        f"{'step min':>10}{'step p50':>10}{'step p90':>10}{'used':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['profile']:<17}{r['cameras']:>5}{r['rate_hz']:>5.0f}{r['budget_ms']:>8.1f}"
            f"{r['physics_ms']['median']:>9.2f}{r['render_ms']['median']:>9.2f}{r['render_per_frame_ms']:>8.2f}"
            f"{r['step_ms']['min']:>10.2f}{r['step_ms']['median']:>10.2f}{r['step_ms']['p90']:>10.2f}"
            f"{r['budget_used_median']:>6.0%}"
        )
    print("(ms; physics = one control tick of substeps, render = all cameras at 224x224, medians;")
    print(f" used = median step / control period. The machine is shared: load average {os.getloadavg()[0]:.1f})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "mujoco": mujoco.__version__,
        "gl": os.environ.get("MUJOCO_GL"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    RESULTS.write_text(json.dumps({"meta": meta, "rigs": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
