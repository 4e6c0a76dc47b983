"""The torch engine: the ChatVLA-2 model from `chatvla.model` behind the `Engine` interface.

It runs anywhere (CPU for tests and the demo, CUDA in production) and is the correctness reference
every other engine is compared against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from chatvla.engines.base import (
    ActItem,
    Engine,
    EngineInfo,
    EngineObservation,
    EngineOptionError,
    ReasoningResult,
    ReasonItem,
    StateStats,
)
from chatvla.model import ChatVLA2, load_model
from chatvla.model.processor import PreparedPrompt

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchEngine(Engine):
    def __init__(self, model: ChatVLA2, *, max_new_tokens: int | None = None) -> None:
        if model.cfg.profile is None:
            raise ValueError(f"model {model.cfg.model_id} names no robot profile; it cannot be served")
        self.model = model
        self.max_new_tokens = int(max_new_tokens or model.cfg.reasoning.max_new_tokens)
        n_params = sum(p.numel() for p in model.parameters())
        self._info = EngineInfo(
            model_id=model.cfg.model_id,
            engine="torch",
            profile=model.cfg.profile,
            max_reasoning_tokens=self.max_new_tokens,
            extra={"parameters": n_params, "moe": model.cfg.moe.kind, "device": str(model.device)},
            state_stats=StateStats(model.stats.state_mean, model.stats.state_std) if model.stats else None,
            reasoning_refresh=(model.cfg.reasoning.refresh_every_n, model.cfg.reasoning.refresh_every_seconds),
        )

    @classmethod
    def from_pretrained(cls, model: str = "tiny", *, device: str = "cpu", dtype: str = "float32",
                        max_new_tokens: int | None = None, **unknown: object) -> TorchEngine:
        """An engine option the torch engine does not know is refused, not ignored: a typo or a
        vLLM-only option (`--engine-option max_model_len=...`) would otherwise change nothing silently."""
        if unknown:
            raise EngineOptionError(f"unknown torch engine option(s) {sorted(unknown)}; it takes device, dtype and "
                             "max_new_tokens")
        if dtype not in _DTYPES:
            raise EngineOptionError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return cls(load_model(model, device=device, dtype=_DTYPES[dtype]), max_new_tokens=max_new_tokens)

    @property
    def info(self) -> EngineInfo:
        return self._info

    def preprocess(self, obs: EngineObservation) -> PreparedPrompt:
        return self.model.prepare(obs.images, obs.instruction, obs.task)

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(max(1, int(n)))

    def reason_batch(
        self, items: Sequence[ReasonItem], yield_point: Callable[[], None] | None = None
    ) -> list[ReasoningResult]:
        out: list[ReasoningResult | None] = [None] * len(items)
        decode = [i for i, it in enumerate(items) if it.reasoning is None and it.reasoning_token_ids is None]
        refill = [i for i, it in enumerate(items) if i not in set(decode)]
        if decode:
            res = self.model.reason([items[i].prepared for i in decode], self.max_new_tokens, yield_point)
            for i, r in zip(decode, res):
                out[i] = self._result(r, items[i].prepared)
        if refill:
            given = [items[i].reasoning_token_ids if items[i].reasoning_token_ids is not None else items[i].reasoning
                     for i in refill]
            res = self.model.prefill([items[i].prepared for i in refill], given)
            for i, r in zip(refill, res):
                out[i] = self._result(r, items[i].prepared)
        return out  # type: ignore[return-value]

    @staticmethod
    def _result(r, prepared: PreparedPrompt) -> ReasoningResult:
        return ReasoningResult(
            text=r.text,
            token_ids=tuple(r.token_ids),
            num_prompt_tokens=len(prepared.input_ids),
            decoded=r.decoded,
            features=r.pooled(),  # the expert only needs the two token means
        )

    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        if not items:
            return []
        states = np.stack([np.asarray(it.state, dtype=np.float32) for it in items])
        acts = self.model.sample_actions([it.reasoning.features for it in items], states,
                                         seeds=[it.seed for it in items])
        return [a.astype(np.float32) for a in acts]
