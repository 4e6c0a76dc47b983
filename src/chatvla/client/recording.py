"""Episode files: what a robot saw, what the policy sent and what the arm was told, tick by tick.

A file is a plain msgpack stream (no framing of our own, so any msgpack tool can read it):

    header  {"format": "chatvla.episode", "version": 1, "kind": "header", ...}
    tick    {"kind": "tick", "tick": ..., ...}        one per control tick, in tick order
    ...
    end     {"kind": "end", ...}                      only if the writer was closed

Why this shape: a robot run can die at any moment (e-stop, power, a crash), so the writer appends one
self-contained object per tick and flushes; whatever was written up to the last complete object stays
readable, and the reader tells a clean close (end record) from a crash (no end record, perhaps a
partial object at the tail). Arrays are maps {"dtype", "shape", "data"} with dtypes from an allow-list
and little-endian bytes: nothing is ever unpickled, and a reader checks every field against the
robot profile in the header, naming the record and field that is wrong. docs/recording.md is the
format reference; bump VERSION for any incompatible change.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from chatvla.profiles import RobotProfile

FORMAT = "chatvla.episode"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
# The only dtypes an array field may carry, by the name written in the file.
DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
# "jpeg": baseline JPEG bytes (lossy, ~10x smaller); "rgb8": raw HxWx3 uint8, row-major.
IMAGE_ENCODINGS = ("jpeg", "rgb8")
DEFAULT_JPEG_QUALITY = 90
# One object (a tick with its images) may not exceed this; guards the reader against absurd lengths.
MAX_RECORD_BYTES = 256 << 20
_JPEG_MAGIC = b"\xff\xd8"


class EpisodeFormatError(ValueError):
    """A file that is not a valid episode. `record` is the object index in the file (0 = header),
    `field` the dotted path inside it, so the message says exactly where to look."""

    def __init__(self, message: str, *, record: int | None = None, field: str | None = None) -> None:
        where = ""
        if record is not None:
            where = f"record {record}" + (f" field {field!r}" if field else "") + ": "
        super().__init__(where + message)
        self.record = record
        self.field = field


# --- value types ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedImage:
    """An image as stored; decoding is deferred because most readers (inspect, loadtest) never need
    pixels, and a loadtest replays the JPEG bytes as they are."""

    encoding: str
    height: int
    width: int
    data: bytes

    def decode(self) -> np.ndarray:
        if self.encoding == "rgb8":
            return np.frombuffer(self.data, dtype=np.uint8).reshape(self.height, self.width, 3).copy()
        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        if arr.shape[:2] != (self.height, self.width):
            raise ValueError(f"JPEG is {arr.shape[0]}x{arr.shape[1]}, header says {self.height}x{self.width}")
        return arr


@dataclass(frozen=True)
class ChunkRecord:
    """The policy's answer that arrived on a tick: `actions[i]` belongs to tick `tick + i`."""

    seq: int
    tick: int
    actions: np.ndarray  # float32 [H, action_dim]
    reasoning: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)  # server stage -> ms


@dataclass(frozen=True)
class EpisodeHeader:
    version: int
    created_unix: float
    profile: RobotProfile
    instruction: str
    task: Mapping[str, Any]
    cameras: tuple[str, ...]
    image_encoding: str
    software: Mapping[str, Any]


@dataclass(frozen=True)
class EpisodeTick:
    """One tick object of an episode file, as read back (what the loop hands its observers live is a
    chatvla.client.runtime.TickRecord)."""

    index: int  # object index in the file (the header is 0)
    tick: int
    timestamp: float  # seconds, the recording clock of the header (monotonic)
    state: np.ndarray  # float32 [state_dim]
    action: np.ndarray | None  # float32 [action_dim] sent to the robot; None if it was held without one
    images: Mapping[str, EncodedImage]
    chunk: ChunkRecord | None
    stall: bool  # the executor had nothing fresh for this tick and held
    interventions: tuple[str, ...]  # safety filter intervention names on this tick


@dataclass(frozen=True)
class EpisodeFooter:
    index: int
    ticks: int
    closed_unix: float
    outcome: Mapping[str, Any]


@dataclass(frozen=True)
class Episode:
    header: EpisodeHeader
    records: tuple[EpisodeTick, ...]
    footer: EpisodeFooter | None  # None: the writer never closed (crash, kill, power loss)
    truncated_bytes: int  # bytes of an incomplete last object (0 for a clean file)


