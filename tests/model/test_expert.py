"""The action expert: reasoning-following conditioning, DDIM, batching, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chatvla.model.action_expert import ActionExpert, DiTHead, TimestepEmbedder
from chatvla.model.config import ActionExpertConfig, NormStats, SamplerConfig
from chatvla.model.ddim import DDIM
from chatvla.model.vlm import init_weights

CFG = ActionExpertConfig(depth=6, width=64, num_heads=4, chunk_size=8, action_dim=5, state_dim=5)


def _head() -> DiTHead:
    h = DiTHead(CFG, cond_dim=32)
    init_weights(h, seed=3, std=0.1)
    return h.eval()


def _block_outputs(head: DiTHead, obs_stream, rea_stream, state, x, t) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone())) for b in head.blocks]
    hooks.append(head.final_layer.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone())))
    try:
        obs_c, rea_c = head.conditions(obs_stream, rea_stream, state)
        head(x, t, obs_c, rea_c)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_reasoning_changes_only_blocks_at_or_above_the_split():
    head = _head()
    assert head.split == 3  # default: depth // 2
    g = torch.Generator().manual_seed(0)
    obs, rea, rea2 = (torch.randn(2, 1, 32, generator=g) for _ in range(3))
    state, x = torch.randn(2, 5, generator=g), torch.randn(2, 8, 5, generator=g)
    t = torch.tensor([90, 40])
    a = _block_outputs(head, obs, rea, state, x, t)
    b = _block_outputs(head, obs, rea2, state, x, t)
    for i in range(CFG.depth):
        same = torch.equal(a[i], b[i])
        assert same == (i < head.split), f"block {i}: changed={not same}"
    assert not torch.equal(a[-1], b[-1]), "the final layer follows the reasoning too"


def test_explicit_reasoning_layer_id():
    cfg = ActionExpertConfig(depth=4, width=32, num_heads=4, chunk_size=4, action_dim=2, state_dim=2,
                             reasoning_layer_id=1)
    assert DiTHead(cfg, 16).split == 1


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_ddim_matches_diffusers_step_for_step(kind):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                        set_alpha_to_one=True, steps_offset=0, prediction_type=kind)
    ref.set_timesteps(10)
    ours = DDIM(SamplerConfig(prediction_type=kind))
    assert ours.timesteps == [int(t) for t in ref.timesteps]
    g = torch.Generator().manual_seed(1)
    x_ref = x_ours = torch.randn(3, 8, 5, generator=g)
    for t in ours.timesteps:
        eps = torch.randn(3, 8, 5, generator=g)
        x_ref = ref.step(eps, t, x_ref).prev_sample
        x_ours = ours.step(eps, t, x_ours)
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-6)



@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_a_head_that_outputs_its_training_target_denoises_exactly(kind):
    """What `target` trains the head to output is what `step` reads: fed it, a step lands on the
    noised sample one step nearer the clean chunk, whichever quantity the head predicts."""
    ddim = DDIM(SamplerConfig(prediction_type=kind))
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 8, 5, generator=g) * 1.8 - 0.9  # inside the clip range
    eps = torch.randn(4, 8, 5, generator=g)
    for t in (90, 40, 10):
        a = ddim.alphas_cumprod[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = ddim.target(x0, eps, torch.full((4,), t))
        a_prev = ddim.alphas_cumprod[t - ddim.step_ratio]
        torch.testing.assert_close(ddim.step(out, t, xt), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps,
                                   rtol=0, atol=1e-5)


def test_an_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        SamplerConfig(prediction_type="flow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_inference_steps"):
        SamplerConfig(num_inference_steps=101)  # more than the 100 train timesteps

def test_timestep_embedding_cos_first_and_bf16_option_follows_authors_rounding():
    emb = TimestepEmbedder(16, freq_size=256)
    t = torch.tensor([0, 37, 90])
    s = emb.sinusoid(t)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    torch.testing.assert_close(s[:, :half], torch.cos(t[:, None].float() * freqs))
    torch.testing.assert_close(s[:, half:], torch.sin(t[:, None].float() * freqs))
    bf = TimestepEmbedder(16, freq_size=256, freq_dtype="bfloat16").sinusoid(t)
    freqs_bf = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.bfloat16) / half)
    args = t[:, None].float() * freqs_bf[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], -1).to(torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, expected)
    assert not torch.equal(bf.float(), s), "bf16 mode must differ from float32 mode"


def _expert() -> ActionExpert:
    e = ActionExpert(CFG, SamplerConfig(), cond_dim=32)
    init_weights(e, seed=5, std=0.1)
    stats = NormStats(action_min=(-1, -2, 0, 0, 5), action_max=(1, 2, 1, 3, 6),
                      state_mean=(0.0,) * 5, state_std=(1.0,) * 5)
    e.set_stats(stats)
    return e.eval()


def test_batched_sampling_equals_per_sample_with_the_same_noise():
    e = _expert()
    g = torch.Generator().manual_seed(2)
    p, r, s = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g), torch.randn(5, 5, generator=g)
    seeds = [11, 22, 33, 44, 55]
    batched = e.sample(p, r, s, ActionExpert.noise(seeds, 8, 5))
    for i, seed in enumerate(seeds):
        single = e.sample(p[i:i + 1], r[i:i + 1], s[i:i + 1], ActionExpert.noise([seed], 8, 5))
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-5)


def test_per_sample_noise_depends_only_on_the_seed():
    a = ActionExpert.noise([1, 2], 4, 3)
    b = ActionExpert.noise([7, 2], 4, 3)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_no_seed_starts_from_zero_noise_and_maps_each_condition_to_one_chunk():
    """What `--noise zero` serves: seed None is zero noise, batched with seeded rows as it comes; the
    chunk then depends on the condition alone (DDIM adds no noise on the way) and still on it."""
    noise = ActionExpert.noise([None, 5], 4, 3)
    assert torch.equal(noise[0], torch.zeros(4, 3)) and torch.equal(noise[1], ActionExpert.noise([5], 4, 3)[0])
    e = _expert()
    g = torch.Generator().manual_seed(3)
    p, r, s = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(2, 5, generator=g)
    first = e.sample_pooled(list(zip(p, r)), s.numpy(), [None, None])
    np.testing.assert_array_equal(first, e.sample_pooled(list(zip(p, r)), s.numpy(), [None, None]))
    assert not np.allclose(first[0], first[1])  # two conditions, two chunks
    assert not np.allclose(first, e.sample_pooled(list(zip(p, r)), s.numpy(), [1, 2]))


def test_outputs_are_unnormalised_into_the_stats_range():
    e = _expert()
    g = torch.Generator().manual_seed(4)
    out = e.sample(torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g), torch.zeros(3, 5),
                   ActionExpert.noise([1, 2, 3], 8, 5)).numpy()
    lo, hi = e.action_min.numpy(), e.action_max.numpy()
    # clip_sample keeps the predicted x0 in [-1, 1], so the final sample lies within the stats range.
    assert np.all(out >= lo - 1e-5) and np.all(out <= hi + 1e-5)
    assert out[..., 4].min() >= 5 - 1e-5


def _rows(lo: tuple[float, ...], hi: tuple[float, ...], h: int) -> tuple[tuple, tuple]:
    """Row ranges that widen with the row, as offsets from the state do over a chunk."""
    grow = [(r + 1) / h for r in range(h)]
    return tuple(tuple(v * g for v in lo) for g in grow), tuple(tuple(v * g for v in hi) for g in grow)


def test_per_row_ranges_scale_each_row_by_its_own_range():
    """With per-row stats, a normalised chunk row r spans row r's range: the near rows resolve finer."""
    e = _expert()
    h = CFG.chunk_size
    lo_rows, hi_rows = _rows((-1, -2, -1, -3, -1), (1, 2, 1, 3, 1), h)
    stats = NormStats(action_min=(-1, -2, -1, -3, -1), action_max=(1, 2, 1, 3, 1), state_mean=(0.0,) * 5,
                      state_std=(1.0,) * 5, action_min_rows=lo_rows, action_max_rows=hi_rows)
    e.set_stats(stats)
    assert tuple(e.action_min.shape) == (h, 5)
    x = torch.zeros(1, h, 5)
    x[0, :, 0] = 1.0  # the top of every row's range
    out = e.unnormalize_chunk(x, torch.zeros(1, 5))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([r[0] for r in hi_rows]))
    chunks = torch.rand(2, h, 5) * 0.2 - 0.1
    torch.testing.assert_close(e.unnormalize_chunk(e.normalize_chunk(chunks, torch.zeros(2, 5)), torch.zeros(2, 5)),
                               chunks, atol=1e-5, rtol=1e-5)


