"""The vLLM engine against the torch engine (the reference), tiny preset, float32 on CPU.

Reasoning tokens must be identical; hidden states (every row), pooled features and action chunks must
agree within 1e-4."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllmkit import max_diff, observations, stop_rule

from chatvla.engines.base import ActItem, ReasonItem

pytestmark = pytest.mark.vllm
ATOL = 1e-4


def _pairs(torch_engine, vllm_engine, obs):
    tp = [torch_engine.preprocess(o) for o in obs]
    vp = [vllm_engine.preprocess(o) for o in obs]
    return tp, vp


def _torch_rows(torch_engine, prepared):
    """Full hidden rows (prompt + fed-back reasoning) from the torch model itself."""
    return [torch.cat([r.prompt_hidden, r.reasoning_hidden]) for r in torch_engine.model.reason(prepared,
                                                                                                 torch_engine.max_new_tokens)]


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_reasoning_tokens_and_hidden_states_match_torch(torch_engine, vllm_engine, batch):
    obs = observations(torch_engine.info.profile, batch, seed=batch)
    tp, vp = _pairs(torch_engine, vllm_engine, obs)
    t_res = torch_engine.reason_batch([ReasonItem(p) for p in tp])
    v_res = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    for i, (t, v) in enumerate(zip(t_res, v_res)):
        assert v.token_ids == t.token_ids, f"request {i}: vLLM {v.token_ids} vs torch {t.token_ids}"
        assert v.text == t.text and v.num_prompt_tokens == t.num_prompt_tokens and v.decoded
        assert v.hidden_source == "capture"
        assert max_diff(v.features[0], t.features[0]) < ATOL
        assert max_diff(v.features[1], t.features[1]) < ATOL
    # every row, not only the means
    for i, (rows, v) in enumerate(zip(_torch_rows(torch_engine, tp), v_res)):
        assert v.hidden.shape == rows.shape, f"request {i}"
        assert max_diff(v.hidden, rows) < ATOL, f"request {i}"


def test_images_of_other_sizes_match(torch_engine, vllm_engine):
    """Non-square and off-grid camera images: both engines feed the same resized pixels."""
    obs = observations(torch_engine.info.profile, 4, seed=11, sizes=[(97, 131), (480, 640), (200, 120)])
    tp, vp = _pairs(torch_engine, vllm_engine, obs)
    t_res = torch_engine.reason_batch([ReasonItem(p) for p in tp])
    v_res = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    assert [v.token_ids for v in v_res] == [t.token_ids for t in t_res]
    assert max(max_diff(v.features[0], t.features[0]) for v, t in zip(v_res, t_res)) < ATOL


def test_pixel_values_vllm_sees_equal_the_torch_engine(torch_engine, vllm_engine):
    """The measurement behind the pixel-parity approach (docs/deployment-gpu.md): the PIL resize done in
    preprocess is exactly the torch processor's own, and vLLM's processor then only rescales and
    normalises (float rounding of a fused affine, <= 1e-6); without the pre-resize they differ ~1e-2."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    obs = observations(torch_engine.info.profile, 3, seed=5, sizes=[(224, 224), (480, 640), (97, 131)])
    hf = MULTIMODAL_REGISTRY.create_processor(vllm_engine._llm.model_config).info.get_hf_processor()
    proc = torch_engine.model.prompts.image_processor
    for o in obs:
        t = torch_engine.preprocess(o)
        v = vllm_engine.preprocess(o)
        assert v.prompt.input_ids == t.input_ids
        # the torch processor on our resized images gives bit-identical pixel values
        again = proc(images=[np.asarray(im) for im in v.images], return_tensors="pt")
        assert torch.equal(again["pixel_values"], t.pixel_values)
        # what vLLM's processor makes of them
        theirs = hf.image_processor(images=v.images, return_tensors="pt")
        assert torch.equal(theirs["image_grid_thw"], t.image_grid_thw)
        assert max_diff(theirs["pixel_values"], t.pixel_values) <= 1e-6