# --- encoding helpers -------------------------------------------------------------------------------------
def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """{"dtype", "shape", "data"} with little-endian bytes; refuses dtypes outside DTYPES."""
    a = np.asarray(arr)
    name = a.dtype.name
    if name not in DTYPES:
        raise TypeError(f"dtype {a.dtype} is not recordable; use one of {sorted(DTYPES)}")
    le = np.ascontiguousarray(a, dtype=DTYPES[name])
    return {"dtype": name, "shape": list(le.shape), "data": le.tobytes()}


def decode_array(
    obj: object,
    *,
    record: int,
    field: str,
    dtype: str | None = None,
    shape: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Validate and decode an encoded array; `shape` entries of None accept any length."""
    if not isinstance(obj, dict):
        raise EpisodeFormatError(f"expected an array map, got {type(obj).__name__}", record=record, field=field)
    for key in ("dtype", "shape", "data"):
        if key not in obj:
            raise EpisodeFormatError(f"array is missing {key!r}", record=record, field=field)
    name, dims, data = obj["dtype"], obj["shape"], obj["data"]
    if name not in DTYPES:
        raise EpisodeFormatError(f"dtype {name!r} is not allowed; one of {sorted(DTYPES)}", record=record, field=field)
    if dtype is not None and name != dtype:
        raise EpisodeFormatError(f"dtype must be {dtype}, got {name}", record=record, field=field)
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise EpisodeFormatError(f"shape must be a list of non-negative ints, got {dims!r}", record=record, field=field)
    if shape is not None and (
        len(dims) != len(shape) or any(w is not None and d != w for d, w in zip(dims, shape, strict=False))
    ):
        want = ["*" if w is None else w for w in shape]
        raise EpisodeFormatError(f"shape must be {want}, got {dims}", record=record, field=field)
    if not isinstance(data, bytes):
        raise EpisodeFormatError(f"data must be bytes, got {type(data).__name__}", record=record, field=field)
    dt = DTYPES[name]
    if len(data) != math.prod(dims) * dt.itemsize:
        raise EpisodeFormatError(f"{len(data)} bytes do not match shape {dims} of {name}", record=record, field=field)
    return np.frombuffer(data, dtype=dt).reshape(dims).astype(dt.newbyteorder("="), copy=True)


def encode_episode_image(image: np.ndarray | EncodedImage, encoding: str, quality: int) -> dict[str, Any]:
    """The image map an episode file stores ({"encoding", "height", "width", "data"}); not the wire's
    `chatvla.wire.encode_image`."""
    if isinstance(image, EncodedImage):  # already encoded (e.g. for the wire): store as is
        img = image
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"images must be HxWx3 uint8, got {a.dtype} {list(a.shape)}")
        h, w = int(a.shape[0]), int(a.shape[1])
        if encoding == "rgb8":
            img = EncodedImage("rgb8", h, w, np.ascontiguousarray(a).tobytes())
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(a, "RGB").save(buf, format="JPEG", quality=int(quality))
            img = EncodedImage("jpeg", h, w, buf.getvalue())
    return {"encoding": img.encoding, "height": img.height, "width": img.width, "data": img.data}


def _plain(obj: object, where: str) -> Any:
    """Metadata must be plain msgpack (str keys, scalars, lists, maps) so any reader can load it;
    numpy scalars are converted, anything else is refused at write time, not discovered at read."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: {type(obj).__name__} cannot be recorded as metadata")


def _software() -> dict[str, str]:
    try:
        from importlib.metadata import version

        return {"chatvla": version("chatvla-serve")}
    except Exception:
        return {"chatvla": "unknown"}


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
            "task": _plain(dict(task or {}), "task"),
            "cameras": list(self.cameras),
            "image_encoding": image_encoding,
            "jpeg_quality": jpeg_quality if image_encoding == "jpeg" else None,
            "clock": "monotonic",
            "software": _software(),
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
                "outcome": _plain(dict(outcome or {}), "outcome"),
            }
            self._write(end, force_flush=True)
        finally:
            self._f.close()
            self._f = None


# --- reader -------------------------------------------------------------------------------------------------
def _need(obj: dict[str, Any], key: str, types: type | tuple[type, ...], record: int, prefix: str = "") -> Any:
    name = prefix + key
    if key not in obj:
        raise EpisodeFormatError("missing", record=record, field=name)
    v = obj[key]
    bad_bool = isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if not isinstance(v, types) or bad_bool:
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise EpisodeFormatError(f"expected {want}, got {type(v).__name__}", record=record, field=name)
    return v


