"""openpi observation keys -> our cameras and state.

openpi observations are dicts whose keys depend on the policy config (DROID: `observation/...`,
ALOHA: `state`, `images/cam_high`, ...). An `OpenpiMapping` says which key holds which of our cameras
and which keys, concatenated, make our state vector; presets cover DROID-style Franka and ALOHA-style
bimanual clients, and a YAML file (`--openpi-mapping FILE`) covers anything else (docs/openpi.md).
`apply_mapping` turns one decoded observation into our `ObservationRequest`: it finds the mapped keys
and leaves the checks of images, state and instruction to `server/validation.py`, like every transport.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from chatvla.profiles import RobotProfile
from chatvla.server.messages import ObservationRequest
from chatvla.server.validation import InputSpec, image_from_array, invalid, observation_from_arrays

PRESETS = ("droid", "aloha", "native")


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
    """Observation key `path` holds `size` values (None: any) of our state vector, in mapping order."""

    path: tuple[str, ...]
    size: int | None = None


@dataclass(frozen=True)
class OpenpiMapping:
    """Which openpi observation keys make our observation. See docs/openpi.md for the YAML form."""

    name: str
    images: tuple[ImageKey, ...]
    state: tuple[StateKey, ...]
    prompt: tuple[str, ...] = ("prompt",)
    default_prompt: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

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
            state=(StateKey(("observation/joint_position",), 7), StateKey(("observation/gripper_position",), 1)),
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
        )
    if name == "native":
        return OpenpiMapping(
            name="native",
            images=tuple(ImageKey(("images", c), c) for c in cams),
            state=(StateKey(("state",), profile.state_dim),),
        )
    raise MappingError(f"unknown openpi mapping preset {name!r}; use one of {', '.join(PRESETS)} or a YAML file")


def default_preset(profile: RobotProfile) -> str:
    if profile.state_dim == 8 and len(profile.cameras) >= 2 and profile.action_space == "joint_position":
        return "droid"
    if profile.state_dim == 14 and len(profile.cameras) >= 3:
        return "aloha"
    return "native"


def mapping_from_dict(d: object, source: str) -> OpenpiMapping:
    """The YAML form: {name, images: [{key, camera, layout?, optional?}], state: [{key, size?}],
    prompt?, default_prompt?, metadata?}."""
    if not isinstance(d, dict):
        raise MappingError(f"{source}: top level must be a mapping")
    unknown = sorted(set(d) - {"name", "images", "state", "prompt", "default_prompt", "metadata"})
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
        state.append(StateKey(_path(s["key"], where), size))
    metadata = d.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise MappingError(f"{source}: metadata must be a mapping with string keys")
    default_prompt = d.get("default_prompt") or ""
    if not isinstance(default_prompt, str):
        raise MappingError(f"{source}: default_prompt must be a string")
    return OpenpiMapping(
        name=str(d.get("name") or Path(source).stem), images=tuple(images), state=tuple(state),
        prompt=_path(d.get("prompt", "prompt"), f"{source}: prompt"), default_prompt=default_prompt,
        metadata=metadata,
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
) -> ObservationRequest:
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
    for key in mapping.state:
        value = _lookup(obs, key.path)
        if value is _MISSING:
            raise invalid(_key_name(key.path), f"missing (state of mapping {mapping.name!r})")
        parts.append(_state_part(value, key))
    state = np.concatenate(parts) if len(parts) > 1 else parts[0]
    state_field = "+".join(_key_name(k.path) for k in mapping.state)
    want = spec.profile.state_dim
    if state.shape != (want,):  # the keys' sizes are open in the mapping: say so in the mapping's terms
        raise invalid(state_field, f"the state keys hold {state.size} values; profile {spec.profile.name} needs {want}")
    raw = _lookup(obs, mapping.prompt)
    return observation_from_arrays(
        images, state, None if raw is _MISSING else raw, spec,
        state_field=state_field, instruction_field=_key_name(mapping.prompt),
        default_instruction=session_instruction or mapping.default_prompt, seq=seq, tick=seq,
    )
