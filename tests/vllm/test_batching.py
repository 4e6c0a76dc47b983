"""Continuous batching: concurrent `reason_async` calls share vLLM forward passes, and that is measured
(per-step running requests via `on_step` / `batch_stats`, per-result `batch_size`) without changing
any token or hidden state."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("vllm")

from vllmkit import max_diff, observations

from chatvla.engines.base import ReasonItem

pytestmark = pytest.mark.vllm


async def test_concurrent_requests_are_batched_and_unchanged(vllm_engine):
    obs = observations(vllm_engine.info.profile, 8, seed=71)
    items = [ReasonItem(vllm_engine.preprocess(o)) for o in obs]
    sequential = [await vllm_engine.reason_async(it) for it in items]
    assert all(r.batch_size == 1 for r in sequential)

    seen: list[int] = []
    vllm_engine.reset_batch_stats()
    vllm_engine.on_step = seen.append
    try:
        concurrent = await asyncio.gather(*(vllm_engine.reason_async(it) for it in items))
    finally:
        vllm_engine.on_step = None
    stats = vllm_engine.batch_stats()
    assert max(r.batch_size for r in concurrent) > 1
    assert stats["max"] > 1 and max(seen) == stats["max"] and len(seen) == stats["steps"]
    assert stats["mean"] > 1.5, stats
    for s, c in zip(sequential, concurrent):
        assert c.token_ids == s.token_ids
        assert max_diff(c.hidden, s.hidden) < 1e-4


async def test_late_arrivals_join_the_running_batch(vllm_engine):
    """Requests that arrive while others are decoding are scheduled into the running decode steps."""
    obs = observations(vllm_engine.info.profile, 4, seed=81)
    items = [ReasonItem(vllm_engine.preprocess(o)) for o in obs]
    # The others arrive once the first is decoding (its first engine step), not after a fixed sleep:
    # on a fast CPU a 12-token decode is over in ~30 ms, before a sleep-staggered arrival.
    started = _first_step(vllm_engine)
    try:
        first = asyncio.ensure_future(vllm_engine.reason_async(items[0]))
        await asyncio.wait_for(started.wait(), 60)
        rest = await asyncio.gather(*(vllm_engine.reason_async(it) for it in items[1:]))
        results = [await first, *rest]
    finally:
        vllm_engine.on_step = None
    assert results[-1].batch_size > 1, [r.batch_size for r in results]


def _first_step(engine) -> asyncio.Event:
    """An event set at the engine's next decoding step (its step hook may run on another thread)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    engine.on_step = lambda _n: loop.call_soon_threadsafe(event.set)
    return event


async def test_cancelled_request_is_aborted_and_leaves_no_rows(vllm_engine):
    obs = observations(vllm_engine.info.profile, 1, seed=91)
    started = _first_step(vllm_engine)
    try:
        task = asyncio.ensure_future(vllm_engine.reason_async(ReasonItem(vllm_engine.preprocess(obs[0]))))
        await asyncio.wait_for(started.wait(), 60)  # cancelled mid-decode, however fast the machine
        task.cancel()
    finally:
        vllm_engine.on_step = None
    with pytest.raises(asyncio.CancelledError):
        await task
    # the engine still serves, and nothing of the cancelled request stays in the capture store
    r = await vllm_engine.reason_async(ReasonItem(vllm_engine.preprocess(obs[0])))
    assert len(r.token_ids) >= 1
    pending = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
        vllm_engine._llm.collective_rpc("chatvla_capture_pending"), vllm_engine._loop))
    assert pending == [0]
