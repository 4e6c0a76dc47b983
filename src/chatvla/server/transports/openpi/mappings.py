"""openpi observation keys -> our cameras and state.

openpi observations are dicts whose keys depend on the policy config (DROID: `observation/...`,
ALOHA: `state`, `images/cam_high`, ...). An `OpenpiMapping` says which key holds which of our cameras
and which keys, concatenated, make our state vector; presets cover DROID-style Franka and ALOHA-style
bimanual clients, and a YAML file (`--openpi-mapping FILE`) covers anything else (docs/openpi.md).
`apply_mapping` turns one decoded observation into our `ValidatedObservation`: it finds the mapped keys
and leaves the checks of images, state and instruction to `server/validation.py`, like every transport.

A mapping also says what a reply's `actions` hold (`ActionOutput`): our chunk as it is (robot units), or
DROID's action space (joint velocities + gripper closedness), because openpi's DROID client executes each
row as a velocity command and would drive a position chunk as if it were one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from chatvla.profiles import RobotProfile
from chatvla.server.messages import ValidatedObservation
from chatvla.server.validation import InputSpec, image_from_array, invalid, observation_from_arrays

PRESETS = ("droid", "aloha", "native")

# What a preset uses when neither the observation nor the connection has carried a prompt yet. openpi's
# ALOHA environments send no `prompt` at all (openpi injects a per-config default server-side), so without
# one the aloha preset would refuse every frame. `openpi_default_prompt` (settings) overrides these.
DEFAULT_PROMPTS: Mapping[str, str] = {
    "droid": "pick up the object",
    "aloha": "fold the towel",  # openpi's own ALOHA default (its pi0_aloha_towel config)
    "native": "pick up the object",
}

# DROID's action convention (droid-dataset/droid, robot_ik_solver.py and franka/robot.py): the client
# steps at 15 Hz, a joint velocity of 1.0 means 0.2 rad per step (3 rad/s, the client clips to [-1, 1]),
# and the gripper command is 0..1 with 1 = closed (width = max_width * (1 - command)). openpi's DROID
# example asserts a chunk of 10 rows and executes 8 of them before asking again.
DROID_RATE_HZ = 15.0
DROID_FULL_SCALE_RAD_S = 0.2 * DROID_RATE_HZ
DROID_HORIZON = 10

StateUnit = Literal["as_is", "closed_fraction"]
ActionKind = Literal["native", "droid"]


class MappingError(RuntimeError):
    """An openpi key mapping that cannot be used (bad file, or it does not fit the served profile)."""

def _path(raw: object, where: str) -> tuple[str, ...]:
    """A key path: a string ("." separates nesting levels, so `images.cam_high` is obs["images"]["cam_high"])
    or a list of keys."""
    if isinstance(raw, str):
        parts = tuple(raw.split("."))
    elif isinstance(raw, list | tuple) and all(isinstance(p, str) for p in raw):
        parts = tuple(raw)
    else:
        raise MappingError(f"{where}: a key must be a string or a list of strings, got {raw!r}")
    if not parts or not all(parts):
        raise MappingError(f"{where}: empty key in {raw!r}")
    return parts


def _key_name(path: Sequence[str]) -> str:
    return ".".join(path)


@dataclass(frozen=True)
class ImageKey:
    """Observation key `path` holds our camera `camera`. `layout`: how the array is laid out (`auto`
    takes HxWx3 or 3xHxW by where the 3 is)."""

    path: tuple[str, ...]
    camera: str
    layout: Literal["auto", "hwc", "chw"] = "auto"
    optional: bool = False


@dataclass(frozen=True)
class StateKey:
    """Observation key `path` holds `size` values (None: any) of our state vector, in mapping order.
    `unit`: `as_is` (robot units already) or `closed_fraction` (a gripper as 0..1, 1 = closed, as DROID
    reports it), converted to our gripper width in metres with the profile's maximum width."""

    path: tuple[str, ...]
    size: int | None = None
    unit: StateUnit = "as_is"


def _gripper_max(profile: RobotProfile, index: int) -> float:
    """The widest gripper opening (m) the profile allows at action/state `index`."""
    return float(profile.action_upper[index])


def _action_units(profile: RobotProfile) -> list[str]:
    """Per-dimension units of our own actions (`RobotProfile.action_units`), worded for openpi clients,
    which see no profile: the gripper's zero and what a unitless entry is."""
    gripper = set(profile.gripper_indices)
    return ["m (gripper width, 0 = closed)" if i in gripper else unit or "1 (rotation-matrix entry)"
            for i, unit in enumerate(profile.action_units)]


