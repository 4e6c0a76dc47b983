"""Isolation on every engine: while an attacker's well-formed observations fail inside the engine, none
of the victims' observations batched with them fails.

What fails inside a real engine? Nothing we could find: validation refuses the inputs that used to break
a batch (control tokens in supplied reasoning, images the processor refuses, absurd states), and a probe
of the tiny torch model with what validation lets through (8 px and 50:1 images, 8000 characters of
emoji as supplied reasoning: 32k tokens, 1000-character emoji instructions, states of +-1e4) raised
nothing. So the engines here are the real ones (NullEngine, the tiny TorchEngine) with a fault injected
per stage for the attacker's items only, keyed by what the attacker sends:

* instruction containing PREPROCESS_MARK -> `preprocess` raises ValueError (an image the processor refuses),
* supplied reasoning == REASONING_MARK   -> `reason_batch` raises for any batch holding it (the model
  refuses that text), so the whole batch fails and the compute loop must retry item by item,
* seed == EXPERT_SEED                    -> `act_batch` raises for any batch holding it (normalisation
  blew up), same retry in the expert stage.

The test holds the compute thread inside a first batch, queues the attacker's and the victims' items
behind it, releases, and then checks from the engine's own record (and the batch-size metric) that the
attacker's items really shared a reasoning batch and an expert batch with victims' items.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable, Sequence

import grpc
import numpy as np
import pytest
from PIL import Image
from serverkit import CAMERAS, eventually, infer_request, observation, state_vec

from chatvla.engines.base import ActItem, Engine, EngineObservation, ReasoningResult, ReasonItem
from chatvla.engines.null import NullEngine
from chatvla.v1 import policy_pb2 as pb
from chatvla.wire.vocabulary import METRIC_BATCH_SIZE, METRIC_QUEUE_DEPTH, STAGE_EXPERT, STAGE_REASONING

PREPROCESS_MARK = "zz-attack-preprocess"
REASONING_MARK = "zz attack reasoning text"
EXPERT_SEED = 666_666
ROUNDS = 2
# The test is about isolation, not speed: nothing may expire or be refused for load on a busy machine (the
# held first batch inflates the server's estimate of one observation's cost, which admission reads).
DEADLINE_MS = 120_000


class Injected(ValueError):
    """The injected engine failure (a ValueError: what a processor raises for input it cannot take)."""


class FaultInjection:
    """Mixin over a real engine class: fails the attacker's items (see module doc), records every batch
    as (stage, size, attacker items in it), and can hold the compute thread inside a reasoning batch."""

    def _init_faults(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.record: list[tuple[str, int, int]] = []
        self._poisoned: set[int] = set()  # id() of prepared inputs of the attacker

    def preprocess(self, obs: EngineObservation):  # type: ignore[no-untyped-def]
        if PREPROCESS_MARK in obs.instruction:
            self.record.append(("preprocess", 1, 1))
            raise Injected("the processor cannot take this image")
        return super().preprocess(obs)  # type: ignore[misc]

    def reason_batch(self, items: Sequence[ReasonItem], yield_point: Callable[[], None] | None = None
                     ) -> list[ReasoningResult]:
        self.entered.release()
        assert self.gate.wait(timeout=120), "test gate never opened"
        bad = sum(it.reasoning == REASONING_MARK for it in items)
        self.record.append((STAGE_REASONING, len(items), bad))
        if bad:
            raise Injected("the model refuses this reasoning text")
        return super().reason_batch(items, yield_point)  # type: ignore[misc]

    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        bad = sum(it.seed == EXPERT_SEED for it in items)
        self.record.append((STAGE_EXPERT, len(items), bad))
        if bad:
            raise Injected("state normalisation failed")
        return super().act_batch(items)  # type: ignore[misc]

    def warmup(self) -> None:
        super().warmup()  # type: ignore[misc]
        self.entered = threading.Semaphore(0)
        self.record = []


class FaultyNull(FaultInjection, NullEngine):
    def __init__(self) -> None:
        super().__init__()
        self._init_faults()


def faulty_torch() -> Engine:
    pytest.importorskip("torch")
    from chatvla.engines.torch_engine import TorchEngine
    from chatvla.model import load_model

    class FaultyTorch(FaultInjection, TorchEngine):
        pass

    engine = FaultyTorch(load_model("tiny"))
    engine._init_faults()
    return engine


def png_b64(h: int = 24, w: int = 24) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def _round(srv, seq: int) -> tuple[list[object], list[object]]:
    """One round: plug the compute thread, queue attackers and victims behind it, release; returns
    (victim outcomes, attacker outcomes), exceptions included. The stream victims are new sessions each
    round, so their observation decodes (a later one could wait for its session's decode or ride a
    background refresh, outside the reasoning queue whose depth tells the test everything is queued)."""
    engine = srv.engine
    streams = [(await srv.open_stream(instruction=f"victim {i}"))[0] for i in range(2)]
    engine.entered = threading.Semaphore(0)  # the last round's batches and retries released it too
    engine.gate.clear()
    plug = asyncio.ensure_future(srv.stub.Infer(infer_request(deadline_ms=DEADLINE_MS)))
    assert await asyncio.to_thread(engine.entered.acquire, True, 60), "the plug never reached the engine"

    async def stream_victim(call) -> pb.ActionChunk:
        await call.write(pb.StreamRequest(observation=observation(seq, deadline_ms=DEADLINE_MS, seed=seq)))
        resp = await call.read()
        assert resp.WhichOneof("msg") == "chunk", resp
        return resp.chunk

    async def http_victim() -> dict:
        r = await srv.http.post("/v1/infer", json={"images": {CAMERAS[0]: png_b64()}, "state": state_vec().tolist(),
                                                   "instruction": "stack the cups", "seed": seq,
                                                   "deadline_ms": DEADLINE_MS})
        assert r.status_code == 200, r.text
        return r.json()

    victims = [asyncio.ensure_future(stream_victim(c)) for c in streams]
    victims.append(asyncio.ensure_future(http_victim()))
    victims.append(asyncio.ensure_future(srv.stub.Infer(infer_request(seed=seq, deadline_ms=DEADLINE_MS))))
    attackers = [
        asyncio.ensure_future(srv.stub.Infer(infer_request(instruction=f"go {PREPROCESS_MARK}",
                                                           deadline_ms=DEADLINE_MS))),
        asyncio.ensure_future(srv.stub.Infer(infer_request(reasoning=REASONING_MARK, deadline_ms=DEADLINE_MS))),
        asyncio.ensure_future(srv.stub.Infer(infer_request(seed=EXPERT_SEED, deadline_ms=DEADLINE_MS))),
    ]
    queued = len(victims) + len(attackers)
    await eventually(lambda: srv.sample(f"{METRIC_QUEUE_DEPTH}", stage=STAGE_REASONING) == queued, timeout=60)
    engine.gate.set()
    await plug
    outcomes = (list(await asyncio.gather(*victims, return_exceptions=True)),
                list(await asyncio.gather(*attackers, return_exceptions=True)))
    for call in streams:
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    return outcomes


async def _attack(srv) -> None:
    engine = srv.engine
    reasoning_items = srv.sample(f"{METRIC_BATCH_SIZE}_sum", stage=STAGE_REASONING)
    for r in range(ROUNDS):
        engine.record.clear()
        try:
            victims, attackers = await _round(srv, seq=r + 1)
        finally:
            engine.gate.set()  # never leave the compute thread parked (teardown drains through it)
        failed = [v for v in victims if isinstance(v, BaseException)]
        assert not failed, f"round {r}: {len(failed)} of {len(victims)} victims failed: {failed[:2]!r}"
        for v in victims:  # every victim got a real, finite chunk
            if isinstance(v, dict):
                assert np.isfinite(np.asarray(v["actions"], np.float32)).all()
        codes = [a.code() if isinstance(a, grpc.aio.AioRpcError) else a for a in attackers]
        assert codes[0] == grpc.StatusCode.INVALID_ARGUMENT, codes  # preprocess: "the model cannot take it"
        assert all(isinstance(a, grpc.aio.AioRpcError) for a in attackers), codes
        # Proof of shared batches: the attacker's reasoning and expert items each failed a batch that
        # also held victims' items, and the retries then answered everyone alone.
        rec = engine.record
        assert any(s == STAGE_REASONING and n > 1 and bad for s, n, bad in rec), rec
        assert any(s == STAGE_EXPERT and n > 1 and bad for s, n, bad in rec), rec
        assert ("preprocess", 1, 1) in rec, rec
    # The batch-size metric saw the shared batches too (the plug is alone; 7 queued behind it per round).
    assert srv.sample(f"{METRIC_BATCH_SIZE}_sum", stage=STAGE_REASONING) - reasoning_items >= ROUNDS * 6


async def test_null_engine_isolates_failing_items(serve):
    await _attack(await serve(engine=FaultyNull(), max_batch=8, deadline_ms=DEADLINE_MS))


@pytest.mark.slow
async def test_torch_engine_isolates_failing_items(serve):
    await _attack(await serve(engine=faulty_torch(), max_batch=8, deadline_ms=DEADLINE_MS))
