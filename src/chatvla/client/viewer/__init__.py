"""The episode viewer: an episode file as a video or a self-contained HTML page.

`chatvla inspect EP --video/--html` and `chatvla demo` use it. Split by job: `timeline` turns the
file's records into what is shown per tick, `frame` draws one tick as an image, `video` encodes frames
(imageio-ffmpeg, the `video` extra, imported only when a video is asked for) and `page` writes the HTML
viewer (pillow only, a core dependency).
"""

from __future__ import annotations

from chatvla.client.viewer.page import write_html
from chatvla.client.viewer.timeline import EpisodeView, build_view
from chatvla.client.viewer.video import VIDEO_EXTRA, video_available, write_video

__all__ = ["VIDEO_EXTRA", "EpisodeView", "build_view", "video_available", "write_html", "write_video"]
