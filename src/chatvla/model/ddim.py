"""DDIM sampling with the settings the DexVLA/ChatVLA authors use (diffusers' DDIMScheduler:
100 train timesteps, squaredcos_cap_v2, epsilon prediction, clip_sample, "leading" spacing, eta 0).

Written here rather than imported from diffusers so the server needs no diffusers at run time; a
test checks it step for step against diffusers.
"""

from __future__ import annotations

import math

import torch

from chatvla.model.config import SamplerConfig


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32, device="cpu")


class DDIM:
    def __init__(self, cfg: SamplerConfig) -> None:
        # The schedule lives on the CPU whatever device the model is built on (even "meta").
        self.cfg = cfg
        n = cfg.num_train_timesteps
        if cfg.beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float32, device="cpu")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0, device="cpu") if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.step_ratio = n // cfg.num_inference_steps
        # "leading" spacing: [90, 80, ..., 0] for 100 train / 10 inference steps.
        self.timesteps: list[int] = [
            i * self.step_ratio + cfg.steps_offset for i in reversed(range(cfg.num_inference_steps))
        ]

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the head is trained to output for x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps ([B] timesteps)."""
        kind = self.cfg.prediction_type
        if kind == "sample":
            return x0
        if kind == "v_prediction":
            a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps

    def step(self, out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One deterministic (eta = 0) DDIM update x_t -> x_{t - step_ratio}, from the head's output
        `out` (noise, clean sample or v, as `prediction_type` says)."""
        prev = t - self.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        kind = self.cfg.prediction_type
        if kind == "sample":
            x0 = out
            eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
        elif kind == "v_prediction":
            x0 = a_t.sqrt() * x - b_t.sqrt() * out
            eps = a_t.sqrt() * out + b_t.sqrt() * x
        else:
            eps = out
            x0 = (x - b_t.sqrt() * eps) / a_t.sqrt()
        if self.cfg.clip_sample:
            r = self.cfg.clip_sample_range
            x0 = x0.clamp(-r, r)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
