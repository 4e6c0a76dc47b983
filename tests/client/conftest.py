"""Fixtures for the robot-side client: a small profile with round numbers, a fake clock, and a scripted
`Policy` gRPC servicer on loopback that can delay, drop, error, hang and die."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from chatvla.client.fakes import FakeClock
from chatvla.profiles import CameraSpec, RobotProfile
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import decode_image, tensor_from_proto, tensor_to_proto

# 10 Hz and chunks of 8: one tick is 0.1 s, a chunk 0.8 s, so latencies read as tick counts.
TOY = RobotProfile(
    name="toy",
    description="two joints and a gripper, for executor arithmetic",
    action_space="joint_position",
    action_names=("j1", "j2", "gripper"),
    state_names=("j1", "j2", "gripper"),
    chunk_size=8,
    control_rate_hz=10.0,
    cameras=(CameraSpec("front", 4, 6),),
    action_lower=(-1.0, -1.0, 0.0),
    action_upper=(1.0, 1.0, 0.08),
    max_step=(0.1, 0.1, 0.08),
    gripper_indices=(2,),
    home=(0.0, 0.0, 0.04),
)

# Ticks as actions: a profile whose envelope never clips values up to 1e6, so an executed action
# equal to its tick number proves the tick bookkeeping end to end.
COUNTER = RobotProfile(
    name="counter",
    description="one dimension whose value is the tick it belongs to",
    action_space="joint_position",
    action_names=("t",),
    state_names=("t",),
    chunk_size=8,
    control_rate_hz=10.0,
    cameras=(CameraSpec("front", 2, 2),),
    action_lower=(-1e6,),
    action_upper=(1e6,),
    max_step=(1e6,),
    home=(0.0,),
)


@pytest.fixture
def toy() -> RobotProfile:
    return TOY


@pytest.fixture
def counter() -> RobotProfile:
    return COUNTER


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `cond` until true; only a guard against hangs, never a speed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


# ---- scripted gRPC server ------------------------------------------------------------------------
@dataclass
class Reply:
    """What the fake server does with one observation."""

    kind: str = "chunk"  # chunk | drop | error | hang
    delay: float = 0.0
    code: int = pb.INVALID_ARGUMENT
    message: str = ""
    field: str = ""


@dataclass
class ServerLog:
    starts: list[pb.SessionStart] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    observations: list[pb.Observation] = field(default_factory=list)
    images: list[dict[str, np.ndarray]] = field(default_factory=list)
    streams: int = 0


class ScriptedPolicy(pb_grpc.PolicyServicer):
    """Answers each observation as `script(obs)` says; the chunk's rows are `obs.tick + i` in every
    dimension so tests can check the tick bookkeeping."""

    def __init__(self, profile: RobotProfile, token: str | None = None) -> None:
        self.profile = profile
        self.token = token
        self.log = ServerLog()
        self.script: Callable[[pb.Observation], Reply] = lambda _o: Reply()
        self.reject_start: tuple[int, str, str] | None = None  # in-band error instead of a session
        self.stop = threading.Event()

    def _auth(self, context: grpc.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata()}
        self.log.metadata.append(md)
        if self.token is not None and md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        self._auth(context)
        return pb.ModelInfo(model_id="scripted", engine="fake")

    def Stream(self, request_iterator: Iterator[pb.StreamRequest], context: grpc.ServicerContext):
        self._auth(context)
        self.log.streams += 1
        first = next(request_iterator)
        assert first.WhichOneof("msg") == "start"
        self.log.starts.append(first.start)
        if self.reject_start is not None:
            code, message, fld = self.reject_start
            yield pb.StreamResponse(error=pb.StreamError(seq=0, code=code, message=message, field=fld))
            return
        yield pb.StreamResponse(session=pb.SessionInfo(session_id=f"s{self.log.streams}"))
        for req in request_iterator:
            obs = req.observation
            self.log.observations.append(obs)
            self.log.images.append({im.camera: decode_image(im) for im in obs.images})
            reply = self.script(obs)
            if reply.kind == "hang":
                self.stop.wait(30)
                return
            if reply.delay:
                time.sleep(reply.delay)
            if reply.kind == "drop":
                continue
            if reply.kind == "error":
                err = pb.StreamError(seq=obs.seq, code=reply.code, message=reply.message, field=reply.field)
                yield pb.StreamResponse(error=err)
                continue
            state = tensor_from_proto(obs.state, field="state")
            assert state.shape == (self.profile.state_dim,)
            rows = obs.tick + np.arange(self.profile.chunk_size, dtype=np.float32)
            actions = np.repeat(rows[:, None], self.profile.action_dim, axis=1)
            yield pb.StreamResponse(
                chunk=pb.ActionChunk(
                    seq=obs.seq,
                    tick=obs.tick,
                    actions=tensor_to_proto(actions),
                    reasoning=f"answering {obs.seq}",
                    timings=pb.Timings(total_ms=1.0),
                )
            )


class FakeServer:
    """A grpc sync server on 127.0.0.1 that can be killed and restarted on the same port."""

    def __init__(self, servicer: ScriptedPolicy, credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = servicer
        self.credentials = credentials
        self.port = 0
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_PolicyServicer_to_server(self.servicer, server)
        target = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(target)
        else:
            self.port = server.add_secure_port(target, self.credentials)
        assert self.port, "could not bind"
        server.start()
        self._server = server
        return self

    def kill(self) -> None:
        if self._server is not None:
            self.servicer.stop.set()
            self._server.stop(grace=0).wait(5)
            self._server = None
            self.servicer.stop.clear()


@pytest.fixture
def grpc_server(toy: RobotProfile) -> Iterator[FakeServer]:
    server = FakeServer(ScriptedPolicy(toy, token="s3cret")).start()
    yield server
    server.kill()


class Helpers:
    """Test modules cannot import conftest under --import-mode=importlib; they get these via a fixture."""

    Reply = Reply
    ScriptedPolicy = ScriptedPolicy
    FakeServer = FakeServer
    wait_for = staticmethod(wait_for)
    TOY = TOY
    COUNTER = COUNTER


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers
