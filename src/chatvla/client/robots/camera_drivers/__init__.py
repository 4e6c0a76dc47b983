"""Real camera drivers behind the `Camera` protocol of `chatvla.client.robots.cameras`.

- `threaded`: what every driver shares: a grab thread that keeps only the newest frame, and a `read()`
  that returns it at once or raises `CameraStalled` / `CameraError` (never a stale frame).
- `opencv`: USB/V4L2 devices (index or path) and video files, through OpenCV (`[camera]` extra).
- `realsense`: the colour stream of an Intel RealSense, through pyrealsense2 (`[realsense]` extra).
- `sources`: the `NAME=SOURCE[@WxH][@FPS]` camera specs of the command line, and opening them.

No module here imports OpenCV or pyrealsense2 at import time: a robot PC without cameras (or with only
one of the two) imports the client unchanged, and a missing extra is reported when a camera opens.
"""
