"""Helpers for the vLLM engine tests (a uniquely named module: pytest runs in importlib mode)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from chatvla.engines.base import EngineObservation
from chatvla.profiles import RobotProfile

# The engine settings every test engine uses (CPU, float32, as the parity tests need).
ENGINE_OPTIONS = {
    "dtype": "float32",
    "max_num_seqs": 16,
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 128 << 20,
    "enforce_eager": True,
    "keep_hidden": True,
}

WORDS = [
    "pick", "up", "place", "the", "red", "blue", "green", "block", "card", "left", "right", "of", "behind",
    "put", "toy", "3", "+", "4", "=",
]


def observations(profile: RobotProfile, n: int, seed: int = 0, *, sizes: list[tuple[int, int]] | None = None
                 ) -> list[EngineObservation]:
    """n different observations: random camera images (optionally of other sizes), states, instructions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        images = {}
        for k, c in enumerate(profile.cameras):
            h, w = sizes[(i + k) % len(sizes)] if sizes else (c.height, c.width)
            images[c.name] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(EngineObservation(
            images=images,
            state=(rng.standard_normal(profile.state_dim) * 0.3).astype(np.float32),
            instruction=" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))),
        ))
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@contextlib.contextmanager
def stop_rule(torch_engine, vllm_engine, *, marker: str | None = None, extra_stop_ids: tuple[int, ...] = (),
              max_new_tokens: int | None = None) -> Iterator[None]:
    """Change the end marker / stop tokens / bound of both engines for one test, then restore them.

    The tiny model writes random text that never reaches "Next action:" or <|im_end|> within its bound,
    so the stop paths are exercised with a marker or stop token that it does produce."""
    from chatvla.engines.vllm_engine import StopRule

    m = torch_engine.model
    saved = (m.cfg, m.prompts.reasoning, m.stop_rule, torch_engine.max_new_tokens,
             vllm_engine.stop, vllm_engine.prompts.reasoning, vllm_engine.max_new_tokens)
    reasoning = m.cfg.reasoning if marker is None else replace(m.cfg.reasoning, end_marker=marker)
    try:
        m.cfg = m.cfg.with_updates(reasoning=reasoning)
        m.prompts.reasoning = reasoning
        m.stop_rule = StopRule(m.prompts.tokenizer, set(m.stop_rule.stop_ids) | set(extra_stop_ids),
                               reasoning.end_marker)
        vllm_engine.prompts.reasoning = reasoning
        vllm_engine.stop = StopRule(vllm_engine.tokenizer, set(vllm_engine.stop.stop_ids) | set(extra_stop_ids),
                                    reasoning.end_marker)
        if max_new_tokens:
            torch_engine.max_new_tokens = vllm_engine.max_new_tokens = max_new_tokens
        yield
    finally:
        (m.cfg, m.prompts.reasoning, m.stop_rule, torch_engine.max_new_tokens,
         vllm_engine.stop, vllm_engine.prompts.reasoning, vllm_engine.max_new_tokens) = saved
