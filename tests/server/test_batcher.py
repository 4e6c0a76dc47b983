"""MicroBatcher: batch formation, max wait, withdrawal, deadlines, bounds, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from chatvla.server.batcher import MicroBatcher
from chatvla.server.errors import Code, ServeError


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()

    def __call__(self, items):
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        return [x * 10 for x in items]


async def _batcher(fn, **kw) -> MicroBatcher:
    opts = {"max_batch": 4, "max_wait_s": 0.0, "max_queue": 16}
    opts.update(kw)
    b = MicroBatcher("test", fn, **opts)
    b.start()
    return b


async def test_items_queued_while_busy_form_one_batch_on_a_worker_thread():
    rec = Recorder()
    b = await _batcher(rec)
    rec.gate.clear()
    first = b.submit(0)
    while not b.busy:
        await asyncio.sleep(0.001)
    rest = [b.submit(i) for i in range(1, 7)]
    rec.gate.set()
    results = await asyncio.gather(first, *rest)
    assert [r for r, _ in results] == [i * 10 for i in range(7)]
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert results[1][1].size == 4
    assert rec.threads == {"chatvla-test_0"}  # never the event loop's thread
    await b.close()


async def test_max_wait_collects_a_batch_at_low_load():
    rec = Recorder()
    b = await _batcher(rec, max_wait_s=5.0)  # long wait: the batch leaves when full
    futs = [b.submit(i) for i in range(4)]
    await asyncio.gather(*futs)
    assert rec.batches == [[0, 1, 2, 3]]
    await b.close()


async def test_cancelled_items_are_withdrawn_and_expired_ones_refused():
    rec = Recorder()
    b = await _batcher(rec)
    rec.gate.clear()
    first = b.submit(0)
    while not b.busy:
        await asyncio.sleep(0.001)
    withdrawn = b.submit(1)
    expired = b.submit(2, deadline=time.monotonic() - 1)
    started: list[int] = []
    kept = b.submit(3, on_start=lambda: started.append(3))
    assert b.depth == 3
    withdrawn.cancel()
    await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    assert b.depth == 2
    rec.gate.set()
    await first
    assert (await kept)[0] == 30 and started == [3]
    with pytest.raises(ServeError) as e:
        await expired
    assert e.value.code is Code.DEADLINE_EXCEEDED
    assert rec.batches == [[0], [3]]
    await b.close()


async def test_queue_bound_and_failures():
    def boom(items):
        raise ValueError("bad batch")

    b = await _batcher(boom, max_queue=2, max_wait_s=10.0, max_batch=8)
    f1, f2 = b.submit(1), b.submit(2)
    with pytest.raises(ServeError) as e:
        b.submit(3)
    assert e.value.code is Code.RESOURCE_EXHAUSTED
    await b.close()  # queued items are refused, not lost
    for f in (f1, f2):
        with pytest.raises(ServeError) as e:
            await f
        assert e.value.code is Code.UNAVAILABLE
    b = await _batcher(boom)
    with pytest.raises(ServeError) as e:
        await b.submit(1)
    assert e.value.code is Code.INTERNAL and "bad batch" in e.value.message
    await b.close()


async def test_wrong_result_count_is_internal():
    b = await _batcher(lambda items: [1])
    futs = [b.submit(i) for i in range(3)]
    with pytest.raises(ServeError, match="returned 1 results"):
        await asyncio.gather(*futs)
    await b.close()
