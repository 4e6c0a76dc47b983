"""The narrow interface between the serving pipeline and a model engine.

The pipeline (scheduler, batching, sessions, transports) only ever talks to an `Engine`; engines own
the model. Three calls map to the three model stages the pipeline batches separately:

    preprocess(obs)           -> Prepared          CPU work, thread-safe, one observation at a time
    reason_batch([...])       -> [ReasoningResult]  the VLM: decode reasoning, or pre-fill cached text
    act_batch([...])          -> [np.ndarray]       the diffusion action expert, un-normalised actions

The batched calls are synchronous and are run by the pipeline on one worker thread per stage, so
the reasoning of one batch overlaps with the expert of the previous one. An engine that batches on
its own (vLLM's continuous batching) sets `continuous_batching = True` and implements `reason_async`;
the pipeline then submits each observation directly instead of forming batches itself.

This module is torch-free so the pipeline can be exercised with a numpy fake engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatvla.profiles import RobotProfile

TASK_CONTROL = "control"
TASK_UNDERSTANDING = "understanding"


@dataclass(frozen=True)
class EngineObservation:
    """A validated observation: decoded images and a finite state, in robot units."""

    images: Mapping[str, np.ndarray]  # camera -> HxWx3 uint8
    state: np.ndarray  # float32 [state_dim]
    instruction: str
    task: str = TASK_CONTROL  # ChatVLA v1 routes its static MoE by task; others ignore it


@dataclass(frozen=True)
class ReasonItem:
    """One observation for the reasoning stage. `reasoning=None` decodes new reasoning text;
    a string skips decoding and only pre-fills prompt + that text (the System 1 refresh).
    Pass the cached result's `token_ids` as `reasoning_token_ids` too: re-tokenising decoded text
    does not always give back the same ids, and the cached ids reproduce the hidden states exactly."""

    prepared: Any
    reasoning: str | None = None
    reasoning_token_ids: tuple[int, ...] | None = None


@dataclass
class ReasoningResult:
    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    decoded: bool  # True if the text was generated now, False if pre-filled from a cache
    features: Any = field(repr=False, default=None)  # engine-specific conditioning for the expert


@dataclass(frozen=True)
class ActItem:
    reasoning: ReasoningResult
    state: np.ndarray  # float32 [state_dim], robot units
    seed: int


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    engine: str
    profile: RobotProfile
    max_reasoning_tokens: int
    extra: Mapping[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """A loaded model ready to serve. Subclasses: TorchEngine, VllmEngine."""

    continuous_batching: bool = False
    # Continuous-batching engines call this with the number of requests in each forward pass they run
    # (the server points it at its batch-size histogram).
    on_step: Callable[[int], None] | None = None

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def preprocess(self, obs: EngineObservation) -> Any:
        """Turn an observation into model inputs (prompt ids, pixel values). Thread-safe."""

    @abstractmethod
    def reason_batch(self, items: Sequence[ReasonItem]) -> list[ReasoningResult]:
        """Run the VLM over a batch; result i answers item i."""

    @abstractmethod
    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        """Sample one action chunk [chunk_size, action_dim] (robot units, float32) per item."""

    async def reason_async(self, item: ReasonItem) -> ReasoningResult:
        """Per-request entry point for engines with their own continuous batching."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one blank observation through both stages, so the first real request does not pay
        one-off costs (lazy initialisation, allocator growth, kernel selection)."""
        p = self.info.profile
        obs = EngineObservation(
            images={c.name: np.zeros((c.height, c.width, 3), np.uint8) for c in p.cameras},
            state=np.zeros(p.state_dim, np.float32),
            instruction="warm up",
        )
        r = self.reason_batch([ReasonItem(self.preprocess(obs))])[0]
        self.act_batch([ActItem(r, obs.state, seed=1)])

    def close(self) -> None:
        """Release engine resources (threads, subprocesses)."""
