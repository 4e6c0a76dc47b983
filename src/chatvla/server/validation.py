"""Turn untrusted input (protobuf, JSON/multipart, or the arrays of a decoded openpi msgpack frame) into
validated pipeline requests.

Every field is checked before anything is trusted, and every refusal is a `ServeError` with code
INVALID_ARGUMENT that names the field in the caller's own vocabulary ("observation.state" on a
Stream, "state" on Infer and HTTP). Image pixels are decoded here, so callers run these functions
in the preprocessing thread pool, never on the event loop. Nothing here can unpickle: tensors are
raw little-endian bytes, images go through PIL's JPEG/PNG decoders only.

Decoded images and states are read-only arrays: an RGB8 image or a state is a view of the one copy
of its bytes that reading the protobuf field makes, not a second copy. Engines only read them; one
that needs to write must copy first. (Images from openpi arrays are the one exception: copies of their own.)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from chatvla.engines.base import EngineObservation, StateStats
from chatvla.profiles import RobotProfile
from chatvla.server.errors import Code, ServeError
from chatvla.server.messages import ReasoningPolicy, SessionConfig, ValidatedObservation
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import Limits, WireError, decode_image, tensor_from_proto
from chatvla.wire.codec import check_image_size, decode_image_bytes

MAX_DEADLINE_MS = 600_000
_MAX_NAME_CHARS = 64  # camera names, robot ids: echoed in messages, so bounded
_JSON_KEYS = frozenset({"images", "state", "instruction", "seed", "deadline_ms", "reasoning", "tick"})
# Chat-template control tokens (`<|im_end|>`, `<|image_pad|>`, ...: the Qwen2 special tokens, and the
# same `<|name|>` shape any other chat template uses). Supplied reasoning is tokenized (the tokenizer
# recognises special tokens inside text) and pre-filled after the prompt, so such a token would end the
# turn early or add an image placeholder without an image, which fails the whole reasoning batch for
# every robot in it.
# Refusing the `<|...|>` shape outright is simpler and safer than mirroring one tokenizer's list.
_CONTROL_TOKEN = re.compile(r"<\|[^|]*\|>")


@dataclass(frozen=True)
class StateBounds:
    """The interval each state value must lie in, and why (for the refusal message).

    Two rules, intersected per index (docs/security.md, "State limits"):
    * the robot profile's limits (`action_lower/upper`, when state and action share units: joint and
      end-effector profiles) widened by `Limits.state_margin` of each range on both sides: a real arm
      reads at most a little past its limits, so a value beyond that is a wrong unit (degrees for
      radians, millimetres for metres, a 0..1 gripper on a metres profile), a sensor fault or hostile;
    * the checkpoint's state statistics: at most `Limits.max_state_sigma` standard deviations from the
      training mean, with each std floored at 1% of the profile range (a joint that never moved in the
      training data must not make every ordinary reading of it "50 sigma"). The expert sees
      (x - mean) / std; far beyond anything in training its chunk is not worth sending to a robot.
    If the two rules leave no room for an index (stats that do not fit the profile), the profile's wins.
    """

    lower: np.ndarray  # float64 [state_dim]
    upper: np.ndarray
    why: tuple[str, ...]  # per index: which rule set the bound

    @classmethod
    def build(cls, profile: RobotProfile, limits: Limits, stats: StateStats | None) -> StateBounds:
        d = profile.state_dim
        lo = np.full(d, -limits.max_state_abs, np.float64)
        hi = np.full(d, limits.max_state_abs, np.float64)
        why = [f"within +-{limits.max_state_abs:g}"] * d
        span = np.zeros(d, np.float64)
        if profile.state_dim == profile.action_dim:
            pl, pu = np.asarray(profile.action_lower, np.float64), np.asarray(profile.action_upper, np.float64)
            span = pu - pl
            lo, hi = np.maximum(lo, pl - limits.state_margin * span), np.minimum(hi, pu + limits.state_margin * span)
            why = [f"the {profile.name} profile's limits for {n} widened by {limits.state_margin:.0%} of the range"
                   for n in profile.state_names]
        if stats is not None and len(stats.mean) == d and len(stats.std) == d:
            mean = np.asarray(stats.mean, np.float64)
            std = np.maximum(np.asarray(stats.std, np.float64), np.maximum(0.01 * span, 1e-6))
            k = limits.max_state_sigma
            s_lo, s_hi = mean - k * std, mean + k * std
            for i in range(d):
                n_lo, n_hi = max(lo[i], s_lo[i]), min(hi[i], s_hi[i])
                if n_lo > n_hi:  # the stats do not fit the profile: keep the profile's bound
                    continue
                if (n_lo, n_hi) != (lo[i], hi[i]):
                    name = profile.state_names[i]
                    why[i] = f"{k:g} standard deviations of the checkpoint's state statistics for {name}"
                lo[i], hi[i] = n_lo, n_hi
        return cls(lo, hi, tuple(why))

    def check(self, arr: np.ndarray, field: str, value_fields: Sequence[str] | None = None) -> None:
        """Refuse the first value outside its interval, naming its index (or `value_fields[i]`, the
        caller's own name for value i); `arr` is finite already."""
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero((arr < self.lower) | (arr > self.upper))
        if bad.size:
            i = int(bad[0])
            where = value_fields[i] if value_fields else f"{field}[{i}]"
            raise invalid(where, f"{float(arr[i]):.6g} is outside [{self.lower[i]:.4g}, {self.upper[i]:.4g}] "
                                 f"({self.why[i]}); check the units")


@dataclass(frozen=True)
class InputSpec:
    """What the hosted model accepts: its profile (dims, cameras), the wire limits and, when the engine
    has them, the state statistics of its checkpoint."""

    profile: RobotProfile
    limits: Limits
    state_stats: StateStats | None = None

    @cached_property
    def state_bounds(self) -> StateBounds:
        return StateBounds.build(self.profile, self.limits, self.state_stats)


def invalid(field: str, message: str) -> ServeError:
    return ServeError(Code.INVALID_ARGUMENT, message, field)


def _name(raw: str) -> str:
    return raw if len(raw) <= _MAX_NAME_CHARS else raw[:_MAX_NAME_CHARS] + "…"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_instruction(text: str, field: str, limits: Limits, *, required: bool) -> str:
    """An instruction is non-empty (when required), bounded, and free of control characters."""
    if not isinstance(text, str):
        raise invalid(field, "must be a string")
    text = text.strip()
    if not text:
        if required:
            raise invalid(field, "must not be empty")
        return ""
    if len(text) > limits.max_instruction_chars:
        raise invalid(field, f"{len(text)} characters exceed the limit of {limits.max_instruction_chars}")
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise invalid(field, "contains control characters")
    _refuse_control_tokens(text, field)
    return text


def _refuse_control_tokens(text: str, field: str) -> None:
    """User text is plain text: a chat-template control token in it is refused (see _CONTROL_TOKEN)."""
    token = _CONTROL_TOKEN.search(text)
    if token is not None:
        raise invalid(field, f"contains the chat-template control token {_name(token.group())!r}; send plain text")


def check_state_values(arr: np.ndarray, field: str, spec: InputSpec,
                       value_fields: Sequence[str] | None = None) -> np.ndarray:
    """Every state value finite and within +-limits.max_state_abs (robot units), then each within its
    `StateBounds` interval (the one place every transport's state passes). A state assembled from
    several caller fields (openpi's joint and gripper keys) passes `value_fields`, one name per value,
    so a refusal names the key the caller sent rather than the concatenation."""
    limits = spec.limits
    names = value_fields if value_fields and len(value_fields) == arr.size else None
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~(np.abs(arr) <= limits.max_state_abs))  # NaN compares false: caught too
    if bad.size:
        where = names[int(bad[0])] if names else field
        raise invalid(where, f"every value must be finite and within +-{limits.max_state_abs:g} (robot units)")
    if arr.shape == (spec.profile.state_dim,):
        spec.state_bounds.check(arr, field, names)
    return arr


def check_deadline(ms: int, field: str) -> int:
    if ms < 0 or ms > MAX_DEADLINE_MS:
        raise invalid(field, f"must be between 0 and {MAX_DEADLINE_MS} ms")
    return int(ms)


def _check_cameras(names: Sequence[str], field: str, spec: InputSpec, wanted: Sequence[str] | None) -> None:
    known = spec.profile.camera_names
    if len(names) > spec.limits.max_images:
        raise invalid(field, f"{len(names)} images exceed the limit of {spec.limits.max_images}")
    if not names:
        raise invalid(field, "at least one image is required")
    seen: set[str] = set()
    for cam in names:
        cf = f"{field}[{_name(cam)}]"
        if cam not in known:
            raise invalid(cf, f"unknown camera; this model knows {', '.join(known)}")
        if wanted is not None and cam not in wanted:
            raise invalid(cf, f"camera not declared at session start ({', '.join(wanted)})")
        if cam in seen:
            raise invalid(cf, "camera sent twice")
        seen.add(cam)
    if wanted is not None:
        missing = [c for c in wanted if c not in seen]
        if missing:
            raise invalid(f"{field}[{missing[0]}]", "missing; every camera declared at session start is required")


def decode_proto_images(
    images: Sequence[pb.Image], field: str, spec: InputSpec, wanted: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    _check_cameras([im.camera for im in images], field, spec, wanted)
    out: dict[str, np.ndarray] = {}
    for im in images:
        cf = f"{field}[{_name(im.camera)}]"
        try:
            out[im.camera] = arr = decode_image(im, field=cf, limits=spec.limits, copy=False)
            check_image_size(cf, arr.shape[0], arr.shape[1], spec.limits)
        except WireError as e:
            raise invalid(e.field, e.message) from None
    return out


def decode_proto_state(t: pb.Tensor, field: str, spec: InputSpec, present: bool) -> np.ndarray:
    if not present:
        raise invalid(field, f"required: float32 [{spec.profile.state_dim}]")
    try:
        arr = tensor_from_proto(
            t, field=field, dtype=np.float32, shape=(spec.profile.state_dim,),
            max_elements=spec.limits.max_state_dim, copy=False,
        )
    except WireError as e:
        raise invalid(e.field, e.message) from None
    return check_state_values(arr, field, spec)


def session_from_proto(start: pb.SessionStart, spec: InputSpec, defaults: ReasoningPolicy) -> SessionConfig:
    """Validate the first message of a Stream. Field names are prefixed with "start."."""
    p = spec.profile
    if start.robot_profile and start.robot_profile != p.name:
        raise invalid("start.robot_profile", f"{_name(start.robot_profile)!r} is not served here; use {p.name!r}")
    cams = tuple(start.cameras) or p.camera_names
    _check_cameras(list(cams), "start.cameras", spec, None)
    instruction = check_instruction(start.instruction, "start.instruction", spec.limits, required=True)
    if not math.isfinite(start.control_rate_hz) or start.control_rate_hz < 0:
        raise invalid("start.control_rate_hz", "must be a finite, non-negative rate")
    every_s = start.reasoning.every_seconds
    if not math.isfinite(every_s) or every_s < 0:
        raise invalid("start.reasoning.every_seconds", "must be finite and >= 0")
    policy = ReasoningPolicy(
        every_n=int(start.reasoning.every_n) or defaults.every_n,
        every_seconds=float(every_s) or defaults.every_seconds,
    )
    if len(start.robot_id) > _MAX_NAME_CHARS:
        raise invalid("start.robot_id", f"longer than {_MAX_NAME_CHARS} characters")
    return SessionConfig(
        cameras=cams,
        instruction=instruction,
        robot_id=start.robot_id,
        reasoning=policy,
        default_deadline_ms=check_deadline(start.default_deadline_ms, "start.default_deadline_ms"),
        control_rate_hz=float(start.control_rate_hz),
        max_in_flight=int(start.max_in_flight),  # 0 = server default; the scheduler caps it at its setting
    )


def observation_from_proto(
    obs: pb.Observation, spec: InputSpec, cameras: Sequence[str], session_instruction: str
) -> ValidatedObservation:
    """Validate a Stream observation; an empty instruction keeps the session's, an empty
    reasoning lets the session's policy decide between decoding and its cached text."""
    instruction = check_instruction(obs.instruction, "observation.instruction", spec.limits, required=False)
    deadline = check_deadline(obs.deadline_ms, "observation.deadline_ms")
    reasoning = check_reasoning(obs.reasoning, "observation.reasoning", spec.limits) if obs.reasoning else None
    state = decode_proto_state(obs.state, "observation.state", spec, obs.HasField("state"))
    images = decode_proto_images(obs.images, "observation.images", spec, cameras)
    return ValidatedObservation(
        obs=EngineObservation(images=images, state=state, instruction=instruction or session_instruction),
        seq=int(obs.seq), tick=int(obs.tick), seed=int(obs.seed), deadline_ms=deadline,
        force_reasoning=bool(obs.force_reasoning), reasoning=reasoning,
    )


def infer_from_proto(req: pb.InferRequest, spec: InputSpec) -> ValidatedObservation:
    """Validate a unary Infer request (stateless: instruction required, any subset of cameras)."""
    if req.robot_profile and req.robot_profile != spec.profile.name:
        raise invalid("robot_profile", f"{_name(req.robot_profile)!r} is not served here; use {spec.profile.name!r}")
    instruction = check_instruction(req.instruction, "instruction", spec.limits, required=True)
    deadline = check_deadline(req.deadline_ms, "deadline_ms")
    reasoning = check_reasoning(req.reasoning, "reasoning", spec.limits) if req.reasoning else None
    state = decode_proto_state(req.state, "state", spec, req.HasField("state"))
    images = decode_proto_images(req.images, "images", spec)
    return ValidatedObservation(
        obs=EngineObservation(images=images, state=state, instruction=instruction),
        tick=int(req.tick), seed=int(req.seed), deadline_ms=deadline, reasoning=reasoning,
    )


def check_reasoning(text: str, field: str, limits: Limits) -> str:
    """Supplied reasoning text (Infer, HTTP, a Stream observation's override) is pre-filled into the
    model as-is, so it is bounded and must be plain text: no chat-template control tokens."""
    if not isinstance(text, str):
        raise invalid(field, "must be a string")
    # Reasoning may be longer than an instruction; bound it by the same order of magnitude.
    if len(text) > 8 * limits.max_instruction_chars:
        raise invalid(field, f"longer than {8 * limits.max_instruction_chars} characters")
    _refuse_control_tokens(text, field)
    return text


# --- HTTP (JSON / multipart) ---------------------------------------------------------------------


def _b64_image(value: Any, field: str, spec: InputSpec) -> np.ndarray:
    if not isinstance(value, str):
        raise invalid(field, "must be a base64 string of a PNG or JPEG file")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) * 3 // 4 > spec.limits.max_image_bytes + 3:
        raise invalid(field, f"image exceeds the limit of {spec.limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is not valid base64") from None
    return _image_bytes(raw, field, spec)


