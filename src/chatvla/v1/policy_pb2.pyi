from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_UNSPECIFIED: _ClassVar[ImageEncoding]
    RGB8: _ClassVar[ImageEncoding]
    JPEG: _ClassVar[ImageEncoding]
    PNG: _ClassVar[ImageEncoding]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    INVALID_ARGUMENT: _ClassVar[ErrorCode]
    DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ABORTED: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
INT32: DType
INT64: DType
UINT8: DType
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
RGB8: ImageEncoding
JPEG: ImageEncoding
PNG: ImageEncoding
ERROR_CODE_UNSPECIFIED: ErrorCode
INVALID_ARGUMENT: ErrorCode
DEADLINE_EXCEEDED: ErrorCode
RESOURCE_EXHAUSTED: ErrorCode
ABORTED: ErrorCode
INTERNAL: ErrorCode
UNAVAILABLE: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("camera", "encoding", "height", "width", "data")
    CAMERA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    camera: str
    encoding: ImageEncoding
    height: int
    width: int
    data: bytes
    def __init__(self, camera: _Optional[str] = ..., encoding: _Optional[_Union[ImageEncoding, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReasoningPolicy(_message.Message):
    __slots__ = ("every_n", "every_seconds")
    EVERY_N_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    every_n: int
    every_seconds: float
    def __init__(self, every_n: _Optional[int] = ..., every_seconds: _Optional[float] = ...) -> None: ...

class CameraSpec(_message.Message):
    __slots__ = ("name", "height", "width")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    height: int
    width: int
    def __init__(self, name: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class RobotProfile(_message.Message):
    __slots__ = ("name", "action_space", "action_dim", "state_dim", "chunk_size", "control_rate_hz", "cameras", "action_names", "state_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_SPACE_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    ACTION_NAMES_FIELD_NUMBER: _ClassVar[int]
    STATE_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    action_space: str
    action_dim: int
    state_dim: int
    chunk_size: int
    control_rate_hz: float
    cameras: _containers.RepeatedCompositeFieldContainer[CameraSpec]
    action_names: _containers.RepeatedScalarFieldContainer[str]
    state_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., action_space: _Optional[str] = ..., action_dim: _Optional[int] = ..., state_dim: _Optional[int] = ..., chunk_size: _Optional[int] = ..., control_rate_hz: _Optional[float] = ..., cameras: _Optional[_Iterable[_Union[CameraSpec, _Mapping]]] = ..., action_names: _Optional[_Iterable[str]] = ..., state_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_image_bytes", "max_image_side", "max_instruction_chars", "max_images")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTRUCTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_image_bytes: int
    max_image_side: int
    max_instruction_chars: int
    max_images: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_instruction_chars: _Optional[int] = ..., max_images: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "engine", "profile", "robot_profiles", "max_reasoning_tokens", "limits", "default_reasoning", "server_version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ROBOT_PROFILES_FIELD_NUMBER: _ClassVar[int]
    MAX_REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REASONING_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    engine: str
    profile: RobotProfile
    robot_profiles: _containers.RepeatedScalarFieldContainer[str]
    max_reasoning_tokens: int
    limits: Limits
    default_reasoning: ReasoningPolicy
    server_version: str
    def __init__(self, model_id: _Optional[str] = ..., engine: _Optional[str] = ..., profile: _Optional[_Union[RobotProfile, _Mapping]] = ..., robot_profiles: _Optional[_Iterable[str]] = ..., max_reasoning_tokens: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., default_reasoning: _Optional[_Union[ReasoningPolicy, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionStart(_message.Message):
    __slots__ = ("robot_profile", "cameras", "control_rate_hz", "instruction", "robot_id", "reasoning", "default_deadline_ms", "max_in_flight")
    ROBOT_PROFILE_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    robot_profile: str
    cameras: _containers.RepeatedScalarFieldContainer[str]
    control_rate_hz: float
    instruction: str
    robot_id: str
    reasoning: ReasoningPolicy
    default_deadline_ms: int
    max_in_flight: int
    def __init__(self, robot_profile: _Optional[str] = ..., cameras: _Optional[_Iterable[str]] = ..., control_rate_hz: _Optional[float] = ..., instruction: _Optional[str] = ..., robot_id: _Optional[str] = ..., reasoning: _Optional[_Union[ReasoningPolicy, _Mapping]] = ..., default_deadline_ms: _Optional[int] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("seq", "tick", "images", "state", "instruction", "deadline_ms", "force_reasoning", "seed", "reasoning")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    FORCE_REASONING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    tick: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    state: Tensor
    instruction: str
    deadline_ms: int
    force_reasoning: bool
    seed: int
    reasoning: str
    def __init__(self, seq: _Optional[int] = ..., tick: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., instruction: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., force_reasoning: _Optional[bool] = ..., seed: _Optional[int] = ..., reasoning: _Optional[str] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("start", "observation")
    START_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    start: SessionStart
    observation: Observation
    def __init__(self, start: _Optional[_Union[SessionStart, _Mapping]] = ..., observation: _Optional[_Union[Observation, _Mapping]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "reasoning", "max_in_flight")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: ModelInfo
    reasoning: ReasoningPolicy
    max_in_flight: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., reasoning: _Optional[_Union[ReasoningPolicy, _Mapping]] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "preprocess_ms", "reasoning_ms", "expert_ms", "total_ms", "reasoning_batch_size", "expert_batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    REASONING_MS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    REASONING_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    preprocess_ms: float
    reasoning_ms: float
    expert_ms: float
    total_ms: float
    reasoning_batch_size: int
    expert_batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., reasoning_ms: _Optional[float] = ..., expert_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., reasoning_batch_size: _Optional[int] = ..., expert_batch_size: _Optional[int] = ...) -> None: ...

class ActionChunk(_message.Message):
    __slots__ = ("seq", "tick", "actions", "reasoning", "reasoning_refreshed", "reasoning_tokens", "timings", "reasoning_seq", "reasoning_age_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    REASONING_REFRESHED_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REASONING_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASONING_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    tick: int
    actions: Tensor
    reasoning: str
    reasoning_refreshed: bool
    reasoning_tokens: int
    timings: Timings
    reasoning_seq: int
    reasoning_age_ms: float
    def __init__(self, seq: _Optional[int] = ..., tick: _Optional[int] = ..., actions: _Optional[_Union[Tensor, _Mapping]] = ..., reasoning: _Optional[str] = ..., reasoning_refreshed: _Optional[bool] = ..., reasoning_tokens: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., reasoning_seq: _Optional[int] = ..., reasoning_age_ms: _Optional[float] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("seq", "code", "message", "field")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: ErrorCode
    message: str
    field: str
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("session", "chunk", "error")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    chunk: ActionChunk
    error: StreamError
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., chunk: _Optional[_Union[ActionChunk, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("robot_profile", "images", "state", "instruction", "deadline_ms", "seed", "tick", "reasoning")
    ROBOT_PROFILE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    robot_profile: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    state: Tensor
    instruction: str
    deadline_ms: int
    seed: int
    tick: int
    reasoning: str
    def __init__(self, robot_profile: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., instruction: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., seed: _Optional[int] = ..., tick: _Optional[int] = ..., reasoning: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: ActionChunk
    def __init__(self, chunk: _Optional[_Union[ActionChunk, _Mapping]] = ...) -> None: ...
