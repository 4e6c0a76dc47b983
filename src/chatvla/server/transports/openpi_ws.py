"""An openpi-compatible websocket endpoint, so robot stacks built on `openpi-client` can use this server
unchanged (`WebsocketClientPolicy(host, port, api_key)`).

The protocol is openpi's (docs/openpi.md has the full description):

* one websocket per robot, any path; `GET /healthz` without an upgrade answers `200 OK\\n`;
* the server speaks first: one binary frame with the msgpack metadata map;
* then strict alternation: the client sends one binary msgpack observation, the server answers one
  binary msgpack map `{"actions": ndarray[H, D] float32, "policy_timing": {...}, "server_timing": {...}}`,
  plus the reasoning text under `"reasoning"`;
* numpy arrays travel as maps with *bytes* keys `__ndarray__`, `data`, `dtype`, `shape` (numpy scalars
  as `__npgeneric__`, `data`, `dtype`); object, void and complex dtypes are refused;
* any error is one *text* frame with the message, then a close with code 1011;
* when tokens are configured, the upgrade needs `Authorization: Api-Key <token>` (401 otherwise).

openpi observations are dicts whose keys depend on the policy config (DROID: `observation/...`,
ALOHA: `state`, `images/cam_high`, ...). An `OpenpiMapping` says which key holds which of our cameras
and which keys, concatenated, make our state vector; presets cover DROID-style Franka and ALOHA-style
bimanual clients, and a YAML file (`--openpi-mapping FILE`) covers anything else.

Each connection is one pipeline session (transport label `openpi_ws`), so it gets the dual-rate
reasoning cache and the fairness of a gRPC Stream. Everything that crosses the wire is validated and
decoded in the preprocessing pool, never on the event loop, and nothing is ever unpickled: arrays are
built from an allow-listed dtype, a shape and bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import math
import re
import ssl
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgpack
import numpy as np
import yaml
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

import chatvla
from chatvla.engines.base import EngineInfo, EngineObservation
from chatvla.profiles import RobotProfile
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ChunkResult, ObservationRequest, SessionConfig
from chatvla.server.state import ServerState
from chatvla.server.validation import InputSpec, check_instruction, check_state_values, invalid
from chatvla.wire import Limits, WireError
from chatvla.wire.codec import check_image_size, decode_image_bytes

log = logging.getLogger("chatvla.server.openpi")

TRANSPORT = "openpi_ws"
ERROR_CLOSE_REASON = "Internal server error. Error message included in previous frame."
REASONING_KEY = "reasoning"
PRESETS = ("droid", "aloha", "native")
_MAX_NDIM = 8
_MAX_KEY_CHARS = 64


class MappingError(RuntimeError):
    """An openpi key mapping that cannot be used (bad file, or it does not fit the served profile)."""


# --- openpi's msgpack-numpy encoding ----------------------------------------------------------------------
# A dtype string as numpy's `dtype.str` writes it: byte order, kind, item size. Only booleans, integers
# and floats: object ("O"), void ("V"), complex ("c"), strings and datetimes are refused, so decoding
# can never build anything but a plain numeric array.
_DTYPE_RE = re.compile(r"^[<>|=]?[biuf][1248]$")


def _dtype(value: object, field: str) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not _DTYPE_RE.match(value):
        raise invalid(field, f"unsupported dtype {str(value)[:16]!r}; send bool, integer or float arrays")
    dt = np.dtype(value)
    if dt.kind not in "biuf":  # belt and braces: the pattern already allows only these kinds
        raise invalid(field, f"unsupported dtype {dt}")
    return dt


def _get(obj: Mapping[Any, Any], key: bytes) -> Any:
    return obj[key] if key in obj else obj.get(key.decode())


def decode_ndarray(obj: Mapping[Any, Any], field: str = "array") -> np.ndarray:
    """An openpi ndarray map -> a read-only array viewing the message bytes (validated)."""
    dt = _dtype(_get(obj, b"dtype"), field)
    shape = _get(obj, b"shape")
    data = _get(obj, b"data")
    if not isinstance(shape, list | tuple) or len(shape) > _MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise invalid(field, f"shape must be a list of at most {_MAX_NDIM} non-negative integers")
    if not isinstance(data, bytes):
        raise invalid(field, "array data must be bytes")
    n = math.prod(shape)
    if len(data) != n * dt.itemsize:
        raise invalid(field, f"{len(data)} bytes do not match shape {list(shape)} of {dt.str}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _object_hook(obj: dict[Any, Any]) -> Any:
    if _get(obj, b"__ndarray__") is True:
        return decode_ndarray(obj)
    if _get(obj, b"__npgeneric__") is True:
        dt = _dtype(_get(obj, b"dtype"), "scalar")
        data = _get(obj, b"data")
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise invalid("scalar", "numpy scalar data must be a number")
        try:
            with np.errstate(over="raise"):  # float16 1e10: refused, not silently inf
                return dt.type(data)
        except (OverflowError, ValueError, TypeError, FloatingPointError):  # e.g. uint8 300: not representable
            raise invalid("scalar", f"numpy scalar value does not fit its dtype {dt.str}") from None
    return obj


def _ext_hook(code: int, data: bytes) -> Any:
    raise invalid("message", f"msgpack extension type {code} is not accepted")


def unpack_message(data: bytes, limits: Limits) -> Any:
    """Decode one client frame with openpi's numpy encoding. Raises INVALID_ARGUMENT."""
    if len(data) > limits.max_message_bytes:
        raise invalid("message", f"{len(data)} bytes exceed the limit of {limits.max_message_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_hook=_object_hook, ext_hook=_ext_hook,
            max_str_len=1 << 20, max_array_len=1 << 16, max_map_len=1 << 12,
        )
    except ServeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # ExtraData, FormatError, StackError...
        raise invalid("message", f"not a valid msgpack message: {type(e).__name__}: {e}") from None


