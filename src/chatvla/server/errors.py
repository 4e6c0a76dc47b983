"""One error type for everything the pipeline refuses, with its mapping to each transport.

Transports never invent status codes: a `ServeError` carries a `Code`, and the tables below give the
gRPC status, the in-stream `ErrorCode` and the HTTP status for it, so the three transports always
agree on what a given refusal means.
"""

from __future__ import annotations

import enum

import grpc

from chatvla.v1 import policy_pb2 as pb
from chatvla.wire.vocabulary import FIELD_METADATA_KEY as FIELD_METADATA_KEY  # re-exported for the transports


class Code(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    ABORTED = "aborted"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"


GRPC_STATUS: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.ABORTED: grpc.StatusCode.ABORTED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}

STREAM_CODE: dict[Code, int] = {
    Code.INVALID_ARGUMENT: pb.INVALID_ARGUMENT,
    Code.DEADLINE_EXCEEDED: pb.DEADLINE_EXCEEDED,
    Code.RESOURCE_EXHAUSTED: pb.RESOURCE_EXHAUSTED,
    Code.ABORTED: pb.ABORTED,
    Code.INTERNAL: pb.INTERNAL,
    Code.UNAVAILABLE: pb.UNAVAILABLE,
    Code.UNAUTHENTICATED: pb.ERROR_CODE_UNSPECIFIED,  # never sent in-stream: auth fails the whole call
}

HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 422,
    Code.DEADLINE_EXCEEDED: 504,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.ABORTED: 409,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.UNAUTHENTICATED: 401,
}

# FIELD_METADATA_KEY (from wire.vocabulary): the gRPC trailing-metadata key that carries the offending
# field of an INVALID_ARGUMENT, so clients do not have to parse it out of the message.

# Refusals never echo unbounded input: a message is capped here, once, for every transport (a 30 KB
# message would not even reach a gRPC client), and a field name, which may embed a caller-chosen name
# (`images[<camera>]`), is escaped to printable ASCII and capped, because it travels in gRPC trailing
# metadata, which accepts nothing else.
MAX_MESSAGE_CHARS = 512
MAX_FIELD_CHARS = 128


def _cap(text: str, limit: int, ellipsis: str) -> str:
    return text if len(text) <= limit else text[: limit - len(ellipsis)] + ellipsis


def safe_field(field: str) -> str:
    """`field` as printable ASCII (other characters backslash-escaped), at most MAX_FIELD_CHARS."""
    text = str(field)
    if not all(" " <= c <= "~" for c in text):
        text = "".join(c if " " <= c <= "~" else ascii(c)[1:-1] for c in text)
    return _cap(text, MAX_FIELD_CHARS, "...")


def metadata_field(field: str) -> str:
    """The value for FIELD_METADATA_KEY (a ServeError's field is already safe; this is idempotent)."""
    return safe_field(field)


class ServeError(Exception):
    """A request the server refuses or could not complete. `field` names the input at fault, if any."""

    def __init__(self, code: Code, message: str, field: str = "", *, reason: str = "") -> None:
        message = _cap(str(message), MAX_MESSAGE_CHARS, "…")
        field = safe_field(field)
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.message = message
        self.field = field
        # `chatvla_rejected_total{reason}` label: finer than the code where it helps operators
        # (e.g. "superseded" vs "sessions_limit"); defaults to the code's name.
        self.reason = reason or code.value

    @property
    def outcome(self) -> str:
        """The `chatvla_requests_total{outcome}` label value."""
        return self.code.value
