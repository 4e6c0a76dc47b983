"""`chatvla model`: inspect presets and checkpoints, write a preset's checkpoint, import the authors' format."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("model", help="build, save, convert and import model checkpoints")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = msub.add_parser("info", help="print a preset's or checkpoint's configuration and parameter counts")
    info.add_argument("model", help="preset name or checkpoint directory")
    save = msub.add_parser("save", help="write a seeded preset (e.g. tiny) as a checkpoint directory")
    save.add_argument("preset", help="seeded preset name, e.g. tiny or tiny-sim")
    save.add_argument("out", help="checkpoint directory to write")
    imp = msub.add_parser("import", help="convert the authors' ChatVLA-2 checkpoint (qwen2_vla layout) offline")
    imp.add_argument("src", help="the authors' checkpoint-N directory")
    imp.add_argument("out", help="where to write the chatvla-serve checkpoint")
    imp.add_argument("--profile", required=True, help="robot profile the checkpoint drives (e.g. arx_r5_bimanual)")
    imp.add_argument("--stats", help="dataset_stats.pkl (default: next to the checkpoint folder)")
    imp.add_argument("--num-heads", type=int, help="DiT heads if the config does not say (default 16)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow reading dataset_stats.pkl (a pickle can run code: only for files you trust)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        if args.model_command == "info":
            return _info(args.model)
        if args.model_command == "save":
            from chatvla.model import load_model
            from chatvla.model.checkpoint import save_checkpoint

            out = save_checkpoint(load_model(args.preset), args.out)
            print(f"wrote {out}")
            return 0
        if args.model_command == "import":
            from chatvla.model.importer import import_authors_checkpoint
            from chatvla.profiles import get_profile

            out = import_authors_checkpoint(args.src, args.out, profile=get_profile(args.profile),
                                            trust_pickle=args.trust_pickle, num_heads=args.num_heads,
                                            stats_path=args.stats)
            print(f"wrote {out}")
            return 0
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"chatvla model {args.model_command}: {e}", file=sys.stderr)
        return 2
    return 2


def _info(model: str) -> int:
    from pathlib import Path

    from chatvla.model.checkpoint import read_config
    from chatvla.model.presets import PRESETS, SHIPPED, get_preset, parameter_counts

    cfg = get_preset(model) if model in PRESETS else read_config(SHIPPED.get(model, Path(model)))
    counts = parameter_counts(cfg)
    print(json.dumps({
        "model_id": cfg.model_id,
        "profile": cfg.profile.name if cfg.profile else None,
        "moe": cfg.moe.kind,
        "experts": cfg.moe.num_experts,
        "top_k": cfg.moe.top_k,
        "shared_experts": cfg.moe.num_shared_experts,
        "expert": {"depth": cfg.expert.depth, "width": cfg.expert.width, "heads": cfg.expert.num_heads,
                   "chunk": cfg.expert.chunk_size, "action_dim": cfg.expert.action_dim,
                   "reasoning_layer_id": cfg.expert.layer_split},
        "parameters": counts,
    }, indent=2))
    return 0
