"""The narrow interface between the serving pipeline and a model engine.

The server (scheduler, compute loop, transports) only ever talks to an `Engine`; engines own the
model. Three calls map to the model's stages:

    preprocess(obs)                    -> Prepared            CPU work on one observation
    reason_batch([...], yield_point)   -> [ReasoningResult]   the VLM: decode reasoning, or pre-fill given text
    act_batch([...])                   -> [np.ndarray]        the diffusion action expert, robot units

The server calls all three from its one compute thread (`server/compute.py`), so an engine never
sees two calls at once and owns the whole machine while it runs. A long decode that runs in the
background (a reasoning refresh) calls `yield_point()` between tokens: the server may run a waiting
batch there before the decode goes on, so a refresh never holds up the chunks of other observations.

An engine that batches reasoning itself (vLLM's continuous batching) sets
`batches_reasoning_itself = True` and overrides `submit_reasoning`: it takes each request at once and
reports each result from its own thread. Every other engine inherits the default `submit_reasoning`,
which runs `reason_batch` on the calling thread. The server drives both through `submit_reasoning`.

This module is torch-free so the server can be exercised with a numpy fake engine.
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


class EngineOptionError(ValueError):
    """An engine option the engine does not take, or a value it cannot use: the loader reports it as
    a load error naming the option, instead of a traceback."""


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
    batch_size: int = 0  # engines that batch themselves: most requests that shared a forward pass with it


@dataclass(frozen=True)
class ActItem:
    reasoning: ReasoningResult
    state: np.ndarray  # float32 [state_dim], robot units
    seed: int | None  # diffusion noise seed; None: the sampler starts from zero noise (deterministic)


@dataclass(frozen=True)
class StateStats:
    """The state normalisation the model was trained with (a checkpoint's stats.json: the expert sees
    `(state - mean) / std`). Server validation bounds states by it: a state many standard deviations
    from anything in training gives the expert inputs it never saw, so its chunk is not worth sending."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    engine: str
    profile: RobotProfile
    max_reasoning_tokens: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    state_stats: StateStats | None = None  # None: the engine has no state normalisation (NullEngine)
    # (every_n, every_seconds): the reasoning refresh the model was trained to follow; the server's
    # default policy unless its flags set one (`ReasoningConfig.refresh_every_n`).
    reasoning_refresh: tuple[int, float] = (1, 0.0)


# Called by `submit_reasoning` once per item: (index in the submitted batch, result or the error).
ReasoningDone = Callable[[int, "ReasoningResult | BaseException"], None]


def _no_yield() -> None:
    return None


class Engine(ABC):
    """A loaded model ready to serve. Subclasses: TorchEngine, VllmEngine, NullEngine."""

    # True: the engine forms its own reasoning batches (`submit_reasoning` returns at once and
    # reports later); the server then hands reasoning over as it arrives instead of waiting to fill
    # a batch.
    batches_reasoning_itself: bool = False
    # Engines that batch themselves call this with the number of requests in each forward pass they
    # run (the server points it at its batch-size histogram).
    on_step: Callable[[int], None] | None = None

    @property
    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def preprocess(self, obs: EngineObservation) -> Any:
        """Turn an observation into model inputs (prompt ids, pixel values). Thread-safe."""

    @abstractmethod
    def reason_batch(
        self, items: Sequence[ReasonItem], yield_point: Callable[[], None] = _no_yield
    ) -> list[ReasoningResult]:
        """Run the VLM over a batch; result i answers item i. Decoding engines call `yield_point()`
        between tokens (it may block while the server runs other work)."""

    @abstractmethod
    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        """Sample one action chunk [chunk_size, action_dim] (robot units, float32) per item."""

    def submit_reasoning(
        self, items: Sequence[ReasonItem], done: ReasoningDone, yield_point: Callable[[], None] = _no_yield
    ) -> None:
        """Reason over `items` and call `done(i, result_or_error)` once per item.

        The default runs one `reason_batch` on the calling thread. If the batch raises, each item is
        retried alone, so one bad item fails only itself, never the robots batched with it."""
        try:
            results = self.reason_batch(items, yield_point)
            if len(results) != len(items):
                raise RuntimeError(f"reason_batch returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(items) == 1:
                done(0, exc)
                return
            for i, item in enumerate(items):
                try:
                    done(i, self.reason_batch([item], yield_point)[0])
                except Exception as e:
                    done(i, e)
            return
        for i, r in enumerate(results):
            done(i, r)

    def set_threads(self, n: int) -> None:
        """Use `n` intra-op threads for model compute (engines on torch set torch's pool)."""

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