def _parse_header(obj: object) -> EpisodeHeader:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise EpisodeFormatError(f"bad magic: not a {FORMAT} file (first object has format {got!r})", record=0)
    version = _need(obj, "version", int, 0)
    if version not in SUPPORTED_VERSIONS:
        raise EpisodeFormatError(
            f"unsupported version {version}; this reader knows {list(SUPPORTED_VERSIONS)}", record=0, field="version"
        )
    if obj.get("kind") != "header":
        raise EpisodeFormatError(f"expected kind 'header', got {obj.get('kind')!r}", record=0, field="kind")
    try:
        profile = RobotProfile.from_dict(_need(obj, "profile", dict, 0))
    except (KeyError, TypeError, ValueError) as e:
        raise EpisodeFormatError(f"invalid robot profile: {e}", record=0, field="profile") from None
    cameras = _need(obj, "cameras", list, 0)
    if not all(isinstance(c, str) for c in cameras):
        raise EpisodeFormatError("camera names must be strings", record=0, field="cameras")
    encoding = _need(obj, "image_encoding", str, 0)
    if encoding not in IMAGE_ENCODINGS:
        raise EpisodeFormatError(f"unknown image encoding {encoding!r}", record=0, field="image_encoding")
    return EpisodeHeader(
        version=version,
        created_unix=float(_need(obj, "created_unix", (int, float), 0)),
        profile=profile,
        instruction=_need(obj, "instruction", str, 0),
        task=_need(obj, "task", dict, 0),
        cameras=tuple(cameras),
        image_encoding=encoding,
        software=obj.get("software") if isinstance(obj.get("software"), dict) else {},
    )


def _parse_image(obj: object, cameras: Sequence[str], name: object, record: int) -> EncodedImage:
    f = f"images.{name}"
    if name not in cameras:
        raise EpisodeFormatError(f"camera not in the header's cameras {list(cameras)}", record=record, field=f)
    if not isinstance(obj, dict):
        raise EpisodeFormatError(f"expected an image map, got {type(obj).__name__}", record=record, field=f)
    enc = _need(obj, "encoding", str, record, f + ".")
    h = _need(obj, "height", int, record, f + ".")
    w = _need(obj, "width", int, record, f + ".")
    data = _need(obj, "data", bytes, record, f + ".")
    if enc not in IMAGE_ENCODINGS:
        raise EpisodeFormatError(f"unknown encoding {enc!r}", record=record, field=f + ".encoding")
    if h <= 0 or w <= 0:
        raise EpisodeFormatError(f"bad size {h}x{w}", record=record, field=f)
    if enc == "rgb8" and len(data) != h * w * 3:
        raise EpisodeFormatError(f"{len(data)} bytes do not match {h}x{w}x3 rgb8", record=record, field=f + ".data")
    if enc == "jpeg" and not data.startswith(_JPEG_MAGIC):
        raise EpisodeFormatError("data is not a JPEG (no SOI marker)", record=record, field=f + ".data")
    return EncodedImage(enc, h, w, data)


def _parse_chunk(obj: object, profile: RobotProfile, record: int) -> ChunkRecord | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise EpisodeFormatError(f"expected a map or nil, got {type(obj).__name__}", record=record, field="chunk")
    timings = _need(obj, "timings", dict, record, "chunk.")
    if not all(isinstance(k, str) and isinstance(v, int | float) for k, v in timings.items()):
        raise EpisodeFormatError("timings must map str to numbers", record=record, field="chunk.timings")
    if "actions" not in obj:
        raise EpisodeFormatError("missing", record=record, field="chunk.actions")
    actions = decode_array(
        obj["actions"], record=record, field="chunk.actions", dtype="float32", shape=(None, profile.action_dim)
    )
    if actions.shape[0] < 1:
        raise EpisodeFormatError("a chunk needs at least one action", record=record, field="chunk.actions")
    return ChunkRecord(
        seq=_need(obj, "seq", int, record, "chunk."),
        tick=_need(obj, "tick", int, record, "chunk."),
        actions=actions,
        reasoning=_need(obj, "reasoning", str, record, "chunk."),
        timings={k: float(v) for k, v in timings.items()},
    )