@dataclass(frozen=True)
class ActionOutput:
    """What a reply's `actions` hold. `native`: our chunk in robot units. `droid`: DROID's action space,
    so that openpi's DROID client can execute it: per joint a velocity in DROID's normalised unit
    (rad/s divided by `full_scale_rad_s`), then the gripper as 0..1 (1 = closed), resampled to the client's
    `rate_hz`. `horizon` keeps the first rows only (None: all)."""

    kind: ActionKind = "native"
    horizon: int | None = None
    rate_hz: float | None = None  # the client's control rate (None: the profile's)
    full_scale_rad_s: float = DROID_FULL_SCALE_RAD_S

    def check(self, profile: RobotProfile, where: str) -> None:
        """Raise MappingError unless this output can be computed from `profile`'s actions."""
        if self.kind == "droid" and (profile.action_space != "joint_position" or len(profile.gripper_indices) != 1):
            raise MappingError(f"{where}: droid actions need joint positions and one gripper; {profile.name} differs")
        if self.kind == "droid" and profile.state_names[: profile.action_dim] != profile.action_names:
            raise MappingError(f"{where}: droid actions need the state to start with the action values")
        if self.horizon is not None and self.horizon < 1:
            raise MappingError(f"{where}: actions.horizon must be positive")
        if (self.rate_hz is not None and self.rate_hz <= 0) or self.full_scale_rad_s <= 0:
            raise MappingError(f"{where}: actions.rate_hz and actions.full_scale_rad_s must be positive")

    def rate(self, profile: RobotProfile) -> float:
        return self.rate_hz or profile.control_rate_hz

    def rows(self, profile: RobotProfile) -> int:
        """Rows of every reply's `actions` (the metadata's `action_horizon`)."""
        n = profile.chunk_size
        if self.kind == "droid":  # chunk duration at the client's rate
            n = max(1, math.floor(profile.chunk_size * self.rate(profile) / profile.control_rate_hz + 1e-9))
        return n if self.horizon is None else min(n, self.horizon)

    def describe(self, profile: RobotProfile) -> dict[str, Any]:
        """Action space, names and units for the metadata frame."""
        if self.kind == "native":
            space, names, units = profile.action_space, list(profile.action_names), _action_units(profile)
        else:
            g = profile.gripper_indices[0]
            joints = [n for i, n in enumerate(profile.action_names) if i != g]
            space = "joint_velocity+gripper_position"
            names = [f"{n}_velocity" for n in joints] + [f"{profile.action_names[g]}_position"]
            units = [f"normalised joint velocity: 1.0 = {self.full_scale_rad_s:g} rad/s"] * len(joints) + [
                "0..1, 1 = closed"]
        return {"space": space, "names": names, "units": units, "horizon": self.rows(profile),
                "rate_hz": self.rate(profile)}

    def convert(self, actions: np.ndarray, state: np.ndarray, profile: RobotProfile) -> np.ndarray:
        """Our chunk (robot units, row i is where the robot should be at tick i + 1) and the observed
        state -> the reply's `actions`."""
        if self.kind == "native":
            return actions[: self.rows(profile)]
        g = profile.gripper_indices[0]
        joints = [i for i in range(profile.action_dim) if i != g]
        rate, ours = self.rate(profile), profile.control_rate_hz
        # position trajectory: the observed state at t = 0, then one chunk row per tick of our rate
        t = np.arange(actions.shape[0] + 1, dtype=np.float64) / ours
        traj = np.vstack([np.asarray(state, np.float64)[None, : profile.action_dim], actions.astype(np.float64)])
        k = np.arange(self.rows(profile) + 1, dtype=np.float64) / rate  # the client's ticks, from t = 0
        at = np.stack([np.interp(k, t, traj[:, j]) for j in range(profile.action_dim)], axis=1)
        velocity = np.diff(at[:, joints], axis=0) * rate / self.full_scale_rad_s
        closed = 1.0 - at[1:, g] / _gripper_max(profile, g)
        return np.concatenate([velocity, np.clip(closed, 0.0, 1.0)[:, None]], axis=1).astype(np.float32)


