"""The episode format's vocabulary: constants, value types, the error, and array/image encoding.

`writer` and `reader` both build on these, so a change to the format is made here once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatvla.profiles import RobotProfile
from chatvla.wire.vocabulary import DTYPE_NAMES

FORMAT = "chatvla.episode"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
# The only dtypes an array field may carry, by the name written in the file: the wire's, plus bool
# (little-endian, whatever the machine that wrote the file).
DTYPES: dict[str, np.dtype] = {n: np.dtype(n).newbyteorder("<") for n in (*DTYPE_NAMES, "bool")}
# "jpeg": baseline JPEG bytes (lossy, ~10x smaller); "rgb8": raw HxWx3 uint8, row-major.
IMAGE_ENCODINGS = ("jpeg", "rgb8")
DEFAULT_JPEG_QUALITY = 90
# One object (a tick with its images) may not exceed this; guards the reader against absurd lengths.
MAX_RECORD_BYTES = 256 << 20
JPEG_MAGIC = b"\xff\xd8"


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


def plain_value(obj: object, where: str) -> Any:
    """Metadata must be plain msgpack (str keys, scalars, lists, maps) so any reader can load it;
    numpy scalars are converted, anything else is refused at write time, not discovered at read."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list | tuple):
        return [plain_value(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {k!r}")
            out[k] = plain_value(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: {type(obj).__name__} cannot be recorded as metadata")


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape a recording, written in the header so a file says what made it."""
    try:
        from importlib.metadata import version

        return {"chatvla": version("chatvla-serve")}
    except Exception:
        return {"chatvla": "unknown"}


