"""Conversion between the client's objects and the protobuf of `chatvla.v1.Policy`.

* An `ObservationRequest` (numpy images and state) becomes the serialised `StreamRequest` that goes on
  the stream, framed by chatvla.client.framing so each image is copied once.
* An `ActionChunk` becomes a `ChunkReply` with its actions checked against the robot's action dim.
* A gRPC status, or an in-band `ErrorCode`, becomes its typed `PolicyError`.

No threads and no state: chatvla.client.policy_client calls these from its stream threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from chatvla.client.connection import (
    Aborted,
    ChunkReply,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ObservationRequest,
    PermissionDenied,
    PolicyError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from chatvla.client.framing import ObservationFramer
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import WireError, tensor_from_proto, tensor_to_proto
from chatvla.wire.vocabulary import TIMING_MS_FIELDS

_STATUS_ERRORS: dict[grpc.StatusCode, type[PolicyError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}
_STREAM_ERRORS: dict[int, type[PolicyError]] = {
    pb.INVALID_ARGUMENT: InvalidArgument,
    pb.DEADLINE_EXCEEDED: DeadlineExceeded,
    pb.RESOURCE_EXHAUSTED: ResourceExhausted,
    pb.ABORTED: Aborted,
    pb.INTERNAL: Internal,
    pb.UNAVAILABLE: Unavailable,
}


def rpc_status(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call. The exceptions grpc raises from a call are also
    `grpc.Call`s and carry both; the `grpc.RpcError` base class declares neither, so anything else
    counts as UNKNOWN."""
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (e.details() if isinstance(e, grpc.Call) else "") or str(code)
    return code, details


def error_from_code(
    code: grpc.StatusCode | int, message: str, *, field: str = "", seq: int | None = None
) -> PolicyError:
    """Map a gRPC status (or an in-band `ErrorCode`) to its typed exception."""
    if isinstance(code, grpc.StatusCode):
        cls = _STATUS_ERRORS.get(code, Unavailable if code == grpc.StatusCode.CANCELLED else Internal)
    else:
        cls = _STREAM_ERRORS.get(int(code), Internal)
    return cls(message, field=field, seq=seq)


def encode_observation(
    framer: ObservationFramer,
    request: ObservationRequest,
    *,
    seq: int,
    cameras: Sequence[str],
    deadline_ms: int,
) -> bytes:
    """The serialised `StreamRequest(observation=...)` for `request`, sent as `seq` with `deadline_ms`
    left; images of `cameras` only, in that order. Raises WireError (with the offending field),
    ValueError or TypeError for an observation that cannot be encoded."""
    r = request
    images = [framer.image(name, r.images[name]) for name in cameras if name in r.images]
    head = pb.Observation(
        seq=seq,
        tick=r.tick,
        state=tensor_to_proto(np.asarray(r.state, dtype=np.float32)),
        instruction=r.instruction or "",
        deadline_ms=deadline_ms,
        force_reasoning=r.force_reasoning,
        seed=r.seed,
        reasoning=r.reasoning or "",
    )
    return framer.request(head, images)


def decode_chunk(chunk: pb.ActionChunk, *, action_dim: int, received_at: float) -> ChunkReply:
    """The `ChunkReply` for `chunk`. Raises WireError unless its actions are a non-empty
    [n, action_dim] float array."""
    actions = tensor_from_proto(chunk.actions, field="chunk.actions", dtype=np.float32)
    if actions.ndim != 2 or actions.shape[1] != action_dim or actions.shape[0] == 0:
        raise WireError("chunk.actions", f"shape must be [n, {action_dim}], got {list(actions.shape)}")
    t = chunk.timings
    timings = {k: getattr(t, k) for k in TIMING_MS_FIELDS}
    return ChunkReply(
        seq=chunk.seq,
        tick=chunk.tick,
        actions=actions,
        received_at=received_at,
        reasoning=chunk.reasoning,
        reasoning_refreshed=chunk.reasoning_refreshed,
        reasoning_tokens=chunk.reasoning_tokens,
        timings=timings,
    )
