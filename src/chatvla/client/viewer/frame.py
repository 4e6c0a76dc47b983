"""One tick of an episode drawn as an image: every camera side by side over a panel with the tick, its
marks (start-up, stalled, safety interventions), the reasoning in effect and one bar per joint that
places the action and the state inside the profile's limits.

Drawn with pillow (a core dependency) so the frames cost no optional install; only encoding them into a
video needs the `video` extra. Every frame of an episode has the same size, a multiple of 16 in both
directions, which is what H.264 encoders want.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from chatvla.client.recording import EncodedImage
from chatvla.client.tick_counts import STALLED, STARTUP, is_clamped
from chatvla.client.viewer.timeline import EpisodeView

TILE_HEIGHT = 240
MIN_WIDTH = 720
LINE = 18
BAR_ROW = 20
REASONING_LINES = 3
BG, FG, DIM = (24, 24, 28), (235, 235, 235), (140, 140, 150)
ACTION_RGB, STATE_RGB = (80, 160, 255), (255, 170, 60)
STALL_RGB, STARTUP_RGB, SAFETY_RGB = (230, 60, 60), (150, 150, 150), (255, 140, 0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1: the bitmap font, fixed size
        return ImageFont.load_default()


def _round16(x: int) -> int:
    return -(-x // 16) * 16


class FrameRenderer:
    """Renders the frames of one episode view; decoded camera tiles are cached per image, so a camera
    recorded every Nth tick is decoded once, not N times."""

    def __init__(self, view: EpisodeView, *, tile_height: int = TILE_HEIGHT) -> None:
        self.view = view
        self.tile_height = tile_height
        self.font = _font(14)
        self.small = _font(12)
        self._tiles: dict[str, tuple[EncodedImage | None, Image.Image]] = {}
        self._tile_w = {c: self._tile_width(c) for c in view.cameras}
        tiles_w = sum(self._tile_w.values())
        self.width = _round16(max(MIN_WIDTH, tiles_w))
        d = view.profile.action_dim
        self._cols = 2 if d > 4 else 1
        rows = -(-d // self._cols)
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        self._label_w = 10 + max((probe.textlength(n, font=self.small) for n in view.profile.action_names), default=0)
        self._panel_top = tile_height if view.cameras else 0
        panel_h = 8 + LINE * (2 + REASONING_LINES) + 6 + BAR_ROW * rows + 18  # + the legend line
        self.height = _round16(self._panel_top + panel_h)

    def _tile_width(self, camera: str) -> int:
        first = next((imgs[camera] for imgs in self.view.images if imgs.get(camera) is not None), None)
        if first is None:
            return self.tile_height
        return max(16, round(first.width * self.tile_height / max(1, first.height)))

    def _tile(self, camera: str, img: EncodedImage | None) -> Image.Image:
        cached = self._tiles.get(camera)
        if cached is not None and cached[0] is img:
            return cached[1]
        size = (self._tile_w[camera], self.tile_height)
        if img is None:
            tile = Image.new("RGB", size, (60, 60, 60))
            ImageDraw.Draw(tile).text((8, size[1] // 2), "no image yet", fill=FG, font=self.small)
        else:
            tile = Image.fromarray(img.decode(), "RGB").resize(size, Image.BILINEAR)
        self._tiles[camera] = (img, tile)
        return tile

    def render(self, i: int) -> np.ndarray:
        """The frame of tick index i as an HxWx3 uint8 array."""
        v = self.view
        im = Image.new("RGB", (self.width, self.height), BG)
        draw = ImageDraw.Draw(im)
        x = 0
        for cam in v.cameras:
            im.paste(self._tile(cam, v.images[i].get(cam)), (x, 0))
            tw = draw.textlength(cam, font=self.small)
            draw.rectangle((x, 0, x + tw + 8, 16), fill=(0, 0, 0))
            draw.text((x + 4, 1), cam, fill=FG, font=self.small)
            x += self._tile_w[cam]
        y = self._panel_top + 8
        y = self._header(draw, i, y)
        y = self._reasoning(draw, i, y)
        self._bars(draw, i, y + 6)
        return np.asarray(im, dtype=np.uint8)

    def _header(self, draw: ImageDraw.ImageDraw, i: int, y: int) -> int:
        v = self.view
        head = f"tick {int(v.ticks[i])}  ({i + 1}/{len(v)})  {v.seconds[i]:.2f} s"
        draw.text((8, y), head, fill=FG, font=self.font)
        x = 16 + draw.textlength(head, font=self.font)
        marks: list[tuple[str, tuple[int, int, int]]] = []
        if v.statuses[i] == STALLED:
            marks.append(("STALLED: held, no action", STALL_RGB))
        elif v.statuses[i] == STARTUP:
            marks.append(("START-UP: waiting for the first chunk", STARTUP_RGB))
        if is_clamped(v.interventions[i]):
            marks.append(("SAFETY: " + ", ".join(n for n in v.interventions[i]), SAFETY_RGB))
        for text, rgb in marks:
            w = draw.textlength(text, font=self.small)
            draw.rectangle((x, y, x + w + 10, y + LINE - 2), fill=rgb)
            draw.text((x + 5, y + 2), text, fill=(0, 0, 0), font=self.small)
            x += w + 18
        draw.text((8, y + LINE), f"instruction: {v.instruction}"[:160], fill=DIM, font=self.small)
        return y + 2 * LINE

    def _reasoning(self, draw: ImageDraw.ImageDraw, i: int, y: int) -> int:
        text = " ".join(self.view.reasoning_at(i).split()) or "-"
        chars = max(20, int((self.width - 16) / 7))
        lines = textwrap.wrap("reasoning: " + text, chars) or [""]
        if len(lines) > REASONING_LINES:
            lines = [*lines[: REASONING_LINES - 1], lines[REASONING_LINES - 1][: chars - 3] + "..."]
        for k, line in enumerate(lines):
            draw.text((8, y + k * LINE), line, fill=FG, font=self.small)
        return y + REASONING_LINES * LINE

    def _bars(self, draw: ImageDraw.ImageDraw, i: int, y: int) -> None:
        v, p = self.view, self.view.profile
        col_w = (self.width - 8) // self._cols
        rows = -(-p.action_dim // self._cols)
        label_w, num_w = self._label_w, 150
        for j, name in enumerate(p.action_names):
            cx = 8 + (j // rows) * col_w
            cy = y + (j % rows) * BAR_ROW
            lo, hi = p.action_lower[j], p.action_upper[j]
            x0, x1 = cx + label_w, cx + col_w - num_w - 8
            draw.text((cx, cy + 2), name, fill=FG, font=self.small)
            draw.rectangle((x0, cy + 5, x1, cy + 13), outline=DIM, fill=(45, 45, 52))
            a, s = v.actions[i, j], v.states[i, j]
            for val, rgb, half in ((s, STATE_RGB, 7), (a, ACTION_RGB, 5)):
                if np.isfinite(val):
                    frac = 0.0 if hi <= lo else float(np.clip((val - lo) / (hi - lo), 0.0, 1.0))
                    px = x0 + frac * (x1 - x0)
                    draw.rectangle((px - 1, cy + 9 - half, px + 1, cy + 9 + half), fill=rgb)
            nums = f"a {a:+.3f}" if np.isfinite(a) else "a    -  "
            nums += f"  s {s:+.3f}" if np.isfinite(s) else ""
            draw.text((x1 + 8, cy + 2), nums, fill=FG, font=self.small)
        draw.text((8, y + rows * BAR_ROW), "bars: profile limits; blue = action sent, orange = measured state",
                      fill=DIM, font=self.small)
