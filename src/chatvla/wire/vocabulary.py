"""The names that cross a boundary, defined once: timing fields, stage labels, metric names, header keys.

Server, client, load test, dashboards and alerts all speak these names; each is written here and
imported everywhere else, so a rename is one edit and a test (tests/deploy/test_metric_names.py)
checks every consumer against it. Torch-free and dependency-free: the standard library and the
generated protobuf only, so the robot-side client can import it.
"""

from __future__ import annotations

from chatvla.v1 import policy_pb2 as pb

# --- timings: the fields of proto `Timings`, in proto order -------------------------------------------------
TIMING_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.Timings.DESCRIPTOR.fields)
# Server-side milliseconds per stage: queue_ms, preprocess_ms, reasoning_ms, expert_ms, total_ms.
TIMING_MS_FIELDS: tuple[str, ...] = tuple(n for n in TIMING_FIELDS if n.endswith("_ms"))
# The rest are counts: reasoning_batch_size, expert_batch_size.
TIMING_COUNT_FIELDS: tuple[str, ...] = tuple(n for n in TIMING_FIELDS if not n.endswith("_ms"))

# --- dtypes: what a tensor may carry, by numpy name, in proto `DType` order ---------------------------------
# The proto's enum is the one list (FLOAT32 -> "float32"); the wire codec (little-endian) and the episode
# format (which adds "bool") derive theirs from it. openpi's msgpack-numpy frames come from foreign numpy
# code and keep their own, wider rule (any byte order; bool, integer and float kinds).
DTYPE_NAMES: tuple[str, ...] = tuple(v.name.lower() for v in pb.DType.DESCRIPTOR.values if v.number)

# --- stage labels: the values of the `stage` label on chatvla_* metrics ------------------------------------
STAGE_QUEUE = "queue"
STAGE_PREPROCESS = "preprocess"
STAGE_REASONING = "reasoning"
STAGE_EXPERT = "expert"
STAGE_TOTAL = "total"
# chatvla_stage_latency_seconds: one stage per millisecond timing field (queue_ms -> "queue"), same order.
LATENCY_STAGES: tuple[str, ...] = tuple(n.removesuffix("_ms") for n in TIMING_MS_FIELDS)
# chatvla_queue_depth: the stages observations wait for (exposed at 0 from the start).
QUEUE_STAGES: tuple[str, ...] = (STAGE_PREPROCESS, STAGE_REASONING, STAGE_EXPERT)
# chatvla_batch_size: the stages that run observations in batches.
BATCH_STAGES: tuple[str, ...] = (STAGE_REASONING, STAGE_EXPERT)
STAGE_LABELS: frozenset[str] = frozenset((*LATENCY_STAGES, *QUEUE_STAGES, *BATCH_STAGES))

# --- transport labels: the values of the `transport` label on chatvla_requests ---------------------------
TRANSPORT_GRPC_INFER = "grpc_infer"
TRANSPORT_GRPC_STREAM = "grpc_stream"
TRANSPORT_GRPC_MODEL_INFO = "grpc_model_info"
TRANSPORT_HTTP = "http"
TRANSPORT_OPENPI = "openpi_ws"
TRANSPORTS = (TRANSPORT_GRPC_INFER, TRANSPORT_GRPC_STREAM, TRANSPORT_GRPC_MODEL_INFO, TRANSPORT_HTTP, TRANSPORT_OPENPI)

