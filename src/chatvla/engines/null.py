"""NullEngine: a model-free engine with the real engine's contract, for transport work and tests.

It makes serving testable without torch: actions are a deterministic function of (state, seed), the
reasoning text is fixed per instruction, and an optional simulated compute time per batch (a fixed
part plus a per-item part, like a real batched model) lets tests and benchmarks see batching,
queueing and draining behave as they would under load. It is product code: `chatvla serve --engine
null` runs it, e.g. to measure transport overhead.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chatvla.engines.base import (
    ActItem,
    Engine,
    EngineInfo,
    EngineObservation,
    ReasoningResult,
    ReasonItem,
)
from chatvla.profiles import FRANKA_JOINT, get_profile

REASONING_TEMPLATE = "The instruction is: {instruction}. I will move toward the target. Next action:"


@dataclass(frozen=True)
class NullPrepared:
    """What NullEngine.preprocess hands to the stages."""

    instruction: str
    state: np.ndarray
    image_pixels: tuple[float, ...]  # the first pixel of each camera


class NullEngine(Engine):
    """Deterministic fake model. `reason_ms`/`act_ms` are per batch, `per_item_ms` per item."""

    def __init__(
        self,
        profile: str = FRANKA_JOINT.name,
        reason_ms: float = 0.0,
        act_ms: float = 0.0,
        per_item_ms: float = 0.0,
        max_reasoning_tokens: int = 64,
        model_id: str = "null",
        prefill_ms: float | None = None,
        decode_steps: int = 8,
    ) -> None:
        self._info = EngineInfo(
            model_id=model_id, engine="null", profile=get_profile(profile),
            max_reasoning_tokens=int(max_reasoning_tokens),
            extra={"reason_ms": float(reason_ms), "act_ms": float(act_ms), "per_item_ms": float(per_item_ms),
                   "prefill_ms": float(reason_ms if prefill_ms is None else prefill_ms)},
        )
        self.reason_s = float(reason_ms) / 1e3
        # A batch that only pre-fills given text costs `prefill_ms` (default: as much as a decode).
        self.prefill_s = self.reason_s if prefill_ms is None else float(prefill_ms) / 1e3
        self.decode_steps = max(1, int(decode_steps))
        self.act_s = float(act_ms) / 1e3
        self.per_item_s = float(per_item_ms) / 1e3
        self.batches: dict[str, list[int]] = {"reasoning": [], "expert": []}  # for tests/benchmarks
        self._walks: dict[int, np.ndarray] = {}

    @property
    def info(self) -> EngineInfo:
        return self._info

    def preprocess(self, obs: EngineObservation) -> NullPrepared:
        # One pixel per camera stands in for the image (cheap, yet a swapped camera changes it).
        means = tuple(float(obs.images[c][0, 0, 0]) for c in sorted(obs.images))
        return NullPrepared(obs.instruction, np.asarray(obs.state, dtype=np.float32), means)

    def reason_batch(
        self, items: Sequence[ReasonItem], yield_point: Callable[[], None] | None = None
    ) -> list[ReasoningResult]:
        self.batches["reasoning"].append(len(items))
        if any(it.reasoning is None and it.reasoning_token_ids is None for it in items):
            # Decoding: the simulated time passes token by token, yielding between tokens like a model.
            step = (self.reason_s + self.per_item_s * len(items)) / self.decode_steps
            for k in range(self.decode_steps):
                if step > 0:
                    time.sleep(step)
                if yield_point is not None and k < self.decode_steps - 1:
                    yield_point()
        else:
            self._compute(self.prefill_s, len(items))
        out = []
        for it in items:
            prep: NullPrepared = it.prepared
            decoded = it.reasoning is None and it.reasoning_token_ids is None
            text = REASONING_TEMPLATE.format(instruction=prep.instruction) if decoded else str(it.reasoning or "")
            words = text.split()[: self._info.max_reasoning_tokens]
            out.append(ReasoningResult(
                text=text, token_ids=tuple(range(len(words))), num_prompt_tokens=len(prep.instruction.split()),
                decoded=decoded, features=prep,
            ))
        return out

    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        self.batches["expert"].append(len(items))
        self._compute(self.act_s, len(items))
        return [self.actions_for(it.state, 0 if it.seed is None else it.seed) for it in items]

    def actions_for(self, state: np.ndarray, seed: int) -> np.ndarray:
        """The chunk for (state, seed): a small seeded walk from the state, kept in bounds.

        The walk's shape is drawn once per seed residue (64 of them, cached), so a request costs an
        add and a clip, not a random generator: `--engine null` measures the server, not the fake."""
        p = self._info.profile
        lo, hi = self._bounds
        start = np.zeros(p.action_dim, np.float32)
        n = min(p.action_dim, p.state_dim)
        start[:n] = np.asarray(state, np.float32)[:n]
        return np.clip(start + self._walk(int(seed)), lo, hi)

    @functools.cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        p = self._info.profile
        return np.asarray(p.action_lower, np.float32), np.asarray(p.action_upper, np.float32)

    def _walk(self, seed: int) -> np.ndarray:
        key = seed % 64
        walk = self._walks.get(key)
        if walk is None:
            p = self._info.profile
            rng = np.random.default_rng(key + 1000 * (seed != key))
            step = np.asarray(p.max_step, np.float32) * 0.2
            walk = np.cumsum(rng.uniform(-1.0, 1.0, (p.chunk_size, p.action_dim)).astype(np.float32) * step, axis=0)
            self._walks[key] = walk
        return walk

    def warmup(self) -> None:
        super().warmup()
        self.batches = {"reasoning": [], "expert": []}  # warm-up batches are not traffic

    def _compute(self, base_s: float, n: int) -> None:
        t = base_s + self.per_item_s * n
        if t > 0:
            time.sleep(t)

    def describe(self) -> dict[str, Any]:
        return dict(self._info.extra)
