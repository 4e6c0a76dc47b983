"""Server settings: one frozen model, filled from defaults < YAML file < CHATVLA_* env < flags.

Every knob is declared once here with its default and description; the CLI flags, the env var names
and the README's configuration table are all derived from these declarations so they cannot drift.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chatvla.wire.limits import DEFAULT_LIMITS, Limits

ENV_PREFIX = "CHATVLA_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the source (flag, env var or file) and key."""


class ServerSettings(BaseModel):
    """Everything `chatvla serve` can be told. Field descriptions double as CLI help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        "chatvla-tiny-mm",
        description="Checkpoint directory, shipped model (`chatvla-tiny-mm`: trained on the sim's math matching) "
        "or seeded preset (e.g. `tiny`: untrained, for tests).",
    )
    engine: Literal["torch", "null", "vllm"] = Field(
        "torch", description="Model engine: `torch`, `vllm`, or `null` (no model; for transport tests)."
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra engine keyword options; flag `--engine-option KEY=VALUE` (repeatable), "
        "env/YAML a mapping. Null engine: `profile`, `reason_ms`, `act_ms`, `per_item_ms`.",
    )
    host: str = Field("127.0.0.1", description="gRPC bind address.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 lets the OS pick.")
    http_host: str = Field(
        "127.0.0.1", description="HTTP bind address. Loopback unless set explicitly, even if `host` is not."
    )
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP debug/metrics port; 0 lets the OS pick.")
    openpi_port: int | None = Field(
        None, ge=0, le=65535,
        description="openpi-compatible websocket port (binds on `host`); unset = off, 0 lets the OS pick.",
    )
    openpi_mapping: str | None = Field(
        None, description="openpi observation keys -> our cameras/state: `droid`, `aloha`, `native` or a YAML "
        "file; unset = by profile (docs/openpi.md).",
    )
    openpi_default_prompt: str | None = Field(
        None, description="openpi instruction until a connection sends a `prompt` (openpi's ALOHA clients never "
        "do); unset = the mapping's default (aloha: `fold the towel`), empty = a prompt is required.",
    )
    max_batch: int = Field(8, ge=1, le=1024, description="Reasoning stage: largest batch.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="Reasoning stage: longest wait for a batch to fill."
    )
    expert_max_batch: int | None = Field(
        None, ge=1, le=1024, description="Expert stage: largest batch (default: `max_batch`)."
    )
    expert_max_wait_ms: float | None = Field(
        None, ge=0, le=10_000, description="Expert stage: longest wait (default: `max_wait_ms`)."
    )
    max_queue: int = Field(
        128, ge=1, description="Observations admitted and not yet answered, over all sessions; "
        "beyond it new ones get RESOURCE_EXHAUSTED / HTTP 429 at once."
    )
    max_sessions: int = Field(256, ge=1, description="Open Stream sessions; more get RESOURCE_EXHAUSTED.")
    compute_threads: int = Field(
        0, ge=0, le=1024, description="Cores the model's compute uses (torch intra-op threads); 0 = the cores "
        "this process may run on (CPU affinity and cgroup quota).",
    )
    max_in_flight: int = Field(
        3, ge=1, le=8, description="Observations one session may have computing or travelling at once, "
        "unless its SessionStart asks for fewer (n+1 reasons while n is in the expert; over a slow network, "
        "several cross it at once).",
    )
    deadline_ms: int = Field(
        5000, ge=1, le=600_000, description="Default per-observation deadline (a request may set its own)."
    )
    noise: Literal["zero", "random"] = Field(
        "zero", description="Where the action expert's sampling starts for a request that names no `seed`: "
        "`zero` = from zero noise, so an observation always gets the same chunk and a robot's successive "
        "chunks do not jump between the ways the expert could act; `random` = a fresh random seed per "
        "request. A request's own seed always wins.",
    )
    reasoning_every_n: int | None = Field(
        None, ge=1, description="Default reasoning policy: write new reasoning every N observations. Unset "
        "(with --reasoning-every-seconds unset too): the policy the model was trained to follow, from its "
        "checkpoint (`reasoning.refresh_every_n`; 1 when it names none).",
    )
    reasoning_every_seconds: float | None = Field(
        None, ge=0, description="Default reasoning policy: also refresh after this many seconds (0 = off). "
        "Unset: as --reasoning-every-n says.",
    )
    warmup: bool = Field(True, description="Run the engine once before reporting ready.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long to wait for in-flight work before closing."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate; with `tls_key` enables TLS on both ports.")
    tls_key: Path | None = Field(None, description="PEM private key for `tls_cert`.")
    tokens_file: Path | None = Field(
        None, description="File of `robot_name sha256:<hex>` lines; when set every call needs a bearer token."
    )
    max_message_bytes: int = Field(
        DEFAULT_LIMITS.max_message_bytes, ge=1024, description="Largest gRPC message / HTTP body."
    )
    max_image_bytes: int = Field(DEFAULT_LIMITS.max_image_bytes, ge=1, description="Largest encoded image.")
    max_image_side: int = Field(DEFAULT_LIMITS.max_image_side, ge=1, description="Largest image side (px).")
    max_instruction_chars: int = Field(
        DEFAULT_LIMITS.max_instruction_chars, ge=1, description="Longest instruction (characters)."
    )
    max_images: int = Field(DEFAULT_LIMITS.max_images, ge=1, description="Most images per observation.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_image_bytes=self.max_image_bytes,
            max_image_side=self.max_image_side,
            max_instruction_chars=self.max_instruction_chars,
            max_images=self.max_images,
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def http_is_loopback(self) -> bool:
        return self.http_host in _LOOPBACK

    @property
    def host_is_loopback(self) -> bool:
        """gRPC (and openpi, which binds on `host`) listen on loopback only."""
        return self.host in _LOOPBACK or self.host.startswith("127.")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ServerSettings.model_fields:
        raw = env.get(env_name(name))
        if raw is None:
            continue
        if name == "engine_options":
            parsed = yaml.safe_load(raw) if raw.strip() else {}
            if not isinstance(parsed, dict):
                raise SettingsError(f"{env_name(name)}: expected a mapping like '{{reason_ms: 20}}'")
            out[name] = parsed
        else:
            out[name] = raw
    return out


def _from_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SettingsError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: top level must be a mapping of setting names")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "engine" in out and out["engine"] is None:
        out["engine"] = "null"  # unquoted `engine: null` is YAML's null, but it means the null engine
    return out


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> ServerSettings:
    """Merge the sources. `flags` holds only options the user actually gave (None values are ignored)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_file = config_file or env.get(CONFIG_ENV)
    if config_file:
        for k, v in _from_yaml(Path(config_file)).items():
            merged[k], sources[k] = v, f"{config_file}: {k}"
    for k, v in _from_env(env).items():
        merged[k], sources[k] = v, env_name(k)
    for k, v in (flags or {}).items():
        if v is not None:
            merged[k], sources[k] = v, "--" + k.replace("_", "-")
    try:
        return ServerSettings(**merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            lines.append(f"{sources.get(key, key or 'settings')}: {err['msg']}")
        raise SettingsError("; ".join(lines)) from None


def reference_markdown() -> str:
    """The configuration table of the README, generated from the field declarations."""
    rows = ["| flag | env var | YAML key | default | meaning |", "|---|---|---|---|---|"]
    for name, f in ServerSettings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default) if isinstance(default, dict) else default
        flag = "--engine-option" if name == "engine_options" else "--" + name.replace("_", "-")
        rows.append(f"| `{flag}` | `{env_name(name)}` | `{name}` | `{shown}` | {f.description} |")
    return "\n".join(rows)
