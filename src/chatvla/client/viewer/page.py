"""An episode as one self-contained HTML page: a tick slider over every camera, per-joint plots of action
and state inside the profile's limits, start-up/stalled/safety marks and the reasoning timeline.

Self-contained means it opens from a file with no network: the images are inlined as JPEG data URIs and
the script and styles are inline (template.html next to this module; the data goes in as JSON). To stay
small for long episodes the images are re-encoded (JPEG, at most `max_side` pixels) and, past
`max_frames` ticks, only every Nth tick's images are kept (the page says so); the numbers (actions,
states, marks, reasoning) are kept for every tick.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from chatvla.client.recording import EncodedImage
from chatvla.client.viewer.timeline import EpisodeView

TEMPLATE = Path(__file__).with_name("template.html")
MAX_FRAMES = 150
MAX_SIDE = 256
JPEG_QUALITY = 70
_STATUS_CODE = {"ok": "o", "startup": "u", "stalled": "s"}


def _data_uri(img: EncodedImage, max_side: int, quality: int) -> str:
    pic = Image.fromarray(img.decode(), "RGB")
    pic.thumbnail((max_side, max_side), Image.BILINEAR)
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rows(a: np.ndarray) -> list[list[float | None]]:
    """JSON rows with 4 decimals (plenty for plots, a third of the size) and null for NaN."""
    return [[None if not math.isfinite(x) else round(float(x), 4) for x in row] for row in a]


def page_data(view: EpisodeView, *, max_frames: int = MAX_FRAMES, max_side: int = MAX_SIDE,
              quality: int = JPEG_QUALITY, title: str = "") -> dict[str, Any]:
    """Everything the page's script reads, as plain JSON data (images as data URIs, each distinct image
    stored once: a camera that sees the same thing for many ticks costs one image)."""
    n = len(view)
    step = max(1, math.ceil(n / max(1, max_frames)))
    samples = list(range(0, n, step))
    uris: list[str] = []
    index: dict[bytes, int] = {}  # same stored bytes (a camera that did not change) -> one data URI
    frames: dict[str, list[int]] = {}
    for cam in view.cameras:
        row = []
        for i in samples:
            img = view.images[i].get(cam)
            if img is None:
                row.append(-1)
                continue
            key = hashlib.sha1(img.data).digest()
            if key not in index:
                index[key] = len(uris)
                uris.append(_data_uri(img, max_side, quality))
            row.append(index[key])
        frames[cam] = row
    p = view.profile
    if step > 1:
        note = (f"{n} ticks; images of one tick in {step} ({len(samples)} frames) to keep the page small, "
                f"JPEG quality {quality}, at most {max_side} px. Plots and marks have every tick.")
    else:
        note = f"{n} ticks; images of every tick, JPEG quality {quality}, at most {max_side} px."
    return {
        "title": title,
        "instruction": view.instruction,
        "profile": {"name": p.name, "rate_hz": p.control_rate_hz, "names": list(p.action_names),
                    "lower": list(p.action_lower), "upper": list(p.action_upper)},
        "ticks": [int(t) for t in view.ticks],
        "seconds": [round(float(s), 3) for s in view.seconds],
        "action": _rows(view.actions),
        "state": _rows(view.states),
        "status": "".join(_STATUS_CODE[s] for s in view.statuses),
        "safety": [",".join(names) for names in view.interventions],
        "reasoning": [[i, text] for i, text in view.reasoning_changes],
        "reasoning_index": [int(k) for k in view.reasoning_index],
        "cameras": list(view.cameras),
        "frame_step": step,
        "frames": frames,
        "images": uris,
        "counts": view.counts.as_dict(),
        "closed_cleanly": view.closed_cleanly,
        "outcome": view.outcome,
        "note": note,
    }


def render_html(view: EpisodeView, *, title: str = "", **kw: Any) -> str:
    """The page as a string; `kw` goes to `page_data` (max_frames, max_side, quality)."""
    data = page_data(view, title=title, **kw)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # cannot end the script tag
    page = TEMPLATE.read_text(encoding="utf-8")
    page = page.replace("{{TITLE}}", html.escape(title or f"episode ({view.profile.name})"))
    page = page.replace("{{SUMMARY}}", html.escape(summary_line(view)))
    page = page.replace("{{NOTE}}", html.escape(data["note"]))
    return page.replace("{{DATA}}", payload)  # last: the data may contain anything


def summary_line(view: EpisodeView) -> str:
    """The counts at the top of the page, in the words `chatvla inspect` and `chatvla demo` print."""
    p, c = view.profile, view.counts
    outcome = json.dumps(dict(view.outcome), sort_keys=True) if view.outcome is not None else "-"
    return (f"{p.name}, {len(view)} ticks at {p.control_rate_hz:g} Hz, cameras {', '.join(view.cameras) or '-'}; "
            f"{c.stalled_ticks} stalled ticks, {c.startup_ticks} start-up ticks, "
            f"{c.safety_clamped_ticks} safety-clamped ticks; outcome {outcome}"
            + ("" if view.closed_cleanly else " (file NOT closed cleanly: the writer crashed or is still running)"))


def write_html(view: EpisodeView, path: str | os.PathLike[str], *, title: str = "", **kw: Any) -> int:
    """Write the page; returns its size in bytes."""
    text = render_html(view, title=title, **kw)
    Path(path).write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))
