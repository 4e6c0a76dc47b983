"""Transport-neutral messages between the transports and the pipeline (frozen: shared across tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chatvla.engines.base import EngineObservation
from chatvla.wire.vocabulary import TIMING_FIELDS


@dataclass(frozen=True)
class ReasoningPolicy:
    """When a session writes new reasoning: every `every_n` observations or after `every_seconds`
    (0 = never by time); an instruction change or `force_reasoning` always does."""

    every_n: int = 1
    every_seconds: float = 0.0


@dataclass(frozen=True)
class SessionConfig:
    """A validated SessionStart."""

    cameras: tuple[str, ...]
    instruction: str
    robot_id: str
    reasoning: ReasoningPolicy
    default_deadline_ms: int = 0
    control_rate_hz: float = 0.0
    max_in_flight: int = 0  # observations computing at once; 0 = the server's default


@dataclass(frozen=True)
class ValidatedObservation:
    """A validated observation plus what the pipeline needs to schedule it."""

    obs: EngineObservation
    seq: int = 0
    tick: int = 0
    seed: int = 0  # 0 = the server picks one
    deadline_ms: int = 0  # 0 = session / server default
    force_reasoning: bool = False
    # Supplied reasoning: pre-fill this text instead of decoding. On a session it applies to this
    # observation only and leaves the session's cached reasoning alone.
    reasoning: str | None = None


@dataclass(frozen=True)
class StageTimings:
    """Server-side time of one observation in milliseconds (mirrors proto `Timings`: the fields are
    wire.vocabulary.TIMING_FIELDS, in that order, checked at import)."""

    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    reasoning_ms: float = 0.0
    expert_ms: float = 0.0
    total_ms: float = 0.0
    reasoning_batch_size: int = 0
    expert_batch_size: int = 0

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in TIMING_FIELDS}


if tuple(StageTimings.__dataclass_fields__) != TIMING_FIELDS:  # the proto changed: update StageTimings
    raise ImportError(f"StageTimings fields {tuple(StageTimings.__dataclass_fields__)} != proto {TIMING_FIELDS}")


@dataclass(frozen=True)
class ChunkResult:
    """The answer to one observation: actions [chunk_size, action_dim] in robot units."""

    seq: int
    tick: int
    actions: np.ndarray = field(repr=False)
    reasoning: str
    reasoning_refreshed: bool
    reasoning_tokens: int
    timings: StageTimings
    reasoning_seq: int = 0  # the observation the reasoning was written for (this one if refreshed or supplied)
    reasoning_age_ms: float = 0.0  # how long before this chunk was ready that reasoning was written
