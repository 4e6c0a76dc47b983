"""`chatvla serve` pins glibc's malloc thresholds itself when the environment does not."""

from __future__ import annotations

import ctypes

from chatvla.cli.serve import MALLOC_THRESHOLDS, pin_malloc_thresholds


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


def test_pins_both_thresholds_on_glibc():
    assert pin_malloc_thresholds({}) == (list(MALLOC_THRESHOLDS) if glibc() else [])


def test_leaves_what_the_environment_sets():
    assert pin_malloc_thresholds(dict.fromkeys(MALLOC_THRESHOLDS, "1")) == []
    only_mmap = pin_malloc_thresholds({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert only_mmap == (["MALLOC_TRIM_THRESHOLD_"] if glibc() else [])
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1:glibc.malloc.trim_threshold=1"}
    assert pin_malloc_thresholds(tunables) == []


def test_never_raises_when_ctypes_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", broken)
    assert pin_malloc_thresholds({}) == []
