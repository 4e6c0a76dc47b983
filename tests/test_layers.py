"""The layer rules of src/chatvla as an executable contract.

Every module under src/chatvla is parsed with `ast` (nothing is imported, so no import side effects and
no optional dependency is needed), and every import in it is checked against RULES: top-level imports,
imports inside functions and `if TYPE_CHECKING:` blocks alike, plus `importlib.import_module("...")` /
`__import__("...")` called with a literal name. A failure lists each offending file:line and import.

The layers, from the top: cli -> training, server -> client, engines -> model, wire -> profiles, v1.
The robot PC installs only the client (no torch, no server extra), so the client and everything it
imports (wire, profiles, v1) must stay free of the server side and of heavy libraries.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "chatvla"

HEAVY = ("torch", "transformers", "vllm")
SERVER_ONLY_LIBS = ("pydantic", "yaml", "fastapi", "uvicorn")
ABOVE_THE_CLIENT = ("chatvla.server", "chatvla.engines", "chatvla.model", "chatvla.training", "chatvla.cli")


@dataclass(frozen=True)
class Rule:
    layer: str  # a module and everything below it
    forbidden: tuple[str, ...]  # module prefixes the layer must not import
    why: str
    allowed: tuple[str, ...] = ()  # exceptions inside `forbidden`, each with its reason in `why`


RULES: tuple[Rule, ...] = (
    Rule(
        "chatvla.client",
        (*ABOVE_THE_CLIENT, *HEAVY, *SERVER_ONLY_LIBS),
        "the robot-side client installs without the server extra: no server, engines, model, training, "
        "cli, torch/transformers/vllm or pydantic/yaml/fastapi/uvicorn",
    ),
    Rule(
        "chatvla.server.transports",
        ("chatvla.model", "chatvla.engines", *HEAVY),
        "transports speak the wire and hand observations to the pipeline: no model, no engine internals "
        "(chatvla.engines.base, the engine interface, is the one engine module they may use)",
        allowed=("chatvla.engines.base",),
    ),
    Rule(
        "chatvla.model",
        ("chatvla.server", "chatvla.client", "chatvla.engines", "chatvla.training", "chatvla.cli"),
        "the model is a library below serving, engines and training: it never imports them",
    ),
    Rule(
        "chatvla.wire",
        ("chatvla.client", *ABOVE_THE_CLIENT, *HEAVY, *SERVER_ONLY_LIBS),
        "the wire format is shared by client and server and installed on the robot PC",
    ),
    Rule(
        "chatvla.profiles",
        ("chatvla.client", *ABOVE_THE_CLIENT, *HEAVY, *SERVER_ONLY_LIBS),
        "robot profiles are shared by client and server and installed on the robot PC",
    ),
)


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name of what is imported (for `from X import n`: X.n)
    text: str  # the statement as written, for the failure message


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in `source` (the text of `module`), resolved to absolute dotted names."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            written = "." * node.level + (node.module or "")
            for alias in node.names:
                # `from chatvla import server` imports chatvla.server; `from torch import nn` is torch.nn.
                name = origin if alias.name == "*" else f"{origin}.{alias.name}"
                found.append(Import(node.lineno, name, f"from {written} import {alias.name}"))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
            ):
                found.append(Import(node.lineno, arg.value, f"{called}({arg.value!r})"))
    return found


def violations(rule: Rule, module: str, imports: list[Import]) -> list[Import]:
    if not _under(module, rule.layer):
        return []
    return [
        imp
        for imp in imports
        if any(_under(imp.module, p) for p in rule.forbidden) and not any(_under(imp.module, a) for a in rule.allowed)
    ]


def _modules() -> list[tuple[Path, str]]:
    return [(path, module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_layer_rule_holds():
    failures: list[str] = []
    for path, module in _modules():
        imports = imports_of(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")
        for rule in RULES:
            for imp in violations(rule, module, imports):
                rel = path.relative_to(SRC.parent)
                failures.append(f"{rel}:{imp.line}: {imp.text}  [{rule.layer} must not import {imp.module}]")
    why = "\n".join(f"  {r.layer}: {r.why}" for r in RULES)
    assert not failures, "layer rules broken:\n" + "\n".join(failures) + "\nthe rules:\n" + why


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.layer)
def test_every_rule_covers_modules_that_exist(rule):
    """A renamed or moved package must not leave a rule that silently checks nothing."""
    assert any(_under(m, rule.layer) for _, m in _modules()), f"no module under {rule.layer}"


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("chatvla.client.x", "import torch", ["torch"]),
        (
            "chatvla.client.x",
            "def f():\n    from chatvla.server.settings import ServerSettings",
            ["chatvla.server.settings.ServerSettings"],
        ),
        ("chatvla.client.x", "from chatvla import engines", ["chatvla.engines"]),
        ("chatvla.client.x", "from ..server import app", ["chatvla.server.app"]),
        ("chatvla.client.x", "import importlib\nimportlib.import_module('yaml')", ["yaml"]),
        ("chatvla.client.x", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pydantic", ["pydantic"]),
        ("chatvla.client.x", "from chatvla.profiles import RobotProfile\nimport torchvision_free_name", []),
        ("chatvla.server.transports.x", "from chatvla.engines.base import EngineInfo", []),
        ("chatvla.server.transports.x", "from chatvla.engines import base", []),
        (
            "chatvla.server.transports.x",
            "from chatvla.engines.loader import load_engine",
            ["chatvla.engines.loader.load_engine"],
        ),
        ("chatvla.server.transports.x", "from ...model import presets", ["chatvla.model.presets"]),
        ("chatvla.model.x", "from chatvla.client import fakes", ["chatvla.client.fakes"]),
        ("chatvla.wire.x", "from chatvla.server.errors import Code", ["chatvla.server.errors.Code"]),
        ("chatvla.server.app", "import torch\nfrom chatvla.model import presets", []),  # no rule for server/*
    ],
)
def test_the_checker_finds_violations(module, source, expected):
    imports = imports_of(source, module)
    found = [imp.module for rule in RULES for imp in violations(rule, module, imports)]
    assert found == expected
