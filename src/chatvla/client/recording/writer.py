"""Writing episode files: one self-contained msgpack object per tick, flushed, so a run that dies
keeps everything up to its last complete tick."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from chatvla.client.recording.format import (
    DEFAULT_JPEG_QUALITY,
    FORMAT,
    IMAGE_ENCODINGS,
    VERSION,
    ChunkRecord,
    EncodedImage,
    encode_array,
    encode_episode_image,
    plain_value,
    software_versions,
)
from chatvla.profiles import RobotProfile


# --- writer -------------------------------------------------------------------------------------------------
class EpisodeWriter:
    """Appends one tick record per call; every record is a complete msgpack object written with a
    single write, flushed every `flush_every` records (and fsynced if asked), so a crash loses at most
    the unflushed ticks and never corrupts the ones before.

    Inputs are checked against the profile here, so a file that was written is a file that reads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        profile: RobotProfile,
        *,
        instruction: str,
        task: Mapping[str, Any] | None = None,
        cameras: Sequence[str] | None = None,
        image_encoding: str = "jpeg",
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        flush_every: int = 1,
        fsync: bool = False,
        overwrite: bool = False,
    ) -> None:
        if image_encoding not in IMAGE_ENCODINGS:
            raise ValueError(f"image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}")
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.path = Path(path)
        self.profile = profile
        self.cameras = tuple(cameras if cameras is not None else profile.camera_names)
        self._encoding = image_encoding
        self._quality = jpeg_quality
        self._flush_every = flush_every
        self._fsync = fsync
        self._packer = msgpack.Packer(use_bin_type=True, datetime=False)
        self._ticks = 0
        self._last_tick: int | None = None
        header = {
            "format": FORMAT,
            "version": VERSION,
            "kind": "header",
            "created_unix": time.time(),
            "profile": profile.to_dict(),
            "instruction": str(instruction),
            "task": plain_value(dict(task or {}), "task"),
            "cameras": list(self.cameras),
            "image_encoding": image_encoding,
            "jpeg_quality": jpeg_quality if image_encoding == "jpeg" else None,
            "clock": "monotonic",
            "software": software_versions(),
        }
        self._f: BinaryIO | None = open(self.path, "wb" if overwrite else "xb")  # noqa: SIM115
        self._write(header, force_flush=True)

    @property
    def ticks_written(self) -> int:
        return self._ticks

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(outcome=None if exc is None else {"error": repr(exc)})

    def _write(self, obj: dict[str, Any], *, force_flush: bool = False) -> None:
        if self._f is None:
            raise ValueError(f"episode {self.path} is closed")
        self._f.write(self._packer.pack(obj))
        if force_flush or self._ticks % self._flush_every == 0:
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())

    def _vector(self, value: np.ndarray, dim: int, name: str) -> dict[str, Any]:
        a = np.asarray(value, dtype=np.float32).reshape(-1)
        if a.shape != (dim,):
            raise ValueError(f"{name} has {a.size} values, profile {self.profile.name} needs {dim}")
        return encode_array(a)

    def append(
        self,
        *,
        tick: int,
        timestamp: float,
        state: np.ndarray,
        action: np.ndarray | None,
        images: Mapping[str, np.ndarray | EncodedImage] | None = None,
        chunk: ChunkRecord | None = None,
        stall: bool = False,
        interventions: Sequence[str] = (),
    ) -> None:
        """Record one control tick. `images` may be a subset of the cameras (e.g. images only every
        Nth tick to save space); `action` is what the robot was finally told (after safety)."""
        if self._last_tick is not None and tick <= self._last_tick:
            raise ValueError(f"tick {tick} is not after the previous tick {self._last_tick}")
        imgs = dict(images or {})
        unknown = sorted(set(imgs) - set(self.cameras))
        if unknown:
            raise ValueError(f"images for cameras {unknown} not in the header's cameras {list(self.cameras)}")
        rec: dict[str, Any] = {
            "kind": "tick",
            "tick": int(tick),
            "timestamp": float(timestamp),
            "state": self._vector(state, self.profile.state_dim, "state"),
            "action": None if action is None else self._vector(action, self.profile.action_dim, "action"),
            "images": {
                n: encode_episode_image(imgs[n], self._encoding, self._quality) for n in self.cameras if n in imgs
            },
            "chunk": None,
            "stall": bool(stall),
            "interventions": [str(i) for i in interventions],
        }
        if chunk is not None:
            acts = np.asarray(chunk.actions, dtype=np.float32)
            if acts.ndim != 2 or acts.shape[1] != self.profile.action_dim or acts.shape[0] < 1:
                raise ValueError(f"chunk.actions must be [H, {self.profile.action_dim}], got {list(acts.shape)}")
            rec["chunk"] = {
                "seq": int(chunk.seq),
                "tick": int(chunk.tick),
                "actions": encode_array(acts),
                "reasoning": str(chunk.reasoning),
                "timings": {str(k): float(v) for k, v in chunk.timings.items()},
            }
        self._ticks += 1
        self._last_tick = int(tick)
        self._write(rec)

    def close(self, outcome: Mapping[str, Any] | None = None) -> None:
        """Write the end record (marks a clean close) and close the file. Safe to call twice."""
        if self._f is None:
            return
        try:
            end = {
                "kind": "end",
                "ticks": self._ticks,
                "closed_unix": time.time(),
                "outcome": plain_value(dict(outcome or {}), "outcome"),
            }
            self._write(end, force_flush=True)
        finally:
            self._f.close()
            self._f = None


