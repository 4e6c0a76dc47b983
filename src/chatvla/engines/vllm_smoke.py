"""`python -m chatvla.engines.vllm_smoke`: one reasoning and one chunk with the tiny preset on vLLM.

The vLLM install script runs it last, so a broken install fails there with a clear message instead of
at the first `chatvla serve --engine vllm`.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from chatvla.engines.base import ActItem, EngineObservation, ReasonItem
from chatvla.engines.vllm_engine import VllmEngine


def smoke() -> int:
    """Build the engine, reason and act once, print how long each took; 0 when both worked."""
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    engine = VllmEngine.from_pretrained("tiny", max_model_len=1024)
    try:
        t1 = time.perf_counter()
        p = engine.info.profile
        rng = np.random.default_rng(0)
        obs = EngineObservation(
            images={c.name: rng.integers(0, 255, (c.height, c.width, 3), dtype=np.uint8) for c in p.cameras},
            state=np.zeros(p.state_dim, np.float32), instruction="pick up the red block")
        r = engine.reason_batch([ReasonItem(engine.preprocess(obs))])[0]
        a = engine.act_batch([ActItem(r, obs.state, seed=0)])[0]
        assert len(r.token_ids) >= 1 and np.isfinite(a).all() and a.shape == (p.chunk_size, p.action_dim)
        print(f"[vllm-cpu]     smoke ok: engine {t1 - t0:.0f} s, {len(r.token_ids)} reasoning tokens "
              f"(hidden states by {r.hidden_source}) and a {a.shape} chunk in {time.perf_counter() - t1:.2f} s")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["--smoke"]):
        print("usage: python -m chatvla.engines.vllm_smoke", file=sys.stderr)
        sys.exit(2)
    sys.exit(smoke())