@dataclass(frozen=True)
class OpenpiMapping:
    """Which openpi observation keys make our observation. See docs/openpi.md for the YAML form."""

    name: str
    images: tuple[ImageKey, ...]
    state: tuple[StateKey, ...]
    prompt: tuple[str, ...] = ("prompt",)
    default_prompt: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    actions: ActionOutput = ActionOutput()

    def check(self, profile: RobotProfile) -> None:
        """Raise MappingError unless this mapping produces valid input for `profile`."""
        cams = profile.camera_names
        seen: set[str] = set()
        for im in self.images:
            if im.camera not in cams:
                raise MappingError(
                    f"openpi mapping {self.name!r}: camera {im.camera!r} is not one of profile "
                    f"{profile.name}'s cameras ({', '.join(cams)})"
                )
            if im.camera in seen:
                raise MappingError(f"openpi mapping {self.name!r}: camera {im.camera!r} is mapped twice")
            seen.add(im.camera)
        if not self.images:
            raise MappingError(f"openpi mapping {self.name!r}: maps no camera")
        if not self.state:
            raise MappingError(f"openpi mapping {self.name!r}: maps no state key")
        sizes = [s.size for s in self.state]
        if all(s is not None for s in sizes) and sum(sizes) != profile.state_dim:  # type: ignore[arg-type]
            raise MappingError(
                f"openpi mapping {self.name!r}: state keys add up to {sum(sizes)} values, "  # type: ignore[arg-type]
                f"profile {profile.name} has {profile.state_dim}"
            )
        offset: int | None = 0
        for s in self.state:
            if s.unit == "closed_fraction":
                where = f"openpi mapping {self.name!r}: state key {_key_name(s.path)!r}"
                if offset is None or s.size is None:
                    raise MappingError(f"{where}: a closed_fraction key and the keys before it need a `size`")
                bad = [i for i in range(offset, offset + s.size) if i not in profile.gripper_indices]
                if bad:
                    raise MappingError(f"{where}: closed_fraction values must land on gripper values of "
                                       f"profile {profile.name}, not {profile.state_names[bad[0]]!r}")
            offset = None if offset is None or s.size is None else offset + s.size
        self.actions.check(profile, f"openpi mapping {self.name!r}")

    @property
    def required_cameras(self) -> tuple[str, ...]:
        return tuple(im.camera for im in self.images if not im.optional)

    def describe(self) -> dict[str, Any]:
        """Plain-msgpack description for the metadata frame."""
        return {
            "name": self.name,
            "images": {_key_name(im.path): im.camera for im in self.images},
            "state": [_key_name(s.path) for s in self.state],
            "prompt": _key_name(self.prompt),
            "default_prompt": self.default_prompt,
            "actions": self.actions.kind,
        }


def preset(name: str, profile: RobotProfile) -> OpenpiMapping:
    """A built-in mapping for `profile`: `droid` (Franka, openpi's DROID keys), `aloha` (bimanual,
    openpi's ALOHA keys) or `native` (our own camera and state names)."""
    cams = profile.camera_names
    if name == "droid":
        if profile.state_dim != 8 or len(cams) < 2:
            raise MappingError(f"the droid mapping needs 7 joints + gripper and two cameras; {profile.name} differs")
        return OpenpiMapping(
            name="droid",
            images=(
                ImageKey(("observation/exterior_image_1_left",), cams[0]),
                ImageKey(("observation/wrist_image_left",), cams[1]),
            ),
            # DROID reports the gripper as 0..1 (1 = closed) and executes joint velocities (ActionOutput)
            state=(StateKey(("observation/joint_position",), 7),
                   StateKey(("observation/gripper_position",), 1, "closed_fraction")),
            default_prompt=DEFAULT_PROMPTS["droid"],
            actions=ActionOutput("droid", horizon=DROID_HORIZON, rate_hz=DROID_RATE_HZ),
        )
    if name == "aloha":
        if profile.state_dim != 14 or len(cams) < 3:
            raise MappingError(f"the aloha mapping needs 14 state values and three cameras; {profile.name} differs")
        # openpi ALOHA clients send images/{cam_high, cam_low, cam_left_wrist, cam_right_wrist} as 3xHxW;
        # the top camera is our first, the wrists our second and third; cam_low has no counterpart.
        return OpenpiMapping(
            name="aloha",
            images=(
                ImageKey(("images", "cam_high"), cams[0]),
                ImageKey(("images", "cam_left_wrist"), cams[1]),
                ImageKey(("images", "cam_right_wrist"), cams[2]),
            ),
            state=(StateKey(("state",), 14),),
            default_prompt=DEFAULT_PROMPTS["aloha"],
        )
    if name == "native":
        return OpenpiMapping(
            name="native",
            images=tuple(ImageKey(("images", c), c) for c in cams),
            state=(StateKey(("state",), profile.state_dim),),
            default_prompt=DEFAULT_PROMPTS["native"],
        )
    raise MappingError(f"unknown openpi mapping preset {name!r}; use one of {', '.join(PRESETS)} or a YAML file")


