"""Shared pytest configuration. Sub-suites keep their own fixtures in their folder's conftest.py."""

import os

# Deterministic, quiet, offline: nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MUJOCO_GL", "egl")