def _pack_default(obj: object) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        a = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str, b"shape": list(a.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send scalars of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__}")


def pack_message(obj: object) -> bytes:
    """Encode a server frame with openpi's numpy encoding (readable by `openpi_client.msgpack_numpy`)."""
    return msgpack.packb(obj, use_bin_type=True, default=_pack_default)


# --- key mapping --------------------------------------------------------------------------------------------
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


def _image(value: Any, key: ImageKey, spec: InputSpec) -> np.ndarray:
    name = _key_name(key.path)
    limits = spec.limits
    if isinstance(value, bytes):  # extension: an encoded JPEG/PNG file instead of pixels
        try:
            arr = decode_image_bytes(value, field=name, limits=limits)
            check_image_size(name, arr.shape[0], arr.shape[1], limits)
            return arr
        except WireError as e:
            raise invalid(e.field, e.message) from None
    if not isinstance(value, np.ndarray):
        raise invalid(name, f"must be a uint8 image array (HxWx3 or 3xHxW), got {type(value).__name__}")
    a = value
    if a.ndim != 3:
        raise invalid(name, f"must be HxWx3 or 3xHxW, got shape {list(a.shape)}")
    layout = key.layout
    if layout == "auto":
        layout = "hwc" if a.shape[2] == 3 else "chw" if a.shape[0] == 3 else "?"
    chw = layout == "chw" and a.shape[0] == 3
    if chw:
        a = a.transpose(1, 2, 0)
    elif layout != "hwc" or a.shape[2] != 3:
        raise invalid(name, f"must be HxWx3 or 3xHxW ({key.layout}), got shape {list(a.shape)}")
    h, w = a.shape[:2]
    if h == 0 or w == 0:
        raise invalid(name, "empty image")
    try:
        check_image_size(name, h, w, limits)
    except WireError as e:
        raise invalid(e.field, e.message) from None
    if a.dtype == np.uint8:  # one copy: the input views the message bytes (read-only)
        if chw:  # channel by channel: ~10x faster than numpy's generic strided copy of the transpose
            out = np.empty((h, w, 3), np.uint8)
            for c in range(3):
                out[:, :, c] = a[:, :, c]
            return out
        return np.array(a, dtype=np.uint8, order="C", copy=True)
    if a.dtype.kind == "f":  # openpi's own input transforms accept float images in [0, 1]
        f = a.astype(np.float32)
        if not np.isfinite(f).all():
            raise invalid(name, "contains NaN or inf")
        return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise invalid(name, f"images must be uint8 (or float in [0, 1]), got {a.dtype}")


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


