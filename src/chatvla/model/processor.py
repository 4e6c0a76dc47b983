"""Observation -> Qwen2-VL chat prompt: token ids with expanded image placeholders + pixel patches.

Uses transformers' PIL image processor (no torchvision needed) so pixel values are the ones a
Qwen2-VL checkpoint was trained on. Cameras are placed in the order of the robot profile, then the
instruction, as in the authors' robot prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from chatvla.model.config import ReasoningConfig
from chatvla.model.tokenizer import EOS_TOKEN, IMAGE_PAD, PAD_TOKEN, VISION_END, VISION_START

# Jinja chat template saved with checkpoints, equivalent to `PromptBuilder.prompt_text`.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class PreparedPrompt:
    """One observation, ready for the VLM. `prompt_text` keeps one image placeholder per image
    (what vLLM wants); `input_ids` has them expanded to the image's token count (what HF wants)."""

    prompt_text: str
    input_ids: list[int]
    pixel_values: torch.Tensor  # [num_patches, C * T * P * P]
    image_grid_thw: torch.Tensor  # [num_images, 3]
    images: list[np.ndarray]  # the camera images in prompt order (HxWx3 uint8)
    task: str


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, reasoning: ReasoningConfig, *, merge_size: int = 2,
                 patch_size: int = 14, temporal_patch_size: int = 2) -> None:
        self.tokenizer = tokenizer
        self.reasoning = reasoning
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=reasoning.min_pixels,
            max_pixels=reasoning.max_pixels,
            patch_size=patch_size,
            temporal_patch_size=temporal_patch_size,
            merge_size=merge_size,
        )
        self.merge_size = merge_size
        self.image_pad_id = self._id(IMAGE_PAD)
        self.eos_id = self._id(EOS_TOKEN)
        self.pad_id = self._id(PAD_TOKEN)

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer lacks {token}")
        return i

    def prompt_text(self, num_images: int, instruction: str) -> str:
        parts = []
        if self.reasoning.system_prompt:
            parts.append(f"<|im_start|>system\n{self.reasoning.system_prompt}<|im_end|>\n")
        images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
        parts.append(f"<|im_start|>user\n{images}{instruction}<|im_end|>\n<|im_start|>assistant\n")
        return "".join(parts)

    def prepare(self, images: Mapping[str, np.ndarray], camera_order: Sequence[str], instruction: str,
                task: str) -> PreparedPrompt:
        ordered = [np.ascontiguousarray(images[c]) for c in camera_order if c in images]
        text = self.prompt_text(len(ordered), instruction)
        feats = self.image_processor(images=ordered, return_tensors="pt")
        grid = feats["image_grid_thw"]
        per_image = [int(n) for n in (grid.prod(dim=1) // (self.merge_size**2)).tolist()]
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        expanded: list[int] = []
        k = 0
        for tok in ids:
            if tok == self.image_pad_id:
                expanded.extend([self.image_pad_id] * per_image[k])
                k += 1
            else:
                expanded.append(tok)
        if k != len(ordered):
            raise RuntimeError("image placeholders and images disagree")  # a bug, not bad input
        return PreparedPrompt(text, expanded, feats["pixel_values"], grid, ordered, task)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_reasoning(self, text: str) -> list[int]:
        """Token ids of a supplied reasoning text, completed the way the model ends its own: with the end
        marker. A text written by a person ("Pick card 49.") then gives the expert the same hidden rows
        as the model's own "Pick card 49. Next action:" would, instead of one token fewer."""
        marker = self.reasoning.end_marker
        text = text.strip()
        if marker and not text.endswith(marker):
            text = f"{text} {marker}" if text else marker
        return self.encode_text(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def reasoning_text(self, ids: Sequence[int]) -> str:
        """The displayable reasoning: special tokens and the end marker removed."""
        text = self.decode(ids).strip()
        marker = self.reasoning.end_marker
        if marker and text.endswith(marker):
            text = text[: -len(marker)].rstrip()
        return text
