"""An episode as an MP4 video: one frame per recorded tick at the profile's control rate, so it plays in
real time (gaps in the tick numbers, ticks the loop skipped, are not padded).

Encoded by imageio-ffmpeg (the `video` extra), which ships its own ffmpeg binary in the wheel: no system
ffmpeg and no hand-written encoder. It is imported only here and only when a video is written, so the
robot-side core install works without it; `chatvla inspect --video` without it prints the extra to
install (chatvla.cli.main.OPTIONAL_MODULES).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from chatvla.client.viewer.frame import FrameRenderer
from chatvla.client.viewer.timeline import EpisodeView

VIDEO_EXTRA = "video"
VIDEO_MODULE = "imageio_ffmpeg"


def video_available() -> bool:
    """Whether the encoder is installed (without importing it)."""
    return importlib.util.find_spec(VIDEO_MODULE) is not None


def require_encoder() -> None:
    """Import the encoder now, so a missing extra fails before any work (raises ModuleNotFoundError
    naming `imageio_ffmpeg`, which the CLI turns into a one-line install hint)."""
    import imageio_ffmpeg  # noqa: F401


def write_video(view: EpisodeView, path: str | os.PathLike[str], *, fps: float | None = None,
                quality: int = 6) -> int:
    """Write every tick of `view` as one H.264 frame; returns the number of frames written.
    `quality` is imageio-ffmpeg's 0..10 scale (higher is better and larger)."""
    import imageio_ffmpeg

    if len(view) == 0:
        raise ValueError("the episode has no ticks: nothing to show")
    renderer = FrameRenderer(view)
    rate = float(fps or view.profile.control_rate_hz)
    out = Path(path)
    writer = imageio_ffmpeg.write_frames(
        str(out), (renderer.width, renderer.height), fps=rate, quality=quality, macro_block_size=16,
        output_params=["-movflags", "+faststart"],
    )
    writer.send(None)  # start the generator (and the ffmpeg process)
    frames = 0
    try:
        for i in range(len(view)):
            writer.send(renderer.render(i))
            frames += 1
    finally:
        writer.close()
    return frames
