"""An exponential moving average of a module's weights, kept beside training and served at its end.

Why: the expert's weights at the last step carry the noise of the last few batches, and a diffusion
policy's actions inherit it as a few millimetres of scatter where the grasp needs precision. The average
over the last few thousand steps sits nearer the minimum the steps circle (Polyak averaging; Diffusion
Policy serves such weights). The average starts as the weights it is given and warms up as
`min(decay, (1 + n) / (10 + n))` after `n` updates, so a short run is not dragged back to its start.

The average is kept in float32 and saved as safetensors (its update count in the metadata): a resumed
run goes on with the same average as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class WeightAverage:
    """`decay` in (0, 1): the share of the average each update keeps."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    def rate(self) -> float:
        """The share of the average the next update keeps."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        keep = self.rate()
        for n, p in module.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - keep)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Puts the average into `module`'s parameters (the weights then saved and served)."""
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path),
                  metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, path: Path) -> None:
        """The average an interrupted run saved; refuses one of other parameters."""
        with safe_open(str(path), "pt") as f:
            updates = int((f.metadata() or {}).get("updates", "0"))
            saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        if set(saved) != set(self.shadow) or any(saved[k].shape != v.shape for k, v in self.shadow.items()):
            raise ValueError(f"{path} holds the average of other parameters")
        self.shadow, self.updates = saved, updates
