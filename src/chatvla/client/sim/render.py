"""Offscreen rendering of a rig's profile cameras, and a cheap probe for whether rendering works here.

`mujoco.Renderer` owns one GL context; creating it is the step that fails on a machine without a
working EGL/OSMesa stack, so `rendering_available()` tries exactly that once, on a tiny model, and
caches the answer (tests use it to skip cleanly instead of erroring).

Every GL call of the process goes through one lock (`GL_LOCK`): several simulated robots on threads of
one process (`chatvla eval --robots 3`) each own a context, and Mesa's software rasteriser has twice
killed such a process with a general-protection fault inside `swrast_dri.so` while they rendered at
once. A render takes about 3 ms, so taking turns costs a few robots nothing they would notice.
"""

from __future__ import annotations

import functools
import threading

import mujoco
import numpy as np

from chatvla.profiles import CameraSpec

GL_LOCK = threading.RLock()


def scene_option() -> mujoco.MjvOption:
    """Show scene (0) and robot visual (2) geoms; hide collision proxies (3), sites and joints."""
    opt = mujoco.MjvOption()
    opt.geomgroup[:] = 0
    opt.geomgroup[0] = opt.geomgroup[1] = opt.geomgroup[2] = 1
    opt.sitegroup[:] = 0
    return opt


class CameraRig:
    """Renders a fixed list of (profile camera, scene camera) pairs. One renderer per image size."""

    def __init__(self, model: mujoco.MjModel, cameras: dict[CameraSpec, str]) -> None:
        self._cameras = cameras
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        with GL_LOCK:
            for spec in cameras:
                key = (spec.height, spec.width)
                if key not in self._renderers:
                    self._renderers[key] = mujoco.Renderer(model, spec.height, spec.width)
        self._option = scene_option()

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        """camera name -> HxWx3 uint8 (a fresh array per call: callers may keep it)."""
        images = {}
        with GL_LOCK:
            for spec, scene_cam in self._cameras.items():
                renderer = self._renderers[(spec.height, spec.width)]
                renderer.update_scene(data, camera=scene_cam, scene_option=self._option)
                images[spec.name] = renderer.render()
        return images

    def close(self) -> None:
        with GL_LOCK:
            for renderer in self._renderers.values():
                renderer.close()
            self._renderers.clear()


def project(model: mujoco.MjModel, data: mujoco.MjData, camera: str, points: np.ndarray, height: int,
            width: int) -> np.ndarray:
    """World points [N, 3] -> [N, 2] pixel (column, row) in the `height` x `width` image that `CameraRig`
    renders from scene camera `camera` (row 0 at the top; a pixel's centre at +0.5), for labelling what
    an image shows where. Points behind the camera come out as NaN. MuJoCo's camera looks along its -z
    axis with +y up; `fovy` spans the image height."""
    cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cid < 0:
        raise KeyError(f"no camera {camera!r} in the scene")
    rot = data.cam_xmat[cid].reshape(3, 3)
    local = (np.asarray(points, np.float64).reshape(-1, 3) - data.cam_xpos[cid]) @ rot  # camera frame
    depth = -local[:, 2]
    f = (height / 2) / np.tan(np.deg2rad(model.cam_fovy[cid]) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        col = width / 2 + f * local[:, 0] / depth
        row = height / 2 - f * local[:, 1] / depth
    out = np.stack([col, row], axis=1)
    out[depth <= 0] = np.nan
    return out


@functools.lru_cache(maxsize=1)
def rendering_available() -> tuple[bool, str]:
    """(True, backend) if an offscreen GL context can be made, else (False, the error)."""
    import os

    try:
        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='.1'/></worldbody></mujoco>")
        with GL_LOCK:
            renderer = mujoco.Renderer(model, 8, 8)
            renderer.update_scene(mujoco.MjData(model))
            renderer.render()
            renderer.close()
    except Exception as exc:  # any GL platform failure means "no rendering here"
        return False, f"{type(exc).__name__}: {exc}"
    return True, os.environ.get("MUJOCO_GL", "default")
