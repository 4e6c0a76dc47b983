"""`StreamRequest` bytes for the client's stream, with each image copied once. Torch-free.

Building an observation the ordinary way copies every image into each message that holds it (`tobytes`,
the `Image`, the `Observation`, the `StreamRequest`) and once more to serialise it. Re-using one
message object instead does not work with this protobuf runtime (upb): a message keeps every `bytes`
value ever assigned to it in its arena until the message itself is freed, so a long-lived request
grows by the size of its images on every call.

So the framer builds the bytes itself, in one `bytes.join`:

* the small fields (seq, tick, state, strings) are one short `Observation` serialised by protobuf;
* each RGB8 image is its `Image` header (camera, encoding, height, width), serialised once per camera
  and shape and then reused, followed by the `data` field's tag and length and the pixels, read
  straight from the array (`np.ascontiguousarray` copies only a non-contiguous view);
* JPEG and PNG images are small once compressed: `encode_image` makes them as before.

Protobuf's wire format allows this: a message is the concatenation of its fields in any order, and a
length-delimited field is its tag, its length and its bytes. The server parses the same message it
would get from the ordinary construction (the tests compare the two).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import WireError, encode_image

_LEN = 2  # wire type of length-delimited fields


def _tag(message: type, field: str) -> bytes:
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | _LEN)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_OBSERVATION = _tag(pb.StreamRequest, "observation")
_IMAGES = _tag(pb.Observation, "images")
_DATA = _tag(pb.Image, "data")
_MAX_HEADERS = 64  # cameras x shapes; a caller sending ever-new shapes must not grow the cache forever


class ObservationFramer:
    """Serialises `StreamRequest(observation=...)` for one client; keeps the per-camera image headers."""

    def __init__(self, encoding: str = "rgb8", quality: int = 90) -> None:
        self.encoding = encoding
        self.quality = quality
        self._raw = encoding.lower() == "rgb8"
        self._headers: dict[tuple[str, int, int], bytes] = {}

    def image(self, camera: str, arr: np.ndarray) -> list[bytes | memoryview]:
        """One `Image` message, as parts to join (each part's `len` is its byte count). Raises WireError
        (field `images[camera]`) for an array that is not an HxWx3 uint8 image, like `encode_image`."""
        if not self._raw:
            return [encode_image(arr, camera, self.encoding, self.quality).SerializeToString()]
        a = np.asarray(arr)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise WireError(f"images[{camera}]", f"need an HxWx3 uint8 array, got {a.dtype} {list(a.shape)}")
        h, w = a.shape[:2]
        header = self._headers.get((camera, h, w))
        if header is None:
            if len(self._headers) >= _MAX_HEADERS:
                self._headers.clear()
            header = self._headers[(camera, h, w)] = pb.Image(
                camera=camera, encoding=pb.RGB8, height=h, width=w
            ).SerializeToString()
        if a.size == 0:  # proto3 leaves an empty `data` out
            return [header]
        pixels = memoryview(np.ascontiguousarray(a)).cast("B")
        return [header, _DATA, _varint(len(pixels)), pixels]

    def request(self, head: pb.Observation, images: Iterable[list[bytes | memoryview]]) -> bytes:
        """The serialised `StreamRequest(observation=head + images)`; `head` has every field but
        `images`, `images` come from `image` in the order the observation lists them."""
        parts: list[bytes | memoryview] = [head.SerializeToString()]
        for image in images:
            parts += [_IMAGES, _varint(sum(len(p) for p in image)), *image]
        size = sum(len(p) for p in parts)
        return b"".join([_OBSERVATION, _varint(size), *parts])
