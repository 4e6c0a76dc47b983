"""`--executor NAME=VALUE`, the robot-side chunk-executor settings that `chatvla eval` and `chatvla demo`
share: declared once so both commands take, check and report them alike."""

from __future__ import annotations

import argparse
import sys

from chatvla.client.executor import ExecutorConfig, executor_config_from


def add_executor_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", action="append", default=[], metavar="NAME=VALUE",
                   help="robot-side chunk executor setting, e.g. blend=replace or frozen_ticks=1 (repeatable; "
                   "the fields of chatvla.client.executor.ExecutorConfig)")


def executor_from_flags(args: argparse.Namespace, command: str) -> ExecutorConfig | None:
    """The settings as a config, or None after printing one line naming what is wrong (the command then
    exits 2 before it starts a server)."""
    try:
        return executor_config_from(args.executor)
    except ValueError as e:
        print(f"chatvla {command}: {e}", file=sys.stderr)
        return None
