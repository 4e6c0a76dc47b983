"""Stage 0: teach the vision tower to read the cards' labels, on crops of rendered scenes.

The labels are 6-10 pixels high in the 224x224 cameras, one card per 64 merged tokens. Taught inside
stage 1 (`--card-token-weight`), every labelled card costs a whole VLM + expert step, and the tower had
seen too few of them to read more than a quarter after 6,000 steps (`benchmarks/card_reading.py`).
A crop of 112x112 pixels around one card is 16 merged tokens through the vision tower alone, so the
same compute labels several times more cards. The tower is position-free apart from its 2-D rotary
embedding (relative), so what it learns on crops holds on the full image; `benchmarks/card_reading.py`
measures it there. The read-out head is the training-only `CardTokenProbe` that stage 1 keeps using.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chatvla.model.processor import PromptBuilder
from chatvla.training.batches import patchify
from chatvla.training.data import Scene
from chatvla.training.labels import card_token_labels

CROP = 112  # pixels: 4x4 merged tokens (patch 14, merge 2); the card's centre lands in the inner 2x2
TOKEN = 28  # pixels per merged token


@dataclass(frozen=True)
class CardView:
    """One card seen by one camera of one scene: which crop can be centred on."""

    scene: int
    camera: str
    number: int


def card_views(scenes: Sequence[Scene]) -> list[CardView]:
    """Every (scene, camera, card) whose centre is inside that camera's image. Scenes without card
    pixels (toys, the episodes' first frames) give none."""
    out = []
    for i, s in enumerate(scenes):
        for cam, cards in (s.card_pixels or {}).items():
            h, w = s.images[cam].shape[:2]
            out.extend(CardView(i, cam, int(n)) for n, (c, r) in cards.items() if 0 <= c < w and 0 <= r < h)
    return out


def card_crop(image: np.ndarray, pixels: Mapping[int, tuple[float, float]], number: int,
              rng: np.random.Generator, size: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """A `size` x `size` crop of `image` with card `number`'s centre at a random place at least one
    token from the crop's edge (where the image allows), and its tokens' labels
    (`labels.card_token_labels`, row by row): every card whose centre falls in the crop is labelled,
    not only the one it was cut around."""
    h, w = image.shape[:2]
    if size > min(h, w) or size % TOKEN:
        raise ValueError(f"crop of {size} px: must be a multiple of {TOKEN} and fit the {w}x{h} image")
    col, row = pixels[number]
    x0 = int(np.clip(round(col - rng.uniform(TOKEN, size - TOKEN)), 0, w - size))
    y0 = int(np.clip(round(row - rng.uniform(TOKEN, size - TOKEN)), 0, h - size))
    shifted = {n: (c - x0, r - y0) for n, (c, r) in pixels.items()}
    labels = card_token_labels(shifted, (size, size), (size // TOKEN, size // TOKEN))
    return image[y0:y0 + size, x0:x0 + size], labels.reshape(-1)


@dataclass
class CropBatch:
    pixel_values: torch.Tensor  # [patches, C*T*P*P], crop after crop
    grid_thw: torch.Tensor  # [crops, 3]
    labels: torch.Tensor  # [merged tokens]: the order the vision tower emits them


def crop_batch(builder: PromptBuilder, scenes: Sequence[Scene], views: Sequence[CardView], rng: np.random.Generator,
               n: int, size: int = CROP) -> CropBatch:
    """`n` crops around cards drawn at random from `views`, patched as the server's image processor
    would patch an image of that size (`batches.patchify`)."""
    p = builder.image_processor.patch_size
    pv, labels = [], []
    for k in rng.integers(len(views), size=n):
        v = views[int(k)]
        s = scenes[v.scene]
        assert s.card_pixels is not None  # card_views lists only scenes that have them
        crop, lab = card_crop(s.images[v.camera], s.card_pixels[v.camera], v.number, rng, size)
        patches = patchify(builder, crop)
        if patches is None:
            raise ValueError(f"a {size} px crop is outside the model's image size limits")
        pv.append(patches)
        labels.append(lab)
    grid = torch.tensor([[1, size // p, size // p]] * n)
    return CropBatch(torch.cat(pv), grid, torch.from_numpy(np.concatenate(labels)))


def vision_tokens(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The tower's merged output [tokens, D]: the rows the decoder reads as image tokens."""
    out = visual(pixel_values.to(next(visual.parameters()).device), grid_thw=grid_thw)
    return out if isinstance(out, torch.Tensor) else out.pooler_output