def test_prefill_only_path_matches_torch_and_decode(torch_engine, vllm_engine):
    obs = observations(torch_engine.info.profile, 4, seed=21)
    tp, vp = _pairs(torch_engine, vllm_engine, obs)
    decoded = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    # cached token ids (what the server should pass) and text only (re-tokenised)
    by_ids = [ReasonItem(p, reasoning=d.text, reasoning_token_ids=d.token_ids) for p, d in zip(vp, decoded)]
    v_ids = vllm_engine.reason_batch(by_ids)
    t_ids = torch_engine.reason_batch([ReasonItem(p, reasoning=d.text, reasoning_token_ids=d.token_ids)
                                       for p, d in zip(tp, decoded)])
    for d, v, t in zip(decoded, v_ids, t_ids):
        assert not v.decoded and v.token_ids == d.token_ids == t.token_ids
        assert v.num_prompt_tokens == d.num_prompt_tokens
        assert v.hidden.shape == d.hidden.shape and max_diff(v.hidden, d.hidden) < ATOL
        assert max_diff(v.features[0], t.features[0]) < ATOL and max_diff(v.features[1], t.features[1]) < ATOL
    text_only = vllm_engine.reason_batch([ReasonItem(p, reasoning="pick the card 7. Next action:") for p in vp[:2]])
    t_text = torch_engine.reason_batch([ReasonItem(p, reasoning="pick the card 7. Next action:") for p in tp[:2]])
    for v, t in zip(text_only, t_text):
        assert v.token_ids == t.token_ids and len(v.token_ids) > 1
        assert max_diff(v.features[1], t.features[1]) < ATOL


def test_action_chunks_match_with_the_same_noise(torch_engine, vllm_engine):
    obs = observations(torch_engine.info.profile, 4, seed=31)
    tp, vp = _pairs(torch_engine, vllm_engine, obs)
    t_res = torch_engine.reason_batch([ReasonItem(p) for p in tp])
    v_res = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    seeds = [101, 202, 303, 404]
    t_act = torch_engine.act_batch([ActItem(r, o.state, s) for r, o, s in zip(t_res, obs, seeds)])
    v_act = vllm_engine.act_batch([ActItem(r, o.state, s) for r, o, s in zip(v_res, obs, seeds)])
    p = torch_engine.info.profile
    for a, b in zip(t_act, v_act):
        assert b.shape == (p.chunk_size, p.action_dim) and b.dtype == np.float32
        assert np.abs(a - b).max() < ATOL
    # a different seed gives a different chunk (the comparison above is not vacuous)
    other = vllm_engine.act_batch([ActItem(v_res[0], obs[0].state, 999)])[0]
    assert np.abs(other - v_act[0]).max() > 1e-3


def test_capture_matches_the_pooling_pass(vllm_engine, torch_engine):
    """The fallback (a second, pooling engine) returns the same rows as the in-generation capture."""
    obs = observations(torch_engine.info.profile, 2, seed=41)
    vp = [vllm_engine.preprocess(o) for o in obs]
    res = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    for p, r in zip(vp, res):
        ref = vllm_engine.pooled_reference(p, r.token_ids)
        assert ref.shape == r.hidden.shape and max_diff(ref, r.hidden) < ATOL


def _frequent(torch_engine, vllm_engine, seed: int) -> tuple[list, list, int, str]:
    obs = observations(torch_engine.info.profile, 8, seed=seed)
    tp, vp = _pairs(torch_engine, vllm_engine, obs)
    base = torch_engine.reason_batch([ReasonItem(p) for p in tp])
    counts = Counter(t for r in base for t in r.token_ids[1:])
    token = counts.most_common(1)[0][0]
    return tp, vp, token, torch_engine.model.prompts.tokenizer.decode([token])


def test_end_marker_stops_both_engines_at_the_same_token(torch_engine, vllm_engine):
    tp, vp, _, text = _frequent(torch_engine, vllm_engine, seed=51)
    marker = text.strip()[-3:] or text
    with stop_rule(torch_engine, vllm_engine, marker=marker, max_new_tokens=20):
        t_res = torch_engine.reason_batch([ReasonItem(p) for p in tp])
        v_res = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    lengths = [len(t.token_ids) for t in t_res]
    assert any(n < 20 for n in lengths), f"marker {marker!r} never ended a reasoning: {lengths}"
    for t, v in zip(t_res, v_res):
        assert v.token_ids == t.token_ids and v.text == t.text
        assert max_diff(v.features[1], t.features[1]) < ATOL
    # requests stopped early were aborted inside vLLM and their captured rows removed
    assert vllm_engine._run(vllm_engine._llm.collective_rpc("chatvla_capture_pending")) == [0]


def test_stop_token_and_min_tokens_match(torch_engine, vllm_engine):
    """A frequent token made a stop token: both engines forbid it as the first token (min 1 new token)
    and end the reasoning on it afterwards, including it."""
    tp, vp, token, _ = _frequent(torch_engine, vllm_engine, seed=61)
    with stop_rule(torch_engine, vllm_engine, extra_stop_ids=(token,), max_new_tokens=20):
        t_res = torch_engine.reason_batch([ReasonItem(p) for p in tp])
        v_res = vllm_engine.reason_batch([ReasonItem(p) for p in vp])
    assert any(t.token_ids[-1] == token for t in t_res), "the stop token never ended a reasoning"
    for t, v in zip(t_res, v_res):
        assert v.token_ids == t.token_ids
        assert max_diff(v.features[1], t.features[1]) < ATOL