def default_preset(profile: RobotProfile) -> str:
    if profile.state_dim == 8 and len(profile.cameras) >= 2 and profile.action_space == "joint_position":
        return "droid"
    if profile.state_dim == 14 and len(profile.cameras) >= 3:
        return "aloha"
    return "native"


def mapping_from_dict(d: object, source: str) -> OpenpiMapping:
    """The YAML form: {name, images: [{key, camera, layout?, optional?}], state: [{key, size?, unit?}],
    prompt?, default_prompt?, metadata?, actions?: {kind, horizon?, rate_hz?, full_scale_rad_s?}}."""
    if not isinstance(d, dict):
        raise MappingError(f"{source}: top level must be a mapping")
    unknown = sorted(set(d) - {"name", "images", "state", "prompt", "default_prompt", "metadata", "actions"})
    if unknown:
        raise MappingError(f"{source}: unknown key {unknown[0]!r}")
    images_raw, state_raw = d.get("images"), d.get("state")
    if not isinstance(images_raw, list) or not isinstance(state_raw, list):
        raise MappingError(f"{source}: `images` and `state` must be lists")
    images = []
    for i, im in enumerate(images_raw):
        where = f"{source}: images[{i}]"
        if not isinstance(im, dict) or "key" not in im or "camera" not in im:
            raise MappingError(f"{where}: needs `key` and `camera`")
        layout = im.get("layout", "auto")
        if layout not in ("auto", "hwc", "chw"):
            raise MappingError(f"{where}: layout must be auto, hwc or chw")
        images.append(ImageKey(_path(im["key"], where), str(im["camera"]), layout, bool(im.get("optional", False))))
    state = []
    for i, s in enumerate(state_raw):
        where = f"{source}: state[{i}]"
        if isinstance(s, str | list):
            s = {"key": s}
        if not isinstance(s, dict) or "key" not in s:
            raise MappingError(f"{where}: needs `key`")
        size = s.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise MappingError(f"{where}: size must be a positive integer")
        unit = s.get("unit", "as_is")
        if unit not in ("as_is", "closed_fraction"):
            raise MappingError(f"{where}: unit must be as_is or closed_fraction")
        state.append(StateKey(_path(s["key"], where), size, unit))
    metadata = d.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise MappingError(f"{source}: metadata must be a mapping with string keys")
    default_prompt = d.get("default_prompt") or ""
    if not isinstance(default_prompt, str):
        raise MappingError(f"{source}: default_prompt must be a string")
    return OpenpiMapping(
        name=str(d.get("name") or Path(source).stem), images=tuple(images), state=tuple(state),
        prompt=_path(d.get("prompt", "prompt"), f"{source}: prompt"), default_prompt=default_prompt,
        metadata=metadata, actions=_actions_from_dict(d.get("actions"), source),
    )


