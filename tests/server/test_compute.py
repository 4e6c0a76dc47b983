"""The compute loop: one thread for every model call, one hand-off each way, batches that fill,
one bad item never failing its batch, and background refreshes that let waiting batches run between
their tokens, on the same thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from chatvla.engines.base import EngineObservation
from chatvla.engines.null import NullEngine
from chatvla.server.compute import ComputeConfig, ComputeLoop, Work, available_cores
from chatvla.server.errors import Code


def obs(instruction: str = "go", state: float = 0.0) -> EngineObservation:
    img = np.zeros((4, 4, 3), np.uint8)
    return EngineObservation(images={"front": img, "wrist": img}, state=np.full(8, state, np.float32),
                             instruction=instruction)


class ThreadRecorder(NullEngine):
    """Records which thread ran each engine call, and fails any item whose instruction says so."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.threads: set[int] = set()
        self.calls: list[tuple[str, int]] = []

    def preprocess(self, o):
        self.threads.add(threading.get_ident())
        if o.instruction == "unreadable":
            raise ValueError("height:1 or width:1 must be larger than factor:28")
        return super().preprocess(o)

    def reason_batch(self, items, yield_point=None):
        self.threads.add(threading.get_ident())
        self.calls.append(("reason", len(items)))
        if any(it.prepared.instruction == "poison" for it in items):
            raise ValueError("poisoned item")
        return super().reason_batch(items, yield_point)

    def act_batch(self, items):
        self.threads.add(threading.get_ident())
        self.calls.append(("act", len(items)))
        return super().act_batch(items)


async def run(loop_: ComputeLoop, works: list[Work]) -> list[Work]:
    done: dict[int, asyncio.Future] = {}
    aloop = asyncio.get_running_loop()
    for w in works:
        fut = aloop.create_future()
        done[id(w)] = fut
        w.on_done = lambda w, f=fut: f.set_result(w)
        loop_.put(w)
    return list(await asyncio.wait_for(asyncio.gather(*done.values()), 10))


def work(o: EngineObservation, *, act: bool = True, reasoning: str | None = None, seed: int = 1) -> Work:
    return Work(obs=o, seed=seed, deadline=time.monotonic() + 30, on_done=lambda w: None, act=act,
                reasoning=reasoning)


@pytest.fixture
async def compute():
    made: list[ComputeLoop] = []

    def make(engine: NullEngine, **cfg: object) -> ComputeLoop:
        c = ComputeLoop(engine, ComputeConfig(**cfg), asyncio.get_running_loop())
        c.start()
        made.append(c)
        return c

    yield make
    for c in made:
        await asyncio.to_thread(c.close)


async def test_every_model_call_runs_on_one_thread_and_reason_then_act_back_to_back(compute):
    engine = ThreadRecorder()
    loop_ = compute(engine)
    [w] = await run(loop_, [work(obs())])
    assert w.error is None and w.actions.shape == (16, 8)
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads
    assert engine.calls == [("reason", 1), ("act", 1)]
    assert (w.reasoning_batch, w.expert_batch) == (1, 1) and w.reasoned_at > 0


async def test_one_bad_item_fails_alone_and_its_batch_mates_are_answered(compute):
    engine = ThreadRecorder()
    loop_ = compute(engine, max_batch=8)
    works = [work(obs("go")), work(obs("poison")), work(obs("go"))]
    out = await run(loop_, works)
    assert [w.error is None for w in out] == [True, False, True]
    assert out[1].error.code is Code.INTERNAL and "poisoned item" in str(out[1].error)
    assert all(w.actions is not None for w in (out[0], out[2]))


class SelfBatching(ThreadRecorder):
    """Reasons on its own thread and reports items one by one, like vLLM's continuous batching."""

    batches_reasoning_itself = True

    def submit_reasoning(self, items, done, yield_point=None):
        def run() -> None:
            for i, it in enumerate(items):
                time.sleep(0.02)
                done(i, NullEngine.reason_batch(self, [it])[0])

        threading.Thread(target=run, daemon=True).start()


