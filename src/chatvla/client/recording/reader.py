"""Reading episode files: every field checked against the robot profile in the header, errors that
name the record and field, and a truncated tail (a crashed run) told apart from a clean close."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from chatvla.client.recording.format import (
    FORMAT,
    IMAGE_ENCODINGS,
    JPEG_MAGIC,
    MAX_RECORD_BYTES,
    SUPPORTED_VERSIONS,
    ChunkRecord,
    EncodedImage,
    Episode,
    EpisodeFooter,
    EpisodeFormatError,
    EpisodeHeader,
    EpisodeTick,
    decode_array,
)
from chatvla.profiles import RobotProfile


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
    if enc == "jpeg" and not data.startswith(JPEG_MAGIC):
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

