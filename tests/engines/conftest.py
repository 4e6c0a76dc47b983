"""The engine suites serve through the same in-process fixture as the server suites."""

from __future__ import annotations

from serverkit import serve  # noqa: F401  (the fixture, defined once for every suite that serves)
