"""Typed tensors and images on the wire: numpy <-> protobuf, with validation. Torch-free."""

from chatvla.wire.codec import (
    WireError,
    decode_image,
    encode_image,
    tensor_from_proto,
    tensor_to_proto,
)
from chatvla.wire.limits import Limits

__all__ = ["Limits", "WireError", "decode_image", "encode_image", "tensor_from_proto", "tensor_to_proto"]
