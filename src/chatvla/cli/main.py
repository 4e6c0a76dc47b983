"""`chatvla <command>`: dispatches to one module per subcommand.

A subcommand module defines `register(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
Modules are imported lazily so that, for instance, `chatvla inspect` on a robot PC never imports torch.
A command that needs an optional dependency which is not installed ends with one line naming the
package and the `pip install 'chatvla-serve[EXTRA]'` that brings it (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from types import FrameType

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

DISTRIBUTION = "chatvla-serve"

# Top-level module of each optional dependency -> (package on PyPI, extra of chatvla-serve that installs it).
# Must agree with [project.optional-dependencies] in pyproject.toml (a test checks).
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "server"),
    "transformers": ("transformers", "server"),
    "safetensors": ("safetensors", "server"),
    "tokenizers": ("tokenizers", "server"),
    "grpc_health": ("grpcio-health-checking", "server"),
    "grpc_reflection": ("grpcio-reflection", "server"),
    "fastapi": ("fastapi", "server"),
    "uvicorn": ("uvicorn", "server"),
    "multipart": ("python-multipart", "server"),
    "python_multipart": ("python-multipart", "server"),
    "prometheus_client": ("prometheus-client", "server"),
    "websockets": ("websockets", "server"),
    "tqdm": ("tqdm", "server"),
    "pydantic": ("pydantic", "server"),
    "yaml": ("pyyaml", "server"),
    "mujoco": ("mujoco", "sim"),
    "matplotlib": ("matplotlib", "plot"),
    "imageio_ffmpeg": ("imageio-ffmpeg", "video"),
    "panda_py": ("panda-python", "panda"),
    "franky": ("franky-control", "franky"),
    "arx_r5_sdk": ("arx-r5-sdk", "arx"),
    "cv2": ("opencv-python-headless", "camera"),
    "pyrealsense2": ("pyrealsense2", "realsense"),
    "vllm": ("vllm", "vllm"),
}


def missing_optional(exc: BaseException) -> tuple[str, str] | None:
    """(package, extra) if `exc`, or an exception it was raised from, says an optional module is not installed."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModuleNotFoundError) and e.name:
            found = OPTIONAL_MODULES.get(e.name.partition(".")[0])
            if found:
                return found
        e = e.__cause__ or e.__context__
    return None


def missing_optional_message(command: str, exc: BaseException) -> str | None:
    """The one line a command prints when an optional dependency is missing, or None if `exc` is another error."""
    found = missing_optional(exc)
    if found is None:
        return None
    package, extra = found
    return f"{command}: needs {package} (not installed): pip install '{DISTRIBUTION}[{extra}]'"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class _ShowDefaults:
    """Appends ' (default: X)' to an option's help unless the help already says its default or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default  # identity checks: a default of 0 is worth showing, False (a switch) is not
        no_default = default is None or default is False or default is argparse.SUPPRESS or default == []
        if not action.option_strings or "default" in text.lower() or no_default:
            return text
        return f"{text} (default: %(default)s)"


class HelpFormatter(_ShowDefaults, argparse.HelpFormatter):
    pass


class RawDescriptionHelpFormatter(_ShowDefaults, argparse.RawDescriptionHelpFormatter):
    pass


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and its nested subcommand parsers a formatter that shows defaults (keeping raw descriptions)."""
    raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    parser.formatter_class = RawDescriptionHelpFormatter if raw else HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def build_parser(argv: list[str], *, every_command: bool = False) -> argparse.ArgumentParser:
    """The parser for `argv`: only the subcommand asked for is imported, unless `every_command`."""
    parser = argparse.ArgumentParser(prog="chatvla", description="chatvla-serve command line")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the installed chatvla-serve version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in COMMANDS.items():
        if every_command or wanted == name:
            mod = importlib.import_module(module)
            _show_defaults(mod.register(sub))
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Python's default SIGTERM ends the process without running `finally` blocks, so a `chatvla eval` or
    `chatvla demo` stopped by `kill` would skip stopping its server and closing its sims. As SystemExit
    it unwinds like Ctrl-C does. (`chatvla serve` installs its own handler: a graceful drain.)"""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None and threading.current_thread() is threading.main_thread()  # not called in-process
    if as_program and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "chatvla"
    if argv and argv[0] in COMMANDS:
        command += " " + argv[0]
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        action = getattr(args, f"{args.command}_command", None)  # e.g. `model info`
        if action:
            command += f" {action}"
        mod = importlib.import_module(COMMANDS[args.command][0])
        return int(mod.run(args) or 0)
    except ImportError as e:
        message = missing_optional_message(command, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
