"""`hidden_states="pooling"`: no capture; a second (pooling) vLLM engine recomputes the rows. The same
tokens and features as the torch engine, and results flagged as coming from the pooling pass."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllmkit import ENGINE_OPTIONS, max_diff, observations

from chatvla.engines.base import ReasonItem

pytestmark = pytest.mark.vllm


def test_pooling_mode_matches_torch(torch_engine):
    from chatvla.engines.vllm_engine import VllmEngine

    engine = VllmEngine.from_pretrained("tiny", hidden_states="pooling", **ENGINE_OPTIONS)
    try:
        assert engine.info.extra["hidden_states"] == "pooling"
        obs = observations(torch_engine.info.profile, 4, seed=121)
        t_res = torch_engine.reason_batch([ReasonItem(torch_engine.preprocess(o)) for o in obs])
        v_prep = [engine.preprocess(o) for o in obs]
        v_res = engine.reason_batch([ReasonItem(p) for p in v_prep])
        for t, v in zip(t_res, v_res):
            assert v.hidden_source == "pooling" and v.token_ids == t.token_ids
            assert max_diff(v.features[0], t.features[0]) < 1e-4 and max_diff(v.features[1], t.features[1]) < 1e-4
        refill = engine.reason_batch([ReasonItem(p, reasoning=v.text, reasoning_token_ids=v.token_ids)
                                      for p, v in zip(v_prep, v_res)])
        for v, r in zip(v_res, refill):
            assert max_diff(v.hidden, r.hidden) < 1e-4
    finally:
        engine.close()
