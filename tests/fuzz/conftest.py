"""Fixtures of the fuzz tests: in-process servers as in tests/server (serverkit), the budget in fuzzkit.py."""

from __future__ import annotations

from serverkit import serve  # noqa: F401  (the fixture, defined once for every suite that serves)