def observation_from_openpi(
    data: bytes, mapping: OpenpiMapping, spec: InputSpec, seq: int, session_instruction: str
) -> ObservationRequest:
    """Validate one openpi observation frame and map it to our observation (runs in the pool)."""
    obs = unpack_message(data, spec.limits)
    if not isinstance(obs, dict):
        raise invalid("message", f"an observation must be a map, got {type(obs).__name__}")
    images: dict[str, np.ndarray] = {}
    for key in mapping.images:
        value = _lookup(obs, key.path)
        if value is _MISSING:
            if key.optional:
                continue
            raise invalid(_key_name(key.path), f"missing (camera {key.camera} of mapping {mapping.name!r})")
        images[key.camera] = _image(value, key, spec)
    if not images:
        raise invalid("images", f"no mapped camera present (mapping {mapping.name!r})")
    parts = []
    for key in mapping.state:
        value = _lookup(obs, key.path)
        if value is _MISSING:
            raise invalid(_key_name(key.path), f"missing (state of mapping {mapping.name!r})")
        parts.append(_state_part(value, key))
    state = np.concatenate(parts) if len(parts) > 1 else parts[0]
    want = spec.profile.state_dim
    if state.shape != (want,):
        raise invalid(
            "+".join(_key_name(k.path) for k in mapping.state),
            f"the state keys hold {state.size} values; profile {spec.profile.name} needs {want}",
        )
    check_state_values(state, "+".join(_key_name(k.path) for k in mapping.state), spec.limits)
    prompt_field = _key_name(mapping.prompt)
    raw = _lookup(obs, mapping.prompt)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(prompt_field, "is not valid UTF-8") from None
    if raw is _MISSING or raw is None or (isinstance(raw, str) and not raw.strip()):
        raw = session_instruction or mapping.default_prompt
        if not raw:
            raise invalid(prompt_field, "required (the language instruction)")
    instruction = check_instruction(raw, prompt_field, spec.limits, required=True)
    return ObservationRequest(
        obs=EngineObservation(images=images, state=state, instruction=instruction), seq=seq, tick=seq,
    )


# --- responses --------------------------------------------------------------------------------------------------
def response_message(r: ChunkResult, prev_total_ms: float | None) -> dict[str, Any]:
    t = r.timings
    compute = t.preprocess_ms + t.reasoning_ms + t.expert_ms
    server_timing: dict[str, float] = {
        "infer_ms": float(t.total_ms),
        "queue_ms": float(t.queue_ms), "preprocess_ms": float(t.preprocess_ms),
        "reasoning_ms": float(t.reasoning_ms), "expert_ms": float(t.expert_ms), "total_ms": float(t.total_ms),
        "reasoning_batch_size": int(t.reasoning_batch_size), "expert_batch_size": int(t.expert_batch_size),
    }
    if prev_total_ms is not None:
        server_timing["prev_total_ms"] = float(prev_total_ms)
    return {
        "actions": np.ascontiguousarray(r.actions, dtype=np.float32),
        "policy_timing": {"infer_ms": float(compute)},
        "server_timing": server_timing,
        REASONING_KEY: r.reasoning,
        "reasoning_refreshed": bool(r.reasoning_refreshed),
    }


def error_text(e: ServeError) -> str:
    return f"{e.code.name}: {e}"


# --- the server -----------------------------------------------------------------------------------------------
def api_key(headers: Headers) -> str | None:
    """The token of `Authorization: Api-Key <token>` (openpi-client); `Bearer <token>` is accepted too."""
    values = headers.get_all("Authorization")
    if len(values) != 1:  # none, or ambiguous: two Authorization headers authenticate nobody
        return None
    value = values[0]
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() in ("api-key", "bearer") else None


