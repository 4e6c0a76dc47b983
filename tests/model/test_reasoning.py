"""Batched reasoning: greedy decoding, hidden states, the prefill-only path, prompts, tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatvla.model import build_model
from chatvla.model.chatvla2 import StopRule
from chatvla.model.presets import tiny, tiny_chatvla1

from .conftest import random_images


def test_prompt_has_one_placeholder_run_per_camera_and_the_instruction(tiny_model, prepared):
    p = prepared[0]
    pad = tiny_model.prompts.image_pad_id
    runs = np.diff(np.concatenate([[0], (np.array(p.input_ids) == pad).astype(int), [0]]))
    assert (runs == 1).sum() == 2  # two cameras
    assert p.image_grid_thw.tolist() == [[1, 8, 8], [1, 8, 8]]  # 224 px resized to the 112 px budget
    assert sum(np.array(p.input_ids) == pad) == 2 * 16
    assert "pick up the red block" in tiny_model.prompts.decode(p.input_ids)
    assert p.prompt_text.count("<|image_pad|>") == 2


def test_reason_returns_text_tokens_and_hidden_states(tiny_model, prepared):
    outs = tiny_model.reason(prepared)
    h = tiny_model.cfg.hidden_size
    for p, o in zip(prepared, outs):
        assert 1 <= len(o.token_ids) <= tiny_model.cfg.reasoning.max_new_tokens
        assert o.prompt_hidden.shape == (len(p.input_ids), h)
        assert o.reasoning_hidden.shape == (len(o.token_ids) - 1, h)
        assert torch.isfinite(o.prompt_hidden).all()
        assert o.text == tiny_model.prompts.reasoning_text(o.token_ids)


def test_batched_reasoning_equals_per_sample(tiny_model, prepared):
    batched = tiny_model.reason(prepared)
    for p, b in zip(prepared, batched):
        s = tiny_model.reason([p])[0]
        assert s.token_ids == b.token_ids
        torch.testing.assert_close(s.prompt_hidden, b.prompt_hidden, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.reasoning_hidden, b.reasoning_hidden, rtol=1e-4, atol=1e-4)


def test_prefill_with_cached_reasoning_reproduces_decoding(tiny_model, prepared):
    decoded = tiny_model.reason(prepared)
    refilled = tiny_model.prefill(prepared, [o.token_ids for o in decoded])
    for d, r in zip(decoded, refilled):
        assert not r.decoded and r.token_ids == d.token_ids and r.text == d.text
        torch.testing.assert_close(r.prompt_hidden, d.prompt_hidden, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r.reasoning_hidden, d.reasoning_hidden, rtol=1e-4, atol=1e-4)


def test_prefill_accepts_text(tiny_model, prepared):
    out = tiny_model.prefill(prepared[:1], ["10+11=21, pick the card 21. Next action:"])[0]
    assert out.text == "10+11=21, pick the card 21."
    assert out.reasoning_hidden.shape[0] == len(out.token_ids) - 1


def test_reasoning_changes_the_action_chunk(tiny_model, prepared):
    a = tiny_model.prefill(prepared[:1], ["pick the card 21. Next action:"])
    b = tiny_model.prefill(prepared[:1], ["pick the card 12. Next action:"])
    state = np.zeros((1, 8), np.float32)
    act_a = tiny_model.sample_actions(a, state, seeds=[0])
    assert not np.allclose(act_a, tiny_model.sample_actions(b, state, seeds=[0]))


def test_generation_stops_at_the_end_marker():
    cfg = tiny()
    cfg = cfg.with_updates(reasoning=cfg.reasoning.__class__(**{**cfg.reasoning.__dict__, "end_marker": "!!!"}))
    m = build_model(cfg)
    with torch.no_grad():  # zero final norm -> all-zero logits -> greedy always picks token 0 ("!")
        m.vlm.model.language_model.norm.weight.zero_()
    out = m.reason([m.prepare(random_images(m, 0), "anything")])[0]
    assert m.prompts.decode(out.token_ids) == "!!!"
    assert len(out.token_ids) == 3 < cfg.reasoning.max_new_tokens
    assert out.text == ""


def test_reasoning_length_replays_the_stop_rule(tiny_model):
    tok = tiny_model.prompts.tokenizer
    eos = tiny_model.prompts.eos_id
    ids = tok.encode("so 3+4=7. Next action:", add_special_tokens=False).ids
    rule = StopRule(tok, {eos}, "Next action:")
    assert rule.tail == 12

    def _reasoning_length(row):  # how `reason` trims a decoded row
        return rule.length(row) or len(row)

    assert _reasoning_length([*ids, 5, 6]) == len(ids)
    assert _reasoning_length([7, 8, eos, 9]) == 3
    assert _reasoning_length([7, 8, 9]) == 3
    assert rule.ended([7, eos, 9]) and rule.ended(ids) and not rule.ended([7, 8, 9]) and not rule.ended([])


def test_one_to_three_cameras(tiny_model):
    rng = np.random.default_rng(0)
    imgs = {n: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for n in ("a", "b", "c")}
    for k in (1, 2, 3):
        p = tiny_model.prepare(imgs, "look", camera_order=("a", "b", "c")[:k])
        assert p.image_grid_thw.shape[0] == k
        o = tiny_model.reason([p], max_new_tokens=2)[0]
        assert o.prompt_hidden.shape[0] == len(p.input_ids)


@pytest.fixture(scope="module")
def chatvla1():
    return build_model(tiny_chatvla1())


def test_chatvla1_routes_the_whole_request_by_task(chatvla1):
    imgs = random_images(chatvla1, 1)
    ctrl = chatvla1.prepare(imgs, "what is on the board?", task="control")
    vqa = chatvla1.prepare(imgs, "what is on the board?", task="understanding")
    a, b = chatvla1.prefill([ctrl, vqa], ["it shows 3+4", "it shows 3+4"])
    assert not torch.allclose(a.prompt_hidden, b.prompt_hidden)
    routes = chatvla1._task_routes([ctrl, vqa])
    assert routes.tolist() == [1, 0]  # ("understanding", "control") -> expert index
    solo = chatvla1.prefill([vqa], ["it shows 3+4"])[0]
    torch.testing.assert_close(solo.prompt_hidden, b.prompt_hidden, rtol=1e-4, atol=1e-4)


def test_chatvla1_rejects_an_unknown_task(chatvla1):
    p = chatvla1.prepare(random_images(chatvla1, 2), "hi", task="dance")
    with pytest.raises(ValueError, match="dance"):
        chatvla1.prefill([p], ["x"])


def test_work_run_between_tokens_leaves_the_decode_unchanged(tiny_model, prepared):
    """The server runs waiting batches (pre-fills, other decodes) inside a background decode's token
    steps, on the same thread: the decode's tokens and hidden states must not notice."""
    plain = tiny_model.reason(prepared[:1])
    nested: list[int] = []
    rng = np.random.default_rng(5)
    imgs = {n: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for n in ("a", "b", "c")}
    three_cameras = tiny_model.prepare(imgs, "look", camera_order=("a", "b", "c"))  # other M-RoPE offsets

    def between_tokens() -> None:
        other = tiny_model.prefill(prepared[1:2], [plain[0].token_ids])
        inner = tiny_model.reason([three_cameras], max_new_tokens=3)
        nested.append(len(other) + len(inner))

    [out] = tiny_model.reason(prepared[:1], step_hook=between_tokens)
    assert nested and all(n == 2 for n in nested)
    assert out.token_ids == plain[0].token_ids
    torch.testing.assert_close(out.prompt_hidden, plain[0].prompt_hidden)
    torch.testing.assert_close(out.reasoning_hidden, plain[0].reasoning_hidden)
