"""The server with the vLLM engine: in process (sharing the session engine) and as `chatvla serve
--engine vllm` in its own process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import numpy as np
import pytest

pytest.importorskip("vllm")
pytest.importorskip("chatvla.server.app", reason="chatvla.server is not available")

import grpc
import httpx

from chatvla.engines.base import ActItem, Engine, EngineInfo, EngineObservation, ReasonItem
from chatvla.profiles import FRANKA_JOINT
from chatvla.server import app as server_app
from chatvla.v1 import policy_pb2 as pb
from chatvla.v1 import policy_pb2_grpc as pb_grpc
from chatvla.wire import encode_image, tensor_from_proto, tensor_to_proto

pytestmark = pytest.mark.vllm
PROFILE = FRANKA_JOINT


class SharedEngine(Engine):
    """Delegates to the session's VllmEngine; `close` leaves it running for the other tests."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.batches_reasoning_itself = inner.batches_reasoning_itself
        self.on_step_set = False

    @property
    def info(self) -> EngineInfo:
        return self.inner.info

    @property
    def on_step(self):
        return self.inner.on_step

    @on_step.setter
    def on_step(self, cb) -> None:
        self.on_step_set = cb is not None
        self.inner.on_step = cb

    def __getattr__(self, name: str):  # batch_stats and anything else the server may look for
        return getattr(self.inner, name)

    def preprocess(self, obs: EngineObservation):
        return self.inner.preprocess(obs)

    def reason_batch(self, items: Sequence[ReasonItem], yield_point=None):
        return self.inner.reason_batch(items)

    def submit_reasoning(self, items: Sequence[ReasonItem], done, yield_point=None) -> None:
        self.inner.submit_reasoning(items, done)

    def set_threads(self, n: int) -> None:
        pass  # shared with the other tests: leave its threads alone

    def act_batch(self, items: Sequence[ActItem]):
        return self.inner.act_batch(items)

    def warmup(self) -> None:
        self.inner.warmup()

    def close(self) -> None:
        self.inner.on_step = None


def _observation(seq: int, rng: np.random.Generator) -> pb.Observation:
    images = [encode_image(rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8), c.name)
              for c in PROFILE.cameras]
    state = np.asarray(PROFILE.home, np.float32)
    return pb.Observation(seq=seq, tick=seq * 10, seed=seq, images=images, state=tensor_to_proto(state))


async def _session(stub, n: int, seed: int) -> list[pb.ActionChunk]:
    rng = np.random.default_rng(seed)
    call = stub.Stream()
    await call.write(pb.StreamRequest(start=pb.SessionStart(robot_profile=PROFILE.name,
                                                            instruction=f"put toy {seed} left of the block")))
    first = await call.read()
    assert first.WhichOneof("msg") == "session", first
    chunks = []
    for seq in range(1, n + 1):
        await call.write(pb.StreamRequest(observation=_observation(seq, rng)))
        resp = await call.read()
        assert resp.WhichOneof("msg") == "chunk", resp
        chunks.append(resp.chunk)
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return chunks


def _check_chunk(chunk: pb.ActionChunk, seq: int) -> None:
    assert chunk.seq == seq
    actions = tensor_from_proto(chunk.actions, field="actions", dtype=np.float32)
    assert actions.shape == (PROFILE.chunk_size, PROFILE.action_dim) and np.isfinite(actions).all()


async def test_concurrent_sessions_through_the_server_are_batched(vllm_engine):
    from chatvla.server.settings import ServerSettings

    engine = SharedEngine(vllm_engine)
    settings = ServerSettings(engine="vllm", model="tiny", grpc_port=0, http_port=0, warmup=False,
                              reasoning_every_n=1)
    app = server_app.ServerApp(settings, engine=engine)
    await app.start()
    vllm_engine.reset_batch_stats()
    try:
        async with grpc.aio.insecure_channel(app.grpc_address) as ch:
            stub = pb_grpc.PolicyStub(ch)
            sessions = await asyncio.gather(*(_session(stub, 3, seed) for seed in range(6)))
        for chunks in sessions:
            for seq, chunk in enumerate(chunks, 1):
                _check_chunk(chunk, seq)
                assert chunk.reasoning_tokens >= 1
        stats = vllm_engine.batch_stats()
        assert stats["max"] > 1, stats  # the engine ran several sessions' requests in one step
        async with httpx.AsyncClient(base_url=app.http_url) as http:
            text = (await http.get("/metrics")).text
        assert "chatvla_batch_size" in text
        sum_ = app.metrics.registry.get_sample_value("chatvla_batch_size_sum", {"stage": "reasoning"}) or 0.0
        count = app.metrics.registry.get_sample_value("chatvla_batch_size_count", {"stage": "reasoning"}) or 0.0
        if not engine.on_step_set:
            pytest.skip("the server does not read the vLLM engine's batch sizes yet (set engine.on_step to the "
                        "chatvla_batch_size{stage='reasoning'} histogram's observe; see VllmEngine docstring); "
                        f"engine measured {stats}")
        assert count > 0 and sum_ / count > 1.0, (sum_, count)
    finally:
        await app.shutdown()
    assert vllm_engine._thread.is_alive()  # the shared engine survived the server's shutdown


READY = re.compile(r"chatvla-serve ready: grpc=(\S+) http=(\S+)")


@pytest.mark.slow
async def test_chatvla_serve_engine_vllm_process(tmp_path):
    """`chatvla serve --engine vllm --model tiny` as a real process: ready line, chunks, metrics, SIGTERM."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2",
               VLLM_LOGGING_LEVEL="WARNING")
    env.pop("CHATVLA_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatvla.cli.main", "serve", "--engine", "vllm", "--model", "tiny",
         "--grpc-port", "0", "--http-port", "0",
         "--engine-option", "max_model_len=1024", "--engine-option", f"kv_cache_memory_bytes={128 << 20}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: list[str] = []
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def pump(stream, keep: bool) -> None:  # vLLM logs a lot: keep both pipes drained
        for line in stream:
            if keep:
                lines.append(line)
            m = READY.search(line)
            if m and not ready.done():
                loop.call_soon_threadsafe(lambda m=m: ready.done() or ready.set_result(m.groups()))

    threads = [threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, True), daemon=True)]
    for t in threads:
        t.start()
    try:
        try:
            grpc_addr, http_url = await asyncio.wait_for(ready, 300)
        except asyncio.TimeoutError:
            pytest.fail("no ready line in 300 s:\n" + "".join(lines[-40:]))
        async with grpc.aio.insecure_channel(grpc_addr) as ch, httpx.AsyncClient(base_url=http_url) as http:
            info = await pb_grpc.PolicyStub(ch).GetModelInfo(pb.GetModelInfoRequest())
            assert info.profile.name == PROFILE.name
            chunks = await _session(pb_grpc.PolicyStub(ch), 2, seed=3)
            for seq, chunk in enumerate(chunks, 1):
                _check_chunk(chunk, seq)
            text = (await http.get("/metrics")).text
            assert "chatvla_reasoning_tokens" in text
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 60)
        assert rc == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
