"""Fixtures of the fuzz tests: in-process servers as in tests/server (serverkit), the budget in fuzzkit.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "server"))

from serverkit import serve  # noqa: F401  (the fixture, defined once for every suite that serves)
