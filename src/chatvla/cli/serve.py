"""`chatvla serve`: flags are generated from `ServerSettings`, so every setting has exactly one
flag, one env var and one YAML key, all with the same default."""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# glibc's allocator: a buffer at or above the mmap threshold is mapped fresh (and page-faulted in) on
# every allocation, and free heap memory beyond the trim threshold goes back to the OS, to be faulted
# in again. The images and manifests set the env vars (docs/deployment.md, "Memory allocator"); a bare
# `chatvla serve` pins the same values with mallopt (malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3).
MALLOC_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": (-3, 64 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 128 << 20)}


def pin_malloc_thresholds(env: Mapping[str, str] = os.environ) -> list[str]:
    """Pin glibc's mmap/trim thresholds the env leaves unset: its dynamic mmap threshold page-faults large buffers."""
    tunables = env.get("GLIBC_TUNABLES", "")
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, macOS): other knobs, or none
            return []
        pinned = []
        for name, (param, value) in MALLOC_THRESHOLDS.items():
            tunable = "glibc.malloc." + name.removeprefix("MALLOC_").rstrip("_").lower()
            if name not in env and tunable not in tunables and libc.mallopt(param, value) == 1:
                pinned.append(name)
        return pinned
    except Exception:  # best effort: never keep the server from starting
        return []


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type`/`choices` for a settings annotation (Optional and Literal unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(inner[0])
    if origin is typing.Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if annotation in (int, float, Path):
        return annotation, {}
    return str, {}


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from chatvla.server.settings import CONFIG_ENV, ServerSettings, env_name

    p = subparsers.add_parser(
        "serve", help="serve a model over gRPC + HTTP",
        description="Serve a model over gRPC (robots) and HTTP (debug page, probes, metrics). "
        f"Settings come from flags, then CHATVLA_* env vars, then --config YAML ({CONFIG_ENV}), then defaults.",
    )
    p.add_argument("--config", type=Path, default=None, help=f"YAML settings file (env {CONFIG_ENV})")
    for name, field in ServerSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} [default: {default}; env {env_name(name)}]"
        if name == "engine_options":
            p.add_argument(
                "--engine-option", dest="engine_options", action="append", type=_engine_option,
                metavar="KEY=VALUE", default=None, help=help_text,
            )
        elif field.annotation is bool:
            p.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
        else:
            typ, extra = _flag_type(field.annotation)
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_text,
                           **extra)
    return p


def run(args: argparse.Namespace) -> int:
    pin_malloc_thresholds()  # first, before the server's imports and buffers
    from chatvla.server.app import run as run_server
    from chatvla.server.settings import ServerSettings, SettingsError, load_settings

    flags = {k: getattr(args, k, None) for k in ServerSettings.model_fields}
    if flags.get("engine_options") is not None:
        flags["engine_options"] = dict(flags["engine_options"])
    try:
        settings = load_settings(flags, config_file=args.config)
    except SettingsError as e:
        print(f"chatvla serve: {e}", file=sys.stderr)
        return 2
    return run_server(settings)