def _actions_from_dict(raw: object, source: str) -> ActionOutput:
    """`actions: native` or `actions: {kind: droid, horizon: 10, rate_hz: 15, full_scale_rad_s: 3}`."""
    if raw is None:
        return ActionOutput()
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise MappingError(f"{source}: actions must be `native`, `droid` or a mapping")
    unknown = sorted(set(raw) - {"kind", "horizon", "rate_hz", "full_scale_rad_s"})
    if unknown:
        raise MappingError(f"{source}: actions: unknown key {unknown[0]!r}")
    kind = raw.get("kind", "native")
    if kind not in ("native", "droid"):
        raise MappingError(f"{source}: actions.kind must be native or droid")
    horizon = raw.get("horizon")
    if horizon is not None and (not isinstance(horizon, int) or isinstance(horizon, bool)):
        raise MappingError(f"{source}: actions.horizon must be an integer")
    numbers = {}
    for key in ("rate_hz", "full_scale_rad_s"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise MappingError(f"{source}: actions.{key} must be a number")
        numbers[key] = None if v is None else float(v)
    droid = kind == "droid"
    return ActionOutput(
        kind, horizon if horizon is not None or not droid else DROID_HORIZON,
        numbers["rate_hz"] if numbers["rate_hz"] is not None or not droid else DROID_RATE_HZ,
        numbers["full_scale_rad_s"] or DROID_FULL_SCALE_RAD_S,
    )


def load_mapping(spec: str | None, profile: RobotProfile) -> OpenpiMapping:
    """`spec`: None (the preset for the profile), a preset name, or a YAML file path."""
    if spec is None:
        m = preset(default_preset(profile), profile)
    elif spec in PRESETS:
        m = preset(spec, profile)
    else:
        path = Path(spec)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise MappingError(f"openpi mapping {spec}: {e}") from None
        m = mapping_from_dict(raw, str(path))
    m.check(profile)
    return m



# --- observation decoding ------------------------------------------------------------------------------------
_MISSING = object()


def _lookup(obs: Mapping[Any, Any], path: Sequence[str]) -> Any:
    cur: Any = obs
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return _MISSING
        cur = cur[key]
    return cur


def _state_part(value: Any, key: StateKey) -> np.ndarray:
    name = _key_name(key.path)
    if isinstance(value, np.ndarray | np.generic):
        a = np.asarray(value)
        if a.dtype.kind not in "biuf" or a.ndim > 1:
            raise invalid(name, f"must be a number or a 1-d numeric array, got {a.dtype} {list(a.shape)}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        a = np.asarray([value])
    elif isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        a = np.asarray(value, dtype=np.float64) if value else np.zeros(0)
    else:
        raise invalid(name, f"must be a number, a list of numbers or a numeric array, got {type(value).__name__}")
    a = a.reshape(-1)
    if key.size is not None and a.size != key.size:
        raise invalid(name, f"must have {key.size} values, got {a.size}")
    with np.errstate(over="ignore", invalid="ignore"):
        f = a.astype(np.float32)
    if not np.isfinite(f).all():
        raise invalid(name, "contains NaN or inf (or a value beyond float32)")
    return f


def apply_mapping(
    obs: Any, mapping: OpenpiMapping, spec: InputSpec, seq: int, session_instruction: str
) -> ValidatedObservation:
    """Validate one decoded openpi observation and map it to our observation (runs in the pool)."""
    if not isinstance(obs, dict):
        raise invalid("message", f"an observation must be a map, got {type(obs).__name__}")
    images: dict[str, np.ndarray] = {}
    for key in mapping.images:
        value = _lookup(obs, key.path)
        if value is _MISSING:
            if key.optional:
                continue
            raise invalid(_key_name(key.path), f"missing (camera {key.camera} of mapping {mapping.name!r})")
        images[key.camera] = image_from_array(value, _key_name(key.path), spec, key.layout)
    if not images:
        raise invalid("images", f"no mapped camera present (mapping {mapping.name!r})")
    parts = []
    value_fields: list[str] = []  # the caller's name for each state value: "observation/gripper_position[0]"
    offset = 0
    for key in mapping.state:
        value = _lookup(obs, key.path)
        if value is _MISSING:
            raise invalid(_key_name(key.path), f"missing (state of mapping {mapping.name!r})")
        part = _state_part(value, key)
        if key.unit == "closed_fraction":  # sizes known and on gripper values: OpenpiMapping.check
            widths = [_gripper_max(spec.profile, offset + i) for i in range(part.size)]
            part = (np.asarray(widths, np.float32) * (1.0 - np.clip(part, 0.0, 1.0))).astype(np.float32)
        offset += part.size
        parts.append(part)
        value_fields += [f"{_key_name(key.path)}[{j}]" for j in range(part.size)]
    state = np.concatenate(parts) if len(parts) > 1 else parts[0]
    state_field = "+".join(_key_name(k.path) for k in mapping.state)
    want = spec.profile.state_dim
    if state.shape != (want,):  # the keys' sizes are open in the mapping: say so in the mapping's terms
        raise invalid(state_field, f"the state keys hold {state.size} values; profile {spec.profile.name} needs {want}")
    raw = _lookup(obs, mapping.prompt)
    return observation_from_arrays(
        images, state, None if raw is _MISSING else raw, spec,
        state_field=state_field, state_value_fields=value_fields, instruction_field=_key_name(mapping.prompt),
        default_instruction=session_instruction or mapping.default_prompt, seq=seq, tick=seq,
    )