async def test_input_the_engine_cannot_preprocess_is_invalid_argument_for_that_item_only(compute):
    engine = ThreadRecorder()
    loop_ = compute(engine)
    bad, good = await run(loop_, [work(obs("unreadable")), work(obs("go"))])
    assert bad.error.code is Code.INVALID_ARGUMENT and bad.error.field == "observation"
    assert "factor:28" in bad.error.message and good.error is None


async def test_the_expert_packs_items_whose_reasoning_finished_at_different_steps(compute):
    engine = SelfBatching()
    loop_ = compute(engine, expert_max_batch=8, expert_max_wait_s=1.0)
    out = await run(loop_, [work(obs(), seed=i + 1) for i in range(4)])
    assert all(w.error is None for w in out)
    assert [c for c in engine.calls if c[0] == "act"] == [("act", 4)]  # one expert batch, not four


async def test_with_reasoning_on_this_thread_a_reasoning_batch_goes_straight_to_the_expert(compute):
    engine = ThreadRecorder(reason_ms=5)
    loop_ = compute(engine, max_batch=2, expert_max_batch=8, expert_max_wait_s=1.0)
    out = await run(loop_, [work(obs(), seed=i + 1) for i in range(4)])
    assert all(w.error is None for w in out)
    assert engine.calls == [("reason", 2), ("act", 2), ("reason", 2), ("act", 2)]


async def test_a_deadline_passed_in_the_queue_is_never_computed(compute):
    engine = ThreadRecorder()
    loop_ = compute(engine)
    w = work(obs())
    w.deadline = time.monotonic() - 1
    [out] = await run(loop_, [w])
    assert out.error.code is Code.DEADLINE_EXCEEDED and engine.calls == []


async def test_withdraw_takes_back_only_what_no_batch_has_taken(compute):
    engine = ThreadRecorder()
    gate = threading.Event()
    original = engine.reason_batch

    def gated(items, yield_point=None):
        gate.wait(10)
        return original(items, yield_point)

    engine.reason_batch = gated
    loop_ = compute(engine, max_batch=1)
    first, second = work(obs()), work(obs())
    aloop = asyncio.get_running_loop()
    futs = []
    for w in (first, second):
        f = aloop.create_future()
        w.on_done = lambda w, f=f: f.set_result(w)
        futs.append(f)
        loop_.put(w)
    for _ in range(500):
        if first.status != "queued":
            break
        await asyncio.sleep(0.01)
    assert not loop_.withdraw(first)  # computing
    assert loop_.withdraw(second)  # still queued
    gate.set()
    assert (await asyncio.wait_for(futs[0], 10)).actions is not None
    assert second.status == "withdrawn" and not futs[1].done()


async def test_a_background_decode_gives_way_to_a_waiting_batch_between_tokens(compute):
    engine = ThreadRecorder(reason_ms=400, prefill_ms=0, decode_steps=40)
    loop_ = compute(engine)
    aloop = asyncio.get_running_loop()
    order: list[str] = []
    bg_done, fg_done = aloop.create_future(), aloop.create_future()
    bg = work(obs(), act=False)
    bg.on_done = lambda w: (order.append("refresh"), bg_done.set_result(w))
    loop_.put(bg)
    for _ in range(500):  # until the decode is under way
        if bg.status == "running":
            break
        await asyncio.sleep(0.005)
    fg = work(obs(), reasoning="cached text")
    fg.on_done = lambda w: (order.append("chunk"), fg_done.set_result(w))
    loop_.put(fg)
    await asyncio.wait_for(asyncio.gather(bg_done, fg_done), 10)
    assert order == ["chunk", "refresh"]  # the chunk did not wait for the 40-token decode
    assert len(engine.threads) == 1  # ...and ran on the decode's own thread, between two of its tokens
    assert bg.reasoning_result.decoded and not fg.reasoning_result.decoded
    assert bg.actions is None and fg.actions is not None


def test_available_cores_is_at_least_one_and_at_most_the_affinity():
    import os

    n = available_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
