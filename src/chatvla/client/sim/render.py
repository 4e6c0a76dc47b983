"""Offscreen rendering of a rig's profile cameras, and a cheap probe for whether rendering works here.

`mujoco.Renderer` owns one GL context; creating it is the step that fails on a machine without a
working EGL/OSMesa stack, so `rendering_available()` tries exactly that once, on a tiny model, and
caches the answer (tests use it to skip cleanly instead of erroring).
"""

from __future__ import annotations

import functools

import mujoco
import numpy as np

from chatvla.profiles import CameraSpec


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
        for spec in cameras:
            key = (spec.height, spec.width)
            if key not in self._renderers:
                self._renderers[key] = mujoco.Renderer(model, spec.height, spec.width)
        self._option = scene_option()

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        """camera name -> HxWx3 uint8 (a fresh array per call: callers may keep it)."""
        images = {}
        for spec, scene_cam in self._cameras.items():
            renderer = self._renderers[(spec.height, spec.width)]
            renderer.update_scene(data, camera=scene_cam, scene_option=self._option)
            images[spec.name] = renderer.render()
        return images

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()


@functools.lru_cache(maxsize=1)
def rendering_available() -> tuple[bool, str]:
    """(True, backend) if an offscreen GL context can be made, else (False, the error)."""
    import os

    try:
        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='.1'/></worldbody></mujoco>")
        renderer = mujoco.Renderer(model, 8, 8)
        renderer.update_scene(mujoco.MjData(model))
        renderer.render()
        renderer.close()
    except Exception as exc:  # any GL platform failure means "no rendering here"
        return False, f"{type(exc).__name__}: {exc}"
    return True, os.environ.get("MUJOCO_GL", "default")