def _parse_tick(obj: dict[str, Any], header: EpisodeHeader, record: int) -> EpisodeTick:
    p = header.profile
    images = _need(obj, "images", dict, record)
    action = obj.get("action", ...)
    if action is ...:
        raise EpisodeFormatError("missing", record=record, field="action")
    interventions = _need(obj, "interventions", list, record)
    if not all(isinstance(i, str) for i in interventions):
        raise EpisodeFormatError("intervention names must be strings", record=record, field="interventions")
    if "state" not in obj:
        raise EpisodeFormatError("missing", record=record, field="state")
    if "chunk" not in obj:
        raise EpisodeFormatError("missing", record=record, field="chunk")
    return EpisodeTick(
        index=record,
        tick=_need(obj, "tick", int, record),
        timestamp=float(_need(obj, "timestamp", (int, float), record)),
        state=decode_array(obj["state"], record=record, field="state", dtype="float32", shape=(p.state_dim,)),
        action=None
        if action is None
        else decode_array(action, record=record, field="action", dtype="float32", shape=(p.action_dim,)),
        images={n: _parse_image(v, header.cameras, n, record) for n, v in images.items()},
        chunk=_parse_chunk(obj["chunk"], p, record),
        stall=_need(obj, "stall", bool, record),
        interventions=tuple(interventions),
    )


class EpisodeReader:
    """Streams and validates an episode file: the header on open, tick records on iteration.

    Iteration raises EpisodeFormatError at the first problem. A partial object at the end of the file
    (the writer died mid-record) is an error too unless `allow_truncated`, in which case iteration ends
    after the last complete record and `truncated_bytes` says how much was cut."""

    def __init__(self, path: str | os.PathLike[str], *, allow_truncated: bool = False) -> None:
        self.path = Path(path)
        self.allow_truncated = allow_truncated
        self.footer: EpisodeFooter | None = None
        self.truncated_bytes = 0
        self._size = self.path.stat().st_size
        self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115
        self._unpacker = msgpack.Unpacker(
            self._f, raw=False, strict_map_key=True, max_buffer_size=MAX_RECORD_BYTES, timestamp=0
        )
        self._consumed = 0
        self._index = 0
        try:
            first = self._next()
            if first is None:
                if self._size == 0:
                    raise EpisodeFormatError("empty file, not an episode", record=0)
                raise EpisodeFormatError(
                    f"bad magic or truncated header: {self._size} bytes hold no complete msgpack object", record=0
                )
            self.header = _parse_header(first)
        except BaseException:
            self._f.close()
            raise
        self._iterated = False

    def __enter__(self) -> EpisodeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _next(self) -> object | None:
        """Next complete object, or None at the end (where a partial tail is measured)."""
        try:
            obj = next(self._unpacker)
        except StopIteration:
            self.truncated_bytes = self._size - self._consumed
            return None
        except (ValueError, msgpack.UnpackException) as e:
            raise EpisodeFormatError(f"not valid msgpack at byte {self._consumed}: {e}", record=self._index) from None
        self._consumed = self._unpacker.tell()
        return obj

    def __iter__(self) -> Iterator[EpisodeTick]:
        if self._iterated:
            raise RuntimeError("an EpisodeReader can be iterated once; open the file again")
        self._iterated = True
        last_tick: int | None = None
        while True:
            self._index += 1
            n = self._index
            obj = self._next()
            if obj is None:
                break
            if not isinstance(obj, dict):
                raise EpisodeFormatError(f"expected a map, got {type(obj).__name__}", record=n)
            kind = obj.get("kind")
            if kind == "end":
                self.footer = EpisodeFooter(
                    index=n,
                    ticks=_need(obj, "ticks", int, n),
                    closed_unix=float(_need(obj, "closed_unix", (int, float), n)),
                    outcome=_need(obj, "outcome", dict, n),
                )
                extra = self._next()
                if extra is not None or self.truncated_bytes:
                    raise EpisodeFormatError("data after the end record", record=n + 1)
                if self.footer.ticks != n - 1:
                    raise EpisodeFormatError(
                        f"end record counts {self.footer.ticks} ticks, the file has {n - 1}", record=n, field="ticks"
                    )
                return
            if kind != "tick":
                raise EpisodeFormatError(f"unknown record kind {kind!r}", record=n, field="kind")
            rec = _parse_tick(obj, self.header, n)
            if last_tick is not None and rec.tick <= last_tick:
                raise EpisodeFormatError(f"tick {rec.tick} does not follow tick {last_tick}", record=n, field="tick")
            last_tick = rec.tick
            yield rec
        if self.truncated_bytes and not self.allow_truncated:
            raise EpisodeFormatError(
                f"truncated tail: {self.truncated_bytes} bytes of an incomplete record after record {n - 1} "
                "(the writer stopped mid-record; pass allow_truncated to read what is complete)",
                record=n,
            )


def read_episode(path: str | os.PathLike[str], *, allow_truncated: bool = False) -> Episode:
    """Read and validate a whole episode into memory."""
    with EpisodeReader(path, allow_truncated=allow_truncated) as r:
        records = tuple(r)
        return Episode(header=r.header, records=records, footer=r.footer, truncated_bytes=r.truncated_bytes)