# --- Prometheus metric families (names as registered; counters are exposed with a `_total` suffix) ---------
METRIC_REQUESTS = "chatvla_requests"  # counter: transport, outcome
METRIC_STAGE_LATENCY = "chatvla_stage_latency_seconds"  # histogram: stage (LATENCY_STAGES)
METRIC_BATCH_SIZE = "chatvla_batch_size"  # histogram: stage (BATCH_STAGES)
METRIC_QUEUE_DEPTH = "chatvla_queue_depth"  # gauge: stage (QUEUE_STAGES)
METRIC_ACTIVE_SESSIONS = "chatvla_active_sessions"  # gauge
METRIC_REASONING_TOKENS = "chatvla_reasoning_tokens"  # counter
METRIC_REJECTED = "chatvla_rejected"  # counter: reason
METRIC_REASONING_REFRESH = "chatvla_reasoning_refresh"  # counter: reason
METRIC_BUILD = "chatvla_build"  # info (exposed as chatvla_build_info = 1): version, model, engine, profile
METRICS: tuple[str, ...] = (
    METRIC_REQUESTS, METRIC_STAGE_LATENCY, METRIC_BATCH_SIZE, METRIC_QUEUE_DEPTH, METRIC_ACTIVE_SESSIONS,
    METRIC_REASONING_TOKENS, METRIC_REJECTED, METRIC_REASONING_REFRESH, METRIC_BUILD,
)


def counter_total(name: str) -> str:
    """The exposed sample name of counter `name`: chatvla_requests -> chatvla_requests_total."""
    return f"{name}_total"


def histogram_sample(name: str, part: str) -> str:
    """An exposed sample of histogram `name`; `part` is "bucket", "count" or "sum"."""
    if part not in ("bucket", "count", "sum"):
        raise ValueError(f"a histogram exposes bucket, count and sum, not {part!r}")
    return f"{name}_{part}"


# --- gRPC services -----------------------------------------------------------------------------------------
POLICY_SERVICE = pb.DESCRIPTOR.services_by_name["Policy"].full_name  # "chatvla.v1.Policy"
# The standard gRPC health service, open without a token (docs/security.md). The robot-side client
# watches it to reconnect as soon as a restarted server is SERVING (chatvla.client.readiness); it speaks
# it as raw protobuf bytes, since grpcio-health-checking is a server-side dependency.
HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_WATCH_METHOD = f"/{HEALTH_SERVICE}/Watch"

# --- headers and metadata ---------------------------------------------------------------------------------
# gRPC metadata keys are lowercase; HTTP and websocket headers match it case-insensitively.
AUTHORIZATION_KEY = "authorization"
BEARER_SCHEME = "Bearer"
API_KEY_SCHEME = "Api-Key"  # openpi-client's scheme, accepted on the openpi websocket
# Trailing metadata of a refused gRPC call: the request field at fault, e.g. "images[wrist]".
FIELD_METADATA_KEY = "chatvla-field"


def bearer_header(token: str) -> str:
    """The `authorization` value that carries `token`: "Bearer <token>"."""
    return f"{BEARER_SCHEME} {token}"


# --- openpi websocket (docs/openpi.md) ----------------------------------------------------------------------
# Reply keys: openpi's own (`actions`, `policy_timing`, `server_timing`) plus ours. openpi-client reads
# `actions`; the rest are for people and dashboards.
OPENPI_ACTIONS_KEY = "actions"
OPENPI_POLICY_TIMING_KEY = "policy_timing"
OPENPI_SERVER_TIMING_KEY = "server_timing"
OPENPI_REASONING_KEY = "reasoning"
OPENPI_REASONING_REFRESHED_KEY = "reasoning_refreshed"
# Metadata keys that describe what `actions` holds for the mapping in use (space, per-dimension units).
OPENPI_ACTION_SPACE_KEY = "action_space"
OPENPI_ACTION_UNITS_KEY = "action_units"


def openpi_error_text(code: str, message: str) -> str:
    """The payload of an openpi error frame: one websocket *text* frame `"<CODE>: <message>"` (the message
    starts with the offending field when there is one, `"<field>: ..."`). A text frame is what openpi-client
    recognises as an error (it raises `RuntimeError("Error in inference server:\\n<text>")`); the code is
    the upper-case name of the refusal (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...), so a client can tell a
    bad observation from a busy server by the text before the first colon."""
    return f"{code}: {message}"