def test_per_row_stats_are_checked_and_round_trip_through_json():
    h = CFG.chunk_size
    lo_rows, hi_rows = _rows((-1.0,) * 5, (1.0,) * 5, h)
    stats = NormStats((-1.0,) * 5, (1.0,) * 5, (0.0,) * 5, (1.0,) * 5, lo_rows, hi_rows)
    d = stats.to_dict()
    assert len(d["action_min_rows"]) == h and NormStats.from_dict(d) == stats
    assert "action_min_rows" not in NormStats((-1.0,) * 5, (1.0,) * 5, (0.0,) * 5, (1.0,) * 5).to_dict()
    with pytest.raises(ValueError, match="chunk has 16"):
        NormStats((-1.0,) * 5, (1.0,) * 5, (0.0,) * 5, (1.0,) * 5, lo_rows[:3], hi_rows[:3]).check(5, 5, 16)
    with pytest.raises(ValueError, match="come together"):
        NormStats((-1.0,) * 5, (1.0,) * 5, (0.0,) * 5, (1.0,) * 5, lo_rows, None).check(5, 5, h)
    with pytest.raises(ValueError, match="must exceed"):
        NormStats((-1.0,) * 5, (1.0,) * 5, (0.0,) * 5, (1.0,) * 5, hi_rows, lo_rows).check(5, 5, h)
    with pytest.raises(ValueError, match="list of lists"):
        NormStats.from_dict({**d, "action_max_rows": 3})
