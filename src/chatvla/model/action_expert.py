"""The diffusion action expert with ChatVLA-2's reasoning-following conditioning.

    VLM side (ActionExpert):
        obs stream       = input_action_proj(prompt hidden) + reasoning_action_proj(reasoning hidden)
        reasoning stream = reasoning_action_proj(reasoning hidden)
      each projector: mean over tokens -> Linear -> GELU -> Linear

    Head (policy_head, a DiT over the H action tokens only):
        c   = t_emb + cond_obs_emb([norm_after_pool(pool(obs stream)); state])
        c_r = t_emb + cond_reasoning_emb([norm_after_pool(pool(reasoning stream)); state])
        blocks i <  reasoning_layer_id: adaLN(c)
        blocks i >= reasoning_layer_id and the final layer: adaLN(c_r)

Parameter names follow the authors' ChatVLA-2 head (`t_embedder`, `norm_after_pool`, `cond_obs_emb`,
`cond_reasoning_emb`, `x_embedder`, `pos_embed`, `blocks.i.adaLN_modulation.1`, `attn.q`, `attn.kv`,
`attn.proj`, `mlp.fc1`, `mlp.fc2`, `final_layer.*`) and DexVLA's projectors (`mlps.0`, `mlps.2`), so
their checkpoints load without a renaming table. The implementation is our own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatvla.model.config import ActionExpertConfig, NormStats, SamplerConfig
from chatvla.model.ddim import DDIM


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoid (cos first) of the diffusion step -> Linear-SiLU-Linear."""

    def __init__(self, width: int, freq_size: int = 256, freq_dtype: str = "float32") -> None:
        super().__init__()
        self.freq_size = freq_size
        self.freq_dtype = getattr(torch, freq_dtype)
        self.mlp = nn.Sequential(nn.Linear(freq_size, width), nn.SiLU(), nn.Linear(width, width))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        # In bfloat16 mode the frequencies and the result are rounded to bf16 like the authors' code,
        # so their checkpoints see exactly the inputs they were trained on.
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=self.freq_dtype) / half).to(t.device)
        args = t[:, None].float() * freqs[None].float()
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb.to(self.freq_dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.sinusoid(t).to(w.dtype))


class Attention(nn.Module):
    """Self-attention over the action tokens, with the authors' separate q and kv projections."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN block: shift/scale/gate for attention, then for the MLP; LayerNorms without affine."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTHead(nn.Module):
    """The reasoning-following DiT. Streams are [B, T, cond_dim]; here T is 1 (already pooled)."""

    def __init__(self, cfg: ActionExpertConfig, cond_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.split = cfg.layer_split
        self.norm_after_pool = nn.LayerNorm(cond_dim)
        self.x_embedder = nn.Linear(cfg.action_dim, w)
        self.t_embedder = TimestepEmbedder(w, cfg.frequency_embedding_size, cfg.timestep_freq_dtype)
        self.cond_obs_emb = nn.Linear(cond_dim + cfg.state_dim, w)
        self.cond_reasoning_emb = nn.Linear(cond_dim + cfg.state_dim, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.chunk_size, w))
        self.blocks = nn.ModuleList([DiTBlock(w, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(w, cfg.action_dim)

    def conditions(
        self, obs_stream: torch.Tensor, reasoning_stream: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step-independent parts of c and c_r (computed once per sampling run)."""
        obs = self.norm_after_pool(obs_stream.mean(dim=1))
        rea = self.norm_after_pool(reasoning_stream.mean(dim=1))
        return (self.cond_obs_emb(torch.cat([obs, state], -1)),
                self.cond_reasoning_emb(torch.cat([rea, state], -1)))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, obs_cond: torch.Tensor, reasoning_cond: torch.Tensor
    ) -> torch.Tensor:
        """Predict the noise in x [B, H, action_dim] at timesteps t [B]."""
        t_emb = self.t_embedder(t)
        c, c_r = t_emb + obs_cond, t_emb + reasoning_cond
        h = self.x_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks):
            h = block(h, c if i < self.split else c_r)
        return self.final_layer(h, c_r)


