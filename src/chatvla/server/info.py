"""The model description every transport serves (gRPC GetModelInfo, SessionInfo, HTTP /v1/model)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

import chatvla
from chatvla.engines.base import EngineInfo
from chatvla.profiles import RobotProfile
from chatvla.server.messages import ChunkResult, ReasoningPolicy
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire import Limits, tensor_to_proto
from chatvla.wire.vocabulary import TIMING_FIELDS


def profile_proto(p: RobotProfile) -> pb.RobotProfile:
    return pb.RobotProfile(
        name=p.name, action_space=p.action_space, action_dim=p.action_dim, state_dim=p.state_dim,
        chunk_size=p.chunk_size, control_rate_hz=p.control_rate_hz,
        cameras=[pb.CameraSpec(name=c.name, height=c.height, width=c.width) for c in p.cameras],
        action_names=list(p.action_names), state_names=list(p.state_names),
    )


def reasoning_proto(r: ReasoningPolicy) -> pb.ReasoningPolicy:
    return pb.ReasoningPolicy(every_n=r.every_n, every_seconds=r.every_seconds)


def model_info_proto(info: EngineInfo, limits: Limits, reasoning: ReasoningPolicy) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=info.model_id, engine=info.engine, profile=profile_proto(info.profile),
        robot_profiles=[info.profile.name], max_reasoning_tokens=info.max_reasoning_tokens,
        limits=pb.Limits(**limits.to_proto_fields()), default_reasoning=reasoning_proto(reasoning),
        server_version=chatvla.__version__,
    )


def profile_details(p: RobotProfile) -> dict[str, Any]:
    """What HTTP `/v1/model` adds to the proto's profile: the safety envelope and units, so a client (the
    debug page) can prefill the home pose and draw limits without a copy of the profile table."""
    return {
        "description": p.description,
        "action_lower": list(p.action_lower),
        "action_upper": list(p.action_upper),
        "max_step": list(p.max_step),
        "gripper_indices": list(p.gripper_indices),
        "home": list(p.home),
        "action_units": list(p.action_units),
    }


UNKNOWN_CARD: dict[str, Any] = {"trained": None, "basis": "not known", "summary": "training status unknown",
                                "eval": None}


def model_json(info: pb.ModelInfo, profile: RobotProfile, card: dict[str, Any] | None) -> dict[str, Any]:
    """HTTP `/v1/model`: `ModelInfo` as JSON, the profile's envelope merged into `profile`, and `card`
    (trained or not, measured figures; chatvla.server.card). gRPC `GetModelInfo` stays the proto."""
    doc = to_json(info)
    doc["profile"].update(profile_details(profile))
    doc["card"] = card if card is not None else UNKNOWN_CARD
    return doc


def to_json(message: object) -> dict:
    """A protobuf message as the JSON the HTTP API serves (proto field names, defaults included)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def chunk_proto(r: ChunkResult) -> pb.ActionChunk:
    t = r.timings
    return pb.ActionChunk(
        seq=r.seq, tick=r.tick, actions=tensor_to_proto(r.actions), reasoning=r.reasoning,
        reasoning_refreshed=r.reasoning_refreshed, reasoning_tokens=r.reasoning_tokens,
        reasoning_seq=r.reasoning_seq, reasoning_age_ms=r.reasoning_age_ms,
        timings=pb.Timings(**{k: getattr(t, k) for k in TIMING_FIELDS}),
    )
