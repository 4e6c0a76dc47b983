"""Assemble a MuJoCo model from a rig and a task with MjSpec.

Rendering cost decides most choices here: on the CPU-only machines the project runs on (llvmpipe),
shadows and triangles are what a frame costs, so shadows and anti-aliasing are off, the robots use
the decimated meshes, and everything else is a primitive. Geom groups: 0 = scene (visible, colliding),
2 = robot visuals, 3 = robot collision proxies (hidden; the renderer shows groups 0-2 only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mujoco
import numpy as np

from chatvla.client.sim import labels
from chatvla.client.sim.rigs import Rig, WorldCamera
from chatvla.client.sim.tasks.base import FixtureSpec, ObjectSpec, Task

FLOOR_Z = -0.75
BOARD_TILT = math.radians(12)  # the whiteboard leans back a little, like one on an easel
_GEOM = {
    "box": mujoco.mjtGeom.mjGEOM_BOX,
    "sphere": mujoco.mjtGeom.mjGEOM_SPHERE,
    "cylinder": mujoco.mjtGeom.mjGEOM_CYLINDER,
    "capsule": mujoco.mjtGeom.mjGEOM_CAPSULE,
    "ellipsoid": mujoco.mjtGeom.mjGEOM_ELLIPSOID,
}


def yaw_quat(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def look_at_xyaxes(pos: Sequence[float], target: Sequence[float], up: Sequence[float]) -> list[float]:
    """MuJoCo camera axes (image right, image up) for a camera at `pos` looking at `target`."""
    forward = np.asarray(target, float) - np.asarray(pos, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, float))
    right /= np.linalg.norm(right)
    return [*right.tolist(), *np.cross(right, forward).tolist()]


def _mat_quat(mat: np.ndarray) -> list[float]:
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.ascontiguousarray(mat, dtype=float).ravel())
    return quat.tolist()


def _texture_material(spec: mujoco.MjSpec, name: str, image: np.ndarray) -> str:
    tex = spec.add_texture(
        name=name, type=mujoco.mjtTexture.mjTEXTURE_2D, width=image.shape[1], height=image.shape[0], nchannel=3
    )
    tex.data = np.ascontiguousarray(image, np.uint8).tobytes()
    mat = spec.add_material(name=name, specular=0.1, shininess=0.1)
    mat.textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = name
    return name


def _setup(spec: mujoco.MjSpec, rig: Rig) -> None:
    spec.modelname = rig.name
    spec.option.timestep = rig.timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC  # with impratio, grasps slip far less
    spec.option.impratio = 10
    q = spec.visual.quality
    q.shadowsize, q.offsamples = 0, 0
    spec.visual.headlight.ambient = [0.4, 0.4, 0.4]
    spec.visual.headlight.diffuse = [0.5, 0.5, 0.5]
    spec.visual.headlight.specular = [0.1, 0.1, 0.1]


def _room(spec: mujoco.MjSpec, rig: Rig) -> None:
    world = spec.worldbody
    # A plain box, not a textured plane: MuJoCo draws planes as a fine grid of textured quads, which
    # cost more than the whole robot on a software rasteriser.
    world.add_geom(
        name="floor",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[3, 3, 0.01],
        pos=[0, 0, FLOOR_Z - 0.01],
        rgba=[0.3, 0.32, 0.34, 1],
    )
    cx, cy = rig.table_center
    hx, hy = rig.table_half
    world.add_geom(
        name="table",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[hx, hy, 0.02],
        pos=[cx, cy, -0.02],
        rgba=[0.72, 0.6, 0.45, 1],
        friction=[1.0, 0.005, 0.0001],
    )
    for sx in (-1, 1):
        for sy in (-1, 1):
            world.add_geom(
                type=mujoco.mjtGeom.mjGEOM_BOX,
                size=[0.03, 0.03, (-FLOOR_Z - 0.04) / 2],
                pos=[cx + sx * (hx - 0.05), cy + sy * (hy - 0.05), (FLOOR_Z - 0.04) / 2],
                rgba=[0.4, 0.33, 0.25, 1],
                contype=0,
                conaffinity=0,
            )
    world.add_light(
        name="sun",
        pos=[0.4, 0.0, 2.0],
        dir=[-0.2, 0.0, -1.0],
        castshadow=0,
        type=mujoco.mjtLightType.mjLIGHT_DIRECTIONAL,
        diffuse=[0.45, 0.45, 0.45],
        specular=[0.1, 0.1, 0.1],
    )


def _arms(spec: mujoco.MjSpec, rig: Rig) -> None:
    path = rig.arm_xml_path()
    for mount in rig.mounts:
        arm = mujoco.MjSpec.from_file(str(path))
        frame = spec.worldbody.add_frame(pos=list(mount.pos), quat=yaw_quat(mount.yaw))
        frame.attach_body(arm.body("base"), mount.prefix, "")


def _camera(spec: mujoco.MjSpec, cam: WorldCamera) -> None:
    c = spec.worldbody.add_camera(name=cam.name, pos=list(cam.pos), fovy=cam.fovy)
    c.alt.type = mujoco.mjtOrientation.mjORIENTATION_XYAXES
    c.alt.xyaxes = look_at_xyaxes(cam.pos, cam.target, cam.up)


def _object(spec: mujoco.MjSpec, obj: ObjectSpec, origin: tuple[float, float]) -> None:
    body = spec.worldbody.add_body(
        name=obj.name, pos=[origin[0] + obj.xy[0], origin[1] + obj.xy[1], obj.rest_z], quat=yaw_quat(obj.yaw)
    )
    body.add_freejoint(name=obj.name)
    round_ = obj.shape in ("sphere", "ellipsoid", "capsule")
    geom = body.add_geom(
        name=obj.name,
        type=_GEOM[obj.shape],
        size=list(obj.size) + [0.0] * (3 - len(obj.size)),
        mass=obj.mass,
        condim=6 if round_ else 4,
        friction=[1.0, 0.01, 0.002],
    )
    if obj.label is not None:
        geom.material = _texture_material(spec, f"{obj.name}_face", labels.card_face(obj.label))
    else:
        geom.rgba = list(obj.rgba)


def _fixture(spec: mujoco.MjSpec, fix: FixtureSpec, origin: tuple[float, float]) -> None:
    x, y = origin[0] + fix.xy[0], origin[1] + fix.xy[1]
    hx, hy = fix.half_size
    if fix.kind == "zone":
        spec.worldbody.add_geom(
            name=fix.name,
            type=mujoco.mjtGeom.mjGEOM_BOX,
            size=[hx, hy, 0.0005],
            pos=[x, y, 0.0005],
            rgba=list(fix.rgba),
            contype=0,
            conaffinity=0,
        )
        return
    # Whiteboard: the textured face is the box's local +z; turn it to face the robot (-x) with the
    # text's up along world +z, then lean it back.
    face_robot = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    c, s = math.cos(BOARD_TILT), math.sin(BOARD_TILT)
    lean = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    bottom = 0.05
    body = spec.worldbody.add_body(name=fix.name, pos=[x, y, bottom + hy * c], quat=_mat_quat(lean @ face_robot))
    image = labels.board_face(fix.text)
    body.add_geom(
        name=fix.name,
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[hx, hy, 0.004],
        contype=0,
        conaffinity=0,
        material=_texture_material(spec, f"{fix.name}_face", image),
    )
    body.add_geom(
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[hx + 0.012, hy + 0.012, 0.004],
        pos=[0, 0, -0.005],
        rgba=[0.25, 0.25, 0.28, 1],
        contype=0,
        conaffinity=0,
    )
    spec.worldbody.add_geom(
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[0.05, hx * 0.8, bottom / 2],
        pos=[x + 0.03, y, bottom / 2],
        rgba=[0.25, 0.25, 0.28, 1],
        contype=0,
        conaffinity=0,
    )


def build_spec(rig: Rig, task: Task | None = None) -> mujoco.MjSpec:
    """The scene as an editable spec (compile it with `.compile()`)."""
    spec = mujoco.MjSpec()
    _setup(spec, rig)
    _room(spec, rig)
    _arms(spec, rig)
    for cam in rig.world_cameras:
        _camera(spec, cam)
    if task is not None:
        for fix in task.fixtures:
            _fixture(spec, fix, rig.task_origin)
        for obj in task.objects:
            _object(spec, obj, rig.task_origin)
    return spec


def build_model(rig: Rig, task: Task | None = None) -> mujoco.MjModel:
    return build_spec(rig, task).compile()