class ActionProjector(nn.Module):
    """Mean over tokens -> Linear -> GELU -> Linear (DexVLA's ActionProjector layout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleList([nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled
        for m in self.mlps:
            x = m(x)
        return x


def mean_pool(hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of [T, D]; zeros when there are no tokens (a reasoning of one token has no
    fed-back hidden state, see docs/model.md)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(hidden.shape[-1])
    return hidden.mean(dim=0)


class ActionExpert(nn.Module):
    """Projectors + DiT head + DDIM sampler + (un)normalisation. Batched, with per-sample noise."""

    def __init__(self, cfg: ActionExpertConfig, sampler: SamplerConfig, cond_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_action_proj = ActionProjector(cond_dim)
        self.reasoning_action_proj = ActionProjector(cond_dim)
        self.policy_head = DiTHead(cfg, cond_dim)
        self.ddim = DDIM(sampler)
        self.register_buffer("action_min", torch.full((cfg.action_dim,), -1.0), persistent=False)
        self.register_buffer("action_max", torch.full((cfg.action_dim,), 1.0), persistent=False)
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim), persistent=False)
        self.register_buffer("state_std", torch.ones(cfg.state_dim), persistent=False)

    def set_stats(self, stats: NormStats) -> None:
        """Per-dimension ranges ([A]) or, when the stats have them, one per chunk row ([H, A]): both
        broadcast over a [B, H, A] chunk the same way."""
        stats.check(self.cfg.action_dim, self.cfg.state_dim, self.cfg.chunk_size)
        dev = self.action_min.device
        lo, hi = (stats.action_min, stats.action_max)
        if stats.per_row:
            lo, hi = stats.action_min_rows, stats.action_max_rows
        self.action_min = torch.tensor(lo, dtype=torch.float32, device=dev)
        self.action_max = torch.tensor(hi, dtype=torch.float32, device=dev)
        self.state_mean = torch.tensor(stats.state_mean, dtype=torch.float32, device=dev)
        self.state_std = torch.tensor(stats.state_std, dtype=torch.float32, device=dev).clamp_min(1e-6)

    def streams(self, prompt_pooled: torch.Tensor, reasoning_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D] pooled hidden states -> (obs stream, reasoning stream), each [B, 1, D]."""
        r = self.reasoning_action_proj(reasoning_pooled)
        o = self.input_action_proj(prompt_pooled) + r
        return o.unsqueeze(1), r.unsqueeze(1)

    @staticmethod
    def noise(seeds: Sequence[int | None], chunk: int, dim: int) -> torch.Tensor:
        """Per-sample initial noise: sample i depends only on seeds[i], so batching changes nothing. A
        seed of None starts from zero noise: DDIM (no noise added on the way) then maps each condition to
        one chunk, the same every time."""
        def one(s: int | None) -> torch.Tensor:
            if s is None:
                return torch.zeros(chunk, dim)
            return torch.randn(chunk, dim, generator=torch.Generator().manual_seed(int(s)))

        return torch.stack([one(s) for s in seeds])

    @torch.no_grad()
    def sample_pooled(
        self, pooled: Sequence[tuple[torch.Tensor, torch.Tensor]], states: np.ndarray | torch.Tensor,
        seeds: Sequence[int | None],
    ) -> np.ndarray:
        """Chunks [B, H, A] (robot units) from per-sample (prompt mean, reasoning mean) pairs, states in
        robot units and one noise seed per sample: what every engine's expert stage computes."""
        c = self.cfg
        if len(pooled) != len(seeds):
            raise ValueError("sample_pooled needs one seed per sample")
        prompt = torch.stack([p for p, _ in pooled])
        reas = torch.stack([r for _, r in pooled])
        st = torch.as_tensor(np.asarray(states, dtype=np.float32)).reshape(len(pooled), c.state_dim)
        return self.sample(prompt, reas, st, self.noise(seeds, c.chunk_size, c.action_dim)).cpu().numpy()

    @torch.no_grad()
    def sample(
        self,
        prompt_pooled: torch.Tensor,
        reasoning_pooled: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """DDIM from `noise` [B, H, A]; returns actions in robot units [B, H, A] (float32)."""
        dtype = self.policy_head.x_embedder.weight.dtype
        dev = self.policy_head.x_embedder.weight.device
        state_n = ((state.to(dev, torch.float32) - self.state_mean) / self.state_std).to(dtype)
        obs_s, rea_s = self.streams(prompt_pooled.to(dev, dtype), reasoning_pooled.to(dev, dtype))
        obs_c, rea_c = self.policy_head.conditions(obs_s, rea_s, state_n)
        x = noise.to(dev, dtype)
        b = x.shape[0]
        for t in self.ddim.timesteps:
            tt = torch.full((b,), t, dtype=torch.long, device=dev)
            out = self.policy_head(x, tt, obs_c, rea_c)
            x = self.ddim.step(out.float(), t, x.float()).to(dtype)
        return self.unnormalize_chunk(x.float(), state)

    def unnormalize_chunk(self, x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """[-1, 1] samples [B, H, A] -> robot units: min-max, then the state added back on the
        `relative_to_state` dims."""
        actions = (x + 1) / 2 * (self.action_max - self.action_min) + self.action_min
        rel = list(self.cfg.relative_to_state)
        if rel:
            actions[..., rel] = actions[..., rel] + states.to(actions.device, torch.float32)[:, None, rel]
        return actions

    def normalize_chunk(self, chunks: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Robot-unit chunks [B, H, A] -> the [-1, 1] targets the diffusion learns (inverse of `sample`'s
        last step): offsets from the state on `relative_to_state` dims, then min-max."""
        dev = self.action_min.device
        chunks = chunks.to(dev, torch.float32).clone()
        rel = list(self.cfg.relative_to_state)
        if rel:
            chunks[..., rel] = chunks[..., rel] - states.to(dev, torch.float32)[:, None, rel]
        return (2 * (chunks - self.action_min) / (self.action_max - self.action_min) - 1).clamp(-1, 1)
