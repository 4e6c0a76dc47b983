"""Fixtures of the serving-core tests; the helpers live in serverkit.py beside this file."""

from __future__ import annotations

from serverkit import serve  # noqa: F401  (the fixture, defined once for every suite that serves)
