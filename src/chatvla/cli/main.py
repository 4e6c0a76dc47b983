"""`chatvla <command>`: dispatches to one module per subcommand.

A subcommand module defines `register(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
Modules are imported lazily so that, for instance, `chatvla inspect` on a robot PC never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help). Order is the order of `chatvla --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("chatvla.cli.serve", "serve a model over gRPC + HTTP"),
    "demo": ("chatvla.cli.demo", "start a server and drive simulated robots through episodes"),
    "record": ("chatvla.cli.record", "record episodes from a sim or a real robot"),
    "inspect": ("chatvla.cli.inspect", "summarise and plot a recorded episode file"),
    "loadtest": ("chatvla.cli.loadtest", "replay recordings from many virtual robots against a server"),
    "train": ("chatvla.cli.train", "train a model on recorded episodes (two stages)"),
    "eval": ("chatvla.cli.eval", "closed-loop evaluation of a model on the sim tasks"),
    "model": ("chatvla.cli.model", "build, save, convert and import model checkpoints"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatvla", description="chatvla-serve command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in COMMANDS.items():
        if wanted == name:
            mod = importlib.import_module(module)
            mod.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(COMMANDS[args.command][0])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
