"""`chatvla` itself: --version, help for every flag, and one clear line (exit 2) when an optional
dependency of a command is not installed (a thin `pip install chatvla-serve`)."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys

import numpy as np
import pytest

from chatvla.cli.main import DISTRIBUTION, OPTIONAL_MODULES, build_parser, main, missing_optional
from chatvla.client.recording import EpisodeWriter
from chatvla.profiles import FRANKA_JOINT


def run_without(modules: list[str], *args: str) -> subprocess.CompletedProcess:
    """`chatvla ARGS` in a fresh interpreter where importing any of `modules` fails as if not installed."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    code = f"import sys; {block}; from chatvla.cli.main import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def assert_one_line_naming(r: subprocess.CompletedProcess, command: str, package: str, extra: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"chatvla {command}: ") and package in lines[0]
    assert lines[0].endswith(f"pip install 'chatvla-serve[{extra}]'"), lines[0]


def test_serve_without_the_server_extra_names_it():
    r = run_without(["prometheus_client"], "serve", "--engine", "null", "--grpc-port", "0", "--http-port", "0")
    assert_one_line_naming(r, "serve", "prometheus-client", "server")
    assert r.stdout == ""  # no ready line


def test_serve_torch_engine_without_torch_names_the_server_extra():
    r = run_without(["torch"], "serve", "--model", "tiny", "--grpc-port", "0", "--http-port", "0")
    assert_one_line_naming(r, "serve", "torch", "server")


def test_model_info_without_torch_names_the_server_extra():
    r = run_without(["torch"], "model", "info", "tiny")
    assert_one_line_naming(r, "model info", "torch", "server")


def test_train_help_without_torch_names_the_server_extra():
    r = run_without(["torch"], "train", "--help")
    assert_one_line_naming(r, "train", "torch", "server")


def test_record_sim_without_mujoco_names_the_sim_extra(tmp_path):
    r = run_without(["mujoco"], "record", "--robot", "sim-panda", "--policy", "oracle", "--out", str(tmp_path))
    assert_one_line_naming(r, "record", "mujoco", "sim")


def test_demo_without_mujoco_uses_the_same_message():
    r = run_without(["mujoco"], "demo")
    assert_one_line_naming(r, "demo", "mujoco", "sim")


def test_inspect_plot_without_matplotlib_names_the_plot_extra(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ep.chatvla"
    home = np.array(FRANKA_JOINT.home)
    w = EpisodeWriter(path, FRANKA_JOINT, instruction="x")
    for tick in range(3):
        w.append(tick=tick, timestamp=tick / 15, state=home, action=home)
    w.close({"success": False})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["inspect", str(path), "--plot", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "chatvla inspect: needs matplotlib (not installed): pip install 'chatvla-serve[plot]'"
    assert not (tmp_path / "out.png").exists()


def test_other_import_errors_are_not_hidden(monkeypatch):
    """A missing module that is not an optional dependency is a bug: its traceback must show."""
    monkeypatch.setitem(sys.modules, "chatvla.cli.inspect", None)
    with pytest.raises(ModuleNotFoundError):
        main(["inspect", "x"])
    assert missing_optional(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None
    assert missing_optional(ImportError("cannot import name 'x' from 'torch'", name="torch")) is None


def test_missing_module_found_through_the_exception_chain():
    try:
        try:
            raise ModuleNotFoundError("No module named 'safetensors.torch'", name="safetensors.torch")
        except ImportError as e:
            raise RuntimeError("could not load") from e
    except RuntimeError as e:
        assert missing_optional(e) == ("safetensors", "server")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_optional_modules_agree_with_the_package_extras():
    requires = importlib.metadata.requires(DISTRIBUTION) or []
    extras: set[tuple[str, str]] = set()
    for req in requires:
        m = re.match(r"\s*([A-Za-z0-9._-]+).*extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m:
            extras.add((_normalise(m.group(1)), m.group(2)))
    for module, (package, extra) in OPTIONAL_MODULES.items():
        assert (_normalise(package), extra) in extras, f"{module}: {package} is not in the [{extra}] extra"


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"chatvla {importlib.metadata.version(DISTRIBUTION)}"


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")
        else:
            yield path, parser, action


def test_every_option_of_every_command_has_help_and_shows_its_default():
    parser = build_parser([], every_command=True)
    checked = 0
    for path, owner, action in _walk(parser, "chatvla"):
        label = f"{path} {'/'.join(action.option_strings) or action.dest}"
        assert (action.help or "").strip(), f"{label} has no help text"
        shown = owner._get_formatter()._expand_help(action)
        default = action.default
        no_default = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if action.option_strings and not no_default:
            assert "default" in shown.lower(), f"{label} does not show its default ({default!r}): {shown}"
        checked += 1
    assert checked > 80


def test_help_shows_defaults_the_flag_text_does_not_mention(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED base seed" in out and "(default: 0)" in out