class OpenpiEndpoint:
    """Serves openpi's protocol on top of the shared pipeline."""

    def __init__(self, state: ServerState, mapping_spec: str | None) -> None:
        self.state = state
        self.mapping_spec = mapping_spec
        self.mapping: OpenpiMapping | None = None
        self.metadata: dict[str, Any] = {}
        # connection -> robot name from its token, from the handshake until the handler takes it
        self._robots: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        self._connections: set[ServerConnection] = set()

    def bind(self, info: EngineInfo) -> None:
        """Resolve the key mapping for the model's profile (raises MappingError) and build the metadata."""
        mapping = load_mapping(self.mapping_spec, info.profile)
        p = info.profile
        self.metadata = {
            "server": "chatvla-serve",
            "server_version": chatvla.__version__,
            "model_id": info.model_id,
            "engine": info.engine,
            "robot_profile": p.name,
            "action_horizon": p.chunk_size,
            "action_dim": p.action_dim,
            "action_names": list(p.action_names),
            "state_dim": p.state_dim,
            "control_rate_hz": p.control_rate_hz,
            "cameras": list(p.camera_names),
            "mapping": mapping.describe(),
            "reasoning_key": REASONING_KEY,
            **dict(mapping.metadata),
        }
        self.mapping = mapping
        log.info("openpi endpoint: mapping %s for profile %s", mapping.name, p.name)

    # The opening handshake: probes, readiness and auth, before any websocket exists.
    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.state.tokens is not None:
            robot = self.state.robot_for(api_key(request.headers))
            if robot is None:
                self.state.refuse(TRANSPORT, ServeError(Code.UNAUTHENTICATED, "missing or invalid API key"))
                response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or invalid API key\n")
                response.headers["WWW-Authenticate"] = "Api-Key"
                return response
            self._robots[connection] = robot
        try:
            self.state.require()
            if self.mapping is None:
                raise ServeError(Code.UNAVAILABLE, "model is loading", reason="not_ready")
        except ServeError as e:
            self._robots.pop(connection, None)
            self.state.refuse(TRANSPORT, e)
            response = connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"{e.message}\n")
            response.headers["Retry-After"] = "1"
            return response
        return None

    async def handler(self, ws: ServerConnection) -> None:
        robot = self._robots.pop(ws, "")
        self._connections.add(ws)
        session = None
        pipeline = self.state.pipeline
        try:
            assert pipeline is not None and self.mapping is not None  # process_request checked both
            await ws.send(pack_message(self.metadata))
            mapping, spec = self.mapping, pipeline.spec
            replies: asyncio.Queue = asyncio.Queue()
            seq = 0
            prev_total_ms: float | None = None
            while True:
                message = await ws.recv()
                t0 = time.monotonic()
                seq += 1
                if isinstance(message, str):
                    raise ServeError(Code.INVALID_ARGUMENT, "expected a binary msgpack frame, got text", "message")
                if session is None:
                    pipeline = self.state.require()
                    session = pipeline.open_session(
                        SessionConfig(
                            cameras=mapping.required_cameras, instruction=mapping.default_prompt,
                            robot_id=robot, reasoning=self.state.reasoning,
                        ),
                        lambda s, r: replies.put_nowait((s, r)), robot, TRANSPORT,
                    )
                await pipeline.submit(
                    session, seq,
                    lambda instr, m=message, n=seq: observation_from_openpi(m, mapping, spec, n, instr),
                )
                while True:  # strict alternation: exactly one observation of this session is in flight
                    answered, result = await replies.get()
                    if answered == seq:
                        break
                if isinstance(result, ServeError):  # the pipeline has counted it
                    await self._fail(ws, error_text(result))
                    return
                await ws.send(pack_message(response_message(result, prev_total_ms)))
                prev_total_ms = (time.monotonic() - t0) * 1e3
        except ConnectionClosed:
            pass
        except ServeError as e:  # refused before the pipeline saw the observation
            if e.reason == "sessions_limit":  # the pipeline counted the rejection, not the request
                self.state.metrics.requests.labels(transport=TRANSPORT, outcome=e.outcome).inc()
            else:
                self.state.refuse(TRANSPORT, e)
            await self._fail(ws, error_text(e))
        except Exception as e:
            log.exception("openpi connection from %s failed", ws.remote_address)
            await self._fail(ws, f"INTERNAL: {type(e).__name__}: {e}")
        finally:
            self._connections.discard(ws)
            if session is not None and pipeline is not None:
                pipeline.close_session(session)

    @staticmethod
    async def _fail(ws: ServerConnection, text: str) -> None:
        """openpi's error convention: the message as one text frame, then close with 1011."""
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)
            await ws.close(CloseCode.INTERNAL_ERROR, ERROR_CLOSE_REASON)

    @property
    def connections(self) -> int:
        return len(self._connections)


@dataclass
class OpenpiServer:
    server: Server
    endpoint: OpenpiEndpoint
    port: int

    def bind(self, info: EngineInfo) -> None:
        self.endpoint.bind(info)

    async def stop(self) -> None:
        """Close the listener and every connection (1001, going away); robots reconnect elsewhere."""
        self.server.close(close_connections=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 10)


async def start_openpi(
    state: ServerState, host: str, port: int, *, mapping: str | None = None, tls: tuple[Path, Path] | None = None
) -> OpenpiServer:
    """Bind (port 0 = OS picks) and serve until `stop()`. `tls` is (certificate, key) paths (wss://).
    A mapping *file* is read here so a typo fails start-up at once; it is checked against the model's
    profile in `bind`, once the engine is known."""
    if mapping is not None and mapping not in PRESETS and not Path(mapping).is_file():
        raise MappingError(f"openpi mapping {mapping!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    endpoint = OpenpiEndpoint(state, mapping)
    ssl_ctx = None
    if tls is not None:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(str(tls[0]), str(tls[1]))
    server = await serve(
        endpoint.handler, host, port, process_request=endpoint.process_request,
        compression=None, max_size=state.limits.max_message_bytes, server_header="chatvla-serve",
        ssl=ssl_ctx,
    )
    sock = next(iter(server.sockets))
    return OpenpiServer(server=server, endpoint=endpoint, port=sock.getsockname()[1])
