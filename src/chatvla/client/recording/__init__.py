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
format reference; bump VERSION (format.py) for any incompatible change.
"""

from chatvla.client.recording.format import (
    DEFAULT_JPEG_QUALITY,
    DTYPES,
    FORMAT,
    IMAGE_ENCODINGS,
    MAX_RECORD_BYTES,
    SUPPORTED_VERSIONS,
    VERSION,
    ChunkRecord,
    EncodedImage,
    Episode,
    EpisodeFooter,
    EpisodeFormatError,
    EpisodeHeader,
    EpisodeTick,
    decode_array,
    encode_array,
    encode_episode_image,
)
from chatvla.client.recording.reader import EpisodeReader, read_episode
from chatvla.client.recording.writer import EpisodeWriter

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "DTYPES",
    "FORMAT",
    "IMAGE_ENCODINGS",
    "MAX_RECORD_BYTES",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "ChunkRecord",
    "EncodedImage",
    "Episode",
    "EpisodeFooter",
    "EpisodeFormatError",
    "EpisodeHeader",
    "EpisodeReader",
    "EpisodeTick",
    "EpisodeWriter",
    "decode_array",
    "encode_array",
    "encode_episode_image",
    "read_episode",
]