def _image_bytes(raw: bytes, field: str, spec: InputSpec, *, copy: bool = False) -> np.ndarray:
    try:
        arr = decode_image_bytes(raw, field=field, limits=spec.limits, copy=copy)
        check_image_size(field, arr.shape[0], arr.shape[1], spec.limits)
        return arr
    except WireError as e:
        raise invalid(e.field, e.message) from None


def _state_list(value: Any, spec: InputSpec) -> np.ndarray:
    d = spec.profile.state_dim
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise invalid("state", f"must be a list of {d} numbers")
    if len(value) != d:
        raise invalid("state", f"must have {d} values, got {len(value)}")
    try:
        with np.errstate(over="ignore"):
            arr = np.asarray(value, dtype=np.float64).astype(np.float32)
    except OverflowError:  # a JSON integer beyond float64 (`1` and 400 zeros is valid JSON)
        raise invalid("state", "contains a value beyond float32") from None
    if not np.isfinite(arr).all():
        raise invalid("state", "contains NaN or inf (or a value beyond float32)")
    return check_state_values(arr, "state", spec)


def _int_field(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = body.get(key, 0)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        try:
            v = int(v)
        except ValueError:  # digits int() refuses: "²" (isdigit, not decimal), more than 4300 of them
            raise invalid(key, f"must be an integer between {lo} and {hi}") from None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise invalid(key, f"must be an integer between {lo} and {hi}")
    return v


def _common_http(body: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise invalid("reasoning", "must be a string")
    return {
        "seed": _int_field(body, "seed", 0, 2**64 - 1),
        "deadline_ms": _int_field(body, "deadline_ms", 0, MAX_DEADLINE_MS),
        "tick": _int_field(body, "tick", -(2**63), 2**63 - 1),
        "reasoning": check_reasoning(reasoning, "reasoning", spec.limits) if reasoning else None,
    }


def _unknown(key: object, hint: str) -> tuple[str, str]:
    """(field, message) refusing an unknown key; an empty key names the body (a field must be non-empty)."""
    name = str(key)[:_MAX_NAME_CHARS]
    return (name, f"unknown field; {hint}") if name else ("body", f"unknown field ''; {hint}")


def infer_from_json(body: Any, spec: InputSpec) -> ValidatedObservation:
    """`{"images": {camera: base64}, "state": [..], "instruction": str, ...}` -> request."""
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    unknown = sorted(set(body) - _JSON_KEYS)
    if unknown:
        raise invalid(*_unknown(unknown[0], f"accepted: {', '.join(sorted(_JSON_KEYS))}"))
    instruction = check_instruction(body.get("instruction", ""), "instruction", spec.limits, required=True)
    common = _common_http(body, spec)
    state = _state_list(body.get("state"), spec)
    images = body.get("images")
    if not isinstance(images, dict):
        raise invalid("images", "must be an object mapping camera name to a base64 PNG/JPEG")
    _check_cameras([str(k) for k in images], "images", spec, None)
    decoded = {cam: _b64_image(v, f"images[{cam}]", spec) for cam, v in images.items()}
    return ValidatedObservation(
        obs=EngineObservation(images=decoded, state=state, instruction=instruction), **common
    )


def infer_from_form(fields: Mapping[str, str], files: Mapping[str, bytes], spec: InputSpec) -> ValidatedObservation:
    """Multipart: one file part per camera (part name = camera), text parts for the rest.

    `state` is a JSON list or comma/space separated numbers.
    """
    unknown = sorted(set(fields) - _JSON_KEYS - {"images"})
    if unknown:
        raise invalid(*_unknown(unknown[0], "not a form field of /v1/infer"))
    instruction = check_instruction(fields.get("instruction", ""), "instruction", spec.limits, required=True)
    common = _common_http(fields, spec)
    raw_state = fields.get("state", "").strip()
    try:
        parsed = json.loads(raw_state) if raw_state.startswith("[") else [
            float(x) for x in raw_state.replace(",", " ").split()
        ]
    except (ValueError, RecursionError):  # RecursionError: a list nested deeper than the parser goes
        raise invalid("state", "must be a JSON list or comma-separated numbers") from None
    state = _state_list(parsed, spec)
    _check_cameras(list(files), "images", spec, None)
    decoded = {cam: _image_bytes(data, f"images[{cam}]", spec) for cam, data in files.items()}
    return ValidatedObservation(
        obs=EngineObservation(images=decoded, state=state, instruction=instruction), **common
    )


# --- decoded arrays (the openpi websocket: msgpack-numpy frames) ---------------------------------


def image_from_array(value: Any, field: str, spec: InputSpec, layout: str = "auto") -> np.ndarray:
    """A decoded image -> an HxWx3 uint8 array that owns its pixels: a uint8 array laid out HxWx3 or
    3xHxW (`layout` "hwc"/"chw"; "auto" tells them apart by where the 3 is), a float array in [0, 1]
    (openpi's own input transforms accept those), or the bytes of a JPEG/PNG file."""
    limits = spec.limits
    if isinstance(value, bytes):  # an encoded JPEG/PNG file instead of pixels
        return _image_bytes(value, field, spec, copy=True)
    if not isinstance(value, np.ndarray):
        raise invalid(field, f"must be a uint8 image array (HxWx3 or 3xHxW), got {type(value).__name__}")
    a = value
    if a.ndim != 3:
        raise invalid(field, f"must be HxWx3 or 3xHxW, got shape {list(a.shape)}")
    resolved = layout
    if resolved == "auto":
        resolved = "hwc" if a.shape[2] == 3 else "chw" if a.shape[0] == 3 else "?"
    chw = resolved == "chw" and a.shape[0] == 3
    if chw:
        a = a.transpose(1, 2, 0)
    elif resolved != "hwc" or a.shape[2] != 3:
        raise invalid(field, f"must be HxWx3 or 3xHxW ({layout}), got shape {list(a.shape)}")
    h, w = a.shape[:2]
    if h == 0 or w == 0:
        raise invalid(field, "empty image")
    try:
        check_image_size(field, h, w, limits)
    except WireError as e:
        raise invalid(e.field, e.message) from None
    if a.dtype == np.uint8:  # one copy: the input may view the message bytes (read-only)
        if chw:  # channel by channel: ~10x faster than numpy's generic strided copy of the transpose
            out = np.empty((h, w, 3), np.uint8)
            for c in range(3):
                out[:, :, c] = a[:, :, c]
            return out
        return np.array(a, dtype=np.uint8, order="C", copy=True)
    if a.dtype.kind == "f":
        f = a.astype(np.float32)
        if not np.isfinite(f).all():
            raise invalid(field, "contains NaN or inf")
        return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise invalid(field, f"images must be uint8 (or float in [0, 1]), got {a.dtype}")


def observation_from_arrays(
    images: Mapping[str, np.ndarray],
    state: np.ndarray,
    instruction: object,
    spec: InputSpec,
    *,
    state_field: str = "state",
    state_value_fields: Sequence[str] | None = None,
    instruction_field: str = "instruction",
    default_instruction: str = "",
    seq: int = 0,
    tick: int = 0,
) -> ValidatedObservation:
    """Decoded images (camera -> HxWx3 uint8, see `image_from_array`; the caller has matched them to the
    profile's cameras), a float32 state vector and an instruction -> a validated request.

    The state must have the profile's size and every value in bounds. The instruction may be a string or
    UTF-8 bytes; a missing (None) or blank one falls back to `default_instruction`, and one is required."""
    want = spec.profile.state_dim
    if state.shape != (want,):
        raise invalid(state_field, f"must have {want} values, got {state.size}")
    check_state_values(state, state_field, spec, state_value_fields)
    if isinstance(instruction, bytes):
        try:
            instruction = instruction.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(instruction_field, "is not valid UTF-8") from None
    if instruction is None or (isinstance(instruction, str) and not instruction.strip()):
        instruction = default_instruction
        if not instruction:
            raise invalid(instruction_field, "required (the language instruction)")
    text = check_instruction(instruction, instruction_field, spec.limits, required=True)  # type: ignore[arg-type]
    return ValidatedObservation(
        obs=EngineObservation(images=dict(images), state=state, instruction=text), seq=seq, tick=tick
    )
