"""`chatvla train`: two-stage ChatVLA-2 training from recorded episodes into a servable checkpoint.

    chatvla record --robot sim-panda --policy oracle --task math_matching --episodes 400 --out data/mm
    chatvla train --data data/mm --out runs/mm            # stage 1, then stage 2; resumes if interrupted
    chatvla serve --model runs/mm

    chatvla record --robot sim-bimanual --policy oracle --task toy_placement --episodes 400 --out data/toy
    chatvla train --task toy_placement --data data/toy --out runs/toy   # preset tiny-sim-bimanual

With --card-steps, a stage 0 first trains the vision tower alone to read the cards' labels on crops
of rendered scenes. Stage 1 co-trains the VLM (reasoning text for every robot observation, image-text questions about
rendered scenes, MoE load balancing) with the action expert's diffusion loss. Stage 2 freezes the VLM,
caches its pooled hidden states once, and trains the action expert with its reasoning-following
module. Normalisation statistics are computed from the episodes and saved as `stats.json`.
Re-running the same command continues from `OUT/train/` (pass --restart to start over).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatvla.model.chatvla2 import ChatVLA2
    from chatvla.profiles import RobotProfile
    from chatvla.training.data import Scene


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from chatvla.training.data import TASK_PRESETS
    from chatvla.training.stages import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model on recorded episodes (two stages)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="directory of recorded episodes (*.chatvla), repeatable")
    p.add_argument("--out", required=True, help="output checkpoint directory (resumable state in OUT/train/)")
    p.add_argument("--task", default="math_matching", choices=sorted(TASK_PRESETS),
                   help="the task to learn: its episodes are read, its scenes rendered (default math_matching)")
    p.add_argument("--preset", help="model configuration to start from (default: tiny-sim for math_matching, "
                   "tiny-sim-bimanual for toy_placement); its robot profile must be the task's")
    p.add_argument("--init", metavar="MODEL",
                   help="start from this checkpoint's weights (a directory or a shipped model name) instead of the "
                   "preset's seeded ones: fine-tuning, or more training for a finished run. The configuration "
                   "still comes from --preset; the weights must fit it. With no stage-0/1 steps (its VLM kept), "
                   "stage 2 starts from the directory's cached VLM features and computes only added episodes'")
    p.add_argument("--init-vlm", metavar="MODEL",
                   help="start only the VLM (vision tower + language model) from this checkpoint, the action expert "
                   "from the preset's seed: a VLM trained on one robot's scenes taken to another robot or task "
                   "(its VLM configuration must be the preset's; not with --init)")
    p.add_argument("--model-id", help="model id the checkpoint reports to clients (default: the preset's)")
    p.add_argument("--serve-reasoning-every-n", type=int, default=1, metavar="N",
                   help="the reasoning refresh the checkpoint asks servers for by default: new text every N "
                   "observations, the ones between pre-fill the last text (default 1: every observation, what an "
                   "expert trained on each tick's own text needs; with --stage2-old-text the expert follows older "
                   "text too). A server's --reasoning-every-n overrides it")
    p.add_argument("--serve-reasoning-every-seconds", type=float, default=0.0, metavar="S",
                   help="and new text after S seconds (default 0: off)")
    p.add_argument("--relative-actions", action="store_true",
                   help="predict joint targets as offsets from the current state (the tiny-sim preset does)")
    p.add_argument("--action-ranges", choices=("per-dim", "per-row"), default="per-dim",
                   help="how actions are scaled to [-1, 1]: one range per dimension (default), or one per chunk "
                   "row too (stats.json action_min_rows/max_rows; served as they are), so that with "
                   "--relative-actions the near rows are not a sliver of the far rows' range")
    p.add_argument("--prediction", choices=("epsilon", "sample", "v_prediction"), default=None,
                   help="what the expert's head predicts: the noise (epsilon, the authors' and the presets' "
                   "default), the clean chunk (sample) or v; written to config.json's sampler, which serving reads")
    p.add_argument("--device", default=d.device, help="torch device: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for weights and batches (default {d.seed})")
    p.add_argument("--stage1-steps", type=int, default=d.stage1_steps,
                   help=f"stage 1 optimiser steps (default {d.stage1_steps})")
    p.add_argument("--stage2-steps", type=int, default=d.stage2_steps,
                   help=f"stage 2 optimiser steps (default {d.stage2_steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"stage 1 batch (default {d.batch_size})")
    p.add_argument("--stage2-batch-size", type=int, default=d.stage2_batch_size,
                   help=f"stage 2 batch (default {d.stage2_batch_size})")
    p.add_argument("--scenes", type=int, default=1000,
                   help="extra rendered scenes for image-text questions and the task's reasoning (default 1000; "
                   "0: the episodes' first frames only)")
    p.add_argument("--scene-cache", default=None, metavar="DIR",
                   help="keep the rendered scenes here and reuse them when a run asks for the same ones (same "
                   "task, robot, --scenes and --seed): a resumed or a follow-up run skips rendering (default: "
                   "OUT/train; about 0.3 MB a scene)")
    p.add_argument("--scene-reasoning", type=float, default=d.scene_reasoning_fraction,
                   help="share of each stage-1 batch that teaches the task's reasoning on rendered scenes "
                   f"(many layouts, so places are read from pixels, not remembered) (default "
                   f"{d.scene_reasoning_fraction}; 0: off)")
    p.add_argument("--place-weight", type=float, default=d.place_weight,
                   help=f"weight of the stage-1 place read-out loss on the pooled hidden states (default "
                   f"{d.place_weight}; 0: off)")
    p.add_argument("--card-token-weight", type=float, default=d.card_token_weight,
                   help="weight of the stage-1 loss that asks each vision token which card number it shows, on "
                   f"rendered math-matching scenes (teaches the vision tower to read the cards) (default "
                   f"{d.card_token_weight}; 0: off)")
    p.add_argument("--card-place-weight", type=float, default=d.card_place_weight,
                   help="weight of the stage-1 loss that asks the decoder's image row of each card where that card "
                   f"lies on the table, on rendered math-matching scenes (default {d.card_place_weight}; 0: off)")
    p.add_argument("--card-cell-weight", type=float, default=d.card_cell_weight,
                   help="weight of the stage-1 loss that asks the same image rows which 2 cm cell each coordinate of "
                   f"their card's place falls in, as the text writes it (default {d.card_cell_weight}; 0: off)")
    p.add_argument("--pointer-weight", type=float, default=d.pointer_weight,
                   help="weight of the stage-1 loss that asks one attention head, on the rows that write \"card N "
                   "at (x, y)\", to look at the image rows that show card N, on rendered math-matching scenes "
                   f"(default {d.pointer_weight}; 0: off)")
    p.add_argument("--arithmetic", type=int, default=d.arithmetic, metavar="N",
                   help="text-only sums (\"What is 68+73?\", operands up to 99, never a held-out number) added to "
                   "each stage-1 step: arithmetic the paper's VLM brings from pretraining, so that held-out "
                   f"answers are added, not looked up (default {d.arithmetic}: off)")
    p.add_argument("--arithmetic-max", type=int, default=d.arithmetic_max, metavar="N",
                   help="largest operand of those sums; above 99, half of them keep to operands up to 99 (the "
                   "boards' range) and half go up to N, too many sums to learn as a table "
                   f"(default {d.arithmetic_max})")
    p.add_argument("--arithmetic-scenes", type=int, default=d.arithmetic_scenes, metavar="N",
                   help="N more of those sums in each stage-1 step, asked with a rendered scene's cameras in the "
                   "prompt, so that adding is learnt where the board's sums are written too "
                   f"(default {d.arithmetic_scenes}: off)")
    p.add_argument("--sums-continued", type=int, default=d.sums_continued, metavar="N",
                   help="N rows in each stage-1 step where the model finishes a sum begun in its own reasoning "
                   "and names its card (\"68+73=\" given, \"141. Pick card 141\" written, only the two "
                   "numbers' digits scored), on a recorded tick's prompt (its instruction and cameras): the "
                   "board's answer cannot be looked up there, only added "
                   f"(default {d.sums_continued}: off)")
    p.add_argument("--card-steps", type=int, default=d.card_steps,
                   help="stage 0 before stage 1: steps that train the vision tower alone to read the cards' labels "
                   f"on crops of the rendered scenes ({d.card_batch_size} crops a step; math_matching, needs "
                   f"--scenes) (default {d.card_steps}: no stage 0)")
    p.add_argument("--stage2-tick-stride", type=int, default=d.stage2_tick_stride,
                   help=f"cache every Nth tick for stage 2 (default {d.stage2_tick_stride})")
    p.add_argument("--prompt-shuffle", type=float, default=d.prompt_shuffle,
                   help="stage 2: share of samples whose prompt features (the images' pooled hidden states) come "
                   "from another tick, so the expert must take the card's and the square's places from the "
                   f"reasoning (default {d.prompt_shuffle}; 0: off)")
    p.add_argument("--stage2-old-text", type=float, default=d.stage2_old_text,
                   help="stage 2: share of ticks that carry an earlier tick's reasoning text (half of them the "
                   "episode's first), so the expert follows text decoded a few observations ago, as a dual-rate "
                   f"reasoning policy serves it (default {d.stage2_old_text}; 0: off)")
    p.add_argument("--stage2-ema", type=float, default=d.stage2_ema,
                   help="stage 2: decay of a moving average of the expert's weights, which is what the checkpoint "
                   "then holds and serves (e.g. 0.999: about the last 1,000 steps; default "
                   f"{d.stage2_ema}: off, the last step's weights)")
    p.add_argument("--max-episodes", type=int, default=0, help="use at most this many episodes (0 = all)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N stage-1 steps")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: all cores)")
    p.add_argument("--restart", action="store_true", help="discard OUT/train/ and start from scratch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def start_from(model: ChatVLA2, init: ChatVLA2, *, vlm_only: bool) -> str | None:
    """Copy `init`'s weights into `model` (all of them, or the VLM's only); the reason it cannot, else None.

    The VLM alone transfers across robots: the vision tower and the language model do not depend on the
    action space, the expert does (its action and state sizes, its chunk length)."""
    src, dst = (init.vlm, model.vlm) if vlm_only else (init, model)
    have, want = src.state_dict(), dst.state_dict()
    # checked before copying: a failing load_state_dict has already copied the tensors that did fit
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = [f"{k}: {tuple(have[k].shape)} for {tuple(want[k].shape)}" for k in sorted(set(want) & set(have))
             if have[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        return "; ".join(part for part in (
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
            f"shapes {', '.join(wrong[:5])}" if wrong else "") if part)
    dst.load_state_dict(have, strict=True)
    return None


def rendered_scenes(args: argparse.Namespace, profile: RobotProfile, cache: Path) -> list[Scene]:
    """`args.scenes` rendered scenes, from `cache` when an earlier run left the same ones there."""
    from chatvla.training.data import FIRST_SCENE_SEED, render_scenes
    from chatvla.training.scene_cache import cache_name, load_scenes, save_scenes

    name = cache_name(args.task, profile.name, args.scenes, args.seed, FIRST_SCENE_SEED)
    scenes = load_scenes(cache, name)
    if scenes is not None:
        print(f"[train] {len(scenes)} rendered scenes from {cache / name}.*", file=sys.stderr, flush=True)
        return scenes
    print(f"[train] rendering {args.scenes} scenes for image-text questions", file=sys.stderr, flush=True)
    scenes = render_scenes(profile, args.scenes, seed=args.seed, first_task_seed=FIRST_SCENE_SEED,
                           kind=args.task, progress=not args.quiet)
    try:
        save_scenes(scenes, cache, name)
    except OSError as e:  # a cache is a saving, not a need
        print(f"[train] could not keep the rendered scenes in {cache}: {e}", file=sys.stderr)
    return scenes


def run(args: argparse.Namespace) -> int:
    try:
        import torch

        from chatvla.model import load_model
        from chatvla.model.chatvla2 import ChatVLA2
        from chatvla.model.presets import get_preset
        from chatvla.model.tokenizer import load_tiny_tokenizer
        from chatvla.training.data import (
            TASK_PRESETS,
            TASK_PROFILES,
            DataError,
            Dataset,
            episode_scenes,
            load_episodes,
        )
        from chatvla.training.stages import STATE_DIR, TrainConfig, Trainer
    except ImportError as e:
        print(f"chatvla train: needs the server and sim extras ({e}); pip install 'chatvla-serve[server,sim,plot]'",
              file=sys.stderr)
        return 2
    if args.serve_reasoning_every_n < 1 or not 0 <= args.serve_reasoning_every_seconds < float("inf"):
        print("chatvla train: --serve-reasoning-every-n must be >= 1 and --serve-reasoning-every-seconds finite "
              "and >= 0", file=sys.stderr)
        return 2
    for flag in ("prompt_shuffle", "stage2_old_text"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            print(f"chatvla train: --{flag.replace('_', '-')} must be in [0, 1]", file=sys.stderr)
            return 2
    if not 0.0 <= args.stage2_ema < 1.0:
        print("chatvla train: --stage2-ema must be in [0, 1) (0: off)", file=sys.stderr)
        return 2
    if not 0.0 <= args.scene_reasoning < 1.0:
        print("chatvla train: --scene-reasoning must be in [0, 1)", file=sys.stderr)
        return 2
    if min(args.place_weight, args.card_token_weight, args.card_place_weight, args.card_cell_weight,
           args.pointer_weight) < 0:
        print("chatvla train: --place-weight, --card-token-weight, --card-place-weight, --card-cell-weight and "
              "--pointer-weight "
              "must be >= 0",
              file=sys.stderr)
        return 2
    if args.card_steps and (args.task != "math_matching" or not args.scenes):
        print("chatvla train: --card-steps reads the cards of rendered math-matching scenes: it needs --task "
              "math_matching and --scenes > 0", file=sys.stderr)
        return 2
    if (min(args.stage1_steps, args.stage2_steps, args.scenes, args.max_episodes, args.card_steps,
            args.arithmetic, args.arithmetic_scenes, args.sums_continued) < 0
            or args.batch_size < 1):
        print("chatvla train: step counts, --scenes, --max-episodes, --arithmetic, --arithmetic-scenes and "
              "--sums-continued must be >= 0, --batch-size >= 1", file=sys.stderr)
        return 2
    if args.arithmetic_max < 9:
        print("chatvla train: --arithmetic-max must be >= 9 (sums of single digits at least)", file=sys.stderr)
        return 2
    if args.init and args.init_vlm:
        print("chatvla train: --init and --init-vlm exclude each other (--init already starts the VLM)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    init = None
    init_name = args.init or args.init_vlm
    args.preset = args.preset or TASK_PRESETS[args.task]
    try:
        cfg_model = get_preset(args.preset)
        if init_name:
            init = load_model(init_name, device=args.device)
    except KeyError as e:
        print(f"chatvla train: {e.args[0]}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"chatvla train: {'--init' if args.init else '--init-vlm'} {init_name}: {e}", file=sys.stderr)
        return 2
    if cfg_model.profile is None:
        print(f"chatvla train: preset {args.preset} names no robot profile", file=sys.stderr)
        return 2
    if cfg_model.profile.name != TASK_PROFILES[args.task]:
        print(f"chatvla train: {args.task} is recorded on profile {TASK_PROFILES[args.task]}, preset {args.preset} "
              f"is for {cfg_model.profile.name} (try --preset {TASK_PRESETS[args.task]})", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.restart and (out / STATE_DIR).exists():
        shutil.rmtree(out / STATE_DIR)
    try:  # before minutes of loading and rendering, not at the first checkpoint
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"chatvla train: cannot write to --out {out}: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        episodes = load_episodes(args.data, cfg_model.profile, kinds=(args.task,), progress=not args.quiet)
    except (DataError, OSError, ValueError) as e:
        print(f"chatvla train: {e}", file=sys.stderr)
        return 2
    if args.max_episodes:
        episodes = episodes[: args.max_episodes]
    data = Dataset(cfg_model.profile, episodes)
    data.scenes = episode_scenes(episodes, args.seed)
    if args.scenes:
        data.scenes += rendered_scenes(args, cfg_model.profile, Path(args.scene_cache or out / STATE_DIR))
    tcfg = TrainConfig(seed=args.seed, device=args.device, batch_size=args.batch_size,
                       stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                       stage2_batch_size=args.stage2_batch_size, stage2_tick_stride=args.stage2_tick_stride,
                       save_every=args.save_every, place_weight=args.place_weight,
                       card_token_weight=args.card_token_weight, card_place_weight=args.card_place_weight,
                       card_cell_weight=args.card_cell_weight, pointer_weight=args.pointer_weight,
                       arithmetic=args.arithmetic, arithmetic_max=args.arithmetic_max,
                       arithmetic_scenes=args.arithmetic_scenes, sums_continued=args.sums_continued,
                       card_steps=args.card_steps, prompt_shuffle=args.prompt_shuffle,
                       stage2_old_text=args.stage2_old_text, stage2_ema=args.stage2_ema,
                       scene_reasoning_fraction=args.scene_reasoning)
    if args.model_id:
        cfg_model = cfg_model.with_updates(model_id=args.model_id)
    cfg_model = cfg_model.with_updates(reasoning=replace(
        cfg_model.reasoning, refresh_every_n=args.serve_reasoning_every_n,
        refresh_every_seconds=args.serve_reasoning_every_seconds))
    if args.prediction:
        cfg_model = cfg_model.with_updates(sampler=replace(cfg_model.sampler, prediction_type=args.prediction))
    if args.relative_actions and not cfg_model.expert.relative_to_state:
        grip = set(cfg_model.profile.gripper_indices)
        rel = tuple(i for i in range(cfg_model.expert.action_dim) if i not in grip)
        cfg_model = cfg_model.with_updates(expert=replace(cfg_model.expert, relative_to_state=rel))
    model = ChatVLA2(cfg_model.with_updates(init_seed=cfg_model.init_seed + args.seed), load_tiny_tokenizer(),
                     data.stats(cfg_model.expert.relative_to_state, per_row=args.action_ranges == "per-row"),
                     device=args.device)
    if init is not None:
        problem = start_from(model, init, vlm_only=bool(args.init_vlm))
        if problem:
            flag = "--init-vlm" if args.init_vlm else "--init"
            print(f"chatvla train: {flag} {init_name} does not fit preset {args.preset}: {problem[:500]}",
                  file=sys.stderr)
            return 2
    trainer = Trainer(model, data, out, tcfg, progress_bars=not args.quiet)
    if trainer.resume():
        p = trainer.progress
        print(f"[train] resuming at stage {p.stage}, step {p.step}", file=sys.stderr, flush=True)
    elif args.init and trainer.seed_features(args.init):
        print(f"[train] stage 2 starts from {args.init}'s VLM feature cache (this run keeps that VLM)",
              file=sys.stderr, flush=True)
    print(f"[train] {len(episodes)} episodes ({data.ticks} ticks), {len(data.scenes)} scenes, "
          f"device {args.device}, data ready in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    path = trainer.run()
    print(f"wrote {path} (serve it: chatvla serve --model {path}); loss curve {path / 'loss_curve.png'}")
    return 0
