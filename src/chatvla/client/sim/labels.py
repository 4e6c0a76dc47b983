"""Text images for card faces and the whiteboard, drawn with PIL at run time.

Why PIL's built-in bitmap font: it ships inside Pillow, needs no font file, and renders the same
pixels on every machine, so a task built from a seed looks the same everywhere (the model's inputs
and the recorded episodes stay reproducible). The 6x11 glyphs are scaled up with nearest-neighbour
resampling, which keeps them crisp at the 224x224 camera resolution.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

INK = (20, 20, 20)
PAPER = (245, 245, 240)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1: always the bitmap font
    return loader() if loader is not None else ImageFont.load_default()


def _glyphs(text: str) -> Image.Image:
    """The text at the font's native size, cropped to its ink."""
    font = _font()
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 255)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, font=font, fill=0)
    ink = Image.eval(img, lambda v: 255 - v).getbbox() or (0, 0, img.width, img.height)
    return img.crop(ink)


def text_image(
    text: str,
    width: int,
    height: int,
    *,
    margin: float = 0.15,
    ink: tuple[int, int, int] = INK,
    paper: tuple[int, int, int] = PAPER,
) -> np.ndarray:
    """`text` centred on a `height` x `width` RGB uint8 canvas, scaled by an integer factor to fill it
    (minus `margin` on each side)."""
    glyphs = _glyphs(text)
    avail_w, avail_h = width * (1 - 2 * margin), height * (1 - 2 * margin)
    scale = max(1, int(min(avail_w / glyphs.width, avail_h / glyphs.height)))
    glyphs = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.NEAREST)
    mask = np.asarray(glyphs) < 128
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = paper
    y0, x0 = (height - mask.shape[0]) // 2, (width - mask.shape[1]) // 2
    canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = ink
    return canvas


def card_face(number: int, width: int = 48, height: int = 64) -> np.ndarray:
    """Texture for a card's top face. MuJoCo maps a box's texture columns to its +x and rows
    (top to bottom) to -y; the card lies with +x pointing away from the robot, so the digits are drawn
    rotated a quarter turn to read upright from the robot's side and from its cameras."""
    upright = text_image(str(number), height, width, margin=0.12)
    return np.ascontiguousarray(np.rot90(upright, k=-1))


def board_face(text: str, width: int = 192, height: int = 128) -> np.ndarray:
    """Texture for the whiteboard (drawn upright; the scene turns the board to face the robot)."""
    return text_image(text, width, height, margin=0.1, paper=(250, 250, 250), ink=(30, 40, 160))
