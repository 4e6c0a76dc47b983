"""An asyncio micro-batcher: gathers items from many coroutines into batches for one sync function.

Why this shape: model stages are synchronous, GIL-releasing calls (torch) that get cheaper per item
in a batch. Each stage owns one worker thread, so the event loop never blocks on compute and the
reasoning of batch k+1 overlaps the expert of batch k. While a batch runs, new items pile up in the
queue and form the next batch at once, so batching grows with load without any tuning; `max_wait`
only matters at low load, where it trades a little latency for a fuller batch.

Items are admitted against a bound (the queue never grows without limit), carry an optional
deadline (expired items are refused when a batch is formed, never computed), and can be cancelled
while queued (a superseded observation simply drops out).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from chatvla.server.errors import Code, ServeError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchStats:
    """How the batch an item ran in went: its size and its compute time (seconds)."""

    size: int
    seconds: float


class _Entry(Generic[T]):
    __slots__ = ("deadline", "enqueued", "future", "on_start", "payload")

    def __init__(self, payload: T, future: asyncio.Future, deadline: float | None, on_start: Any) -> None:
        self.payload = payload
        self.future = future
        self.deadline = deadline
        self.on_start = on_start
        self.enqueued = time.monotonic()


class MicroBatcher(Generic[T, R]):
    """Batches `submit`ted payloads into calls of `fn(list[T]) -> list[R]` on a dedicated thread."""

    def __init__(
        self,
        name: str,
        fn: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_depth: Callable[[int], None] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_s >= 0")
        self.name = name
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_depth = on_depth or (lambda n: None)
        self._on_batch = on_batch or (lambda s: None)
        # Waiting only pays if another item can arrive within max_wait; the owner knows whether
        # any is on its way (e.g. being preprocessed). Without a hint, assume one might be.
        self._more_coming = more_coming or (lambda: True)
        self._queue: deque[_Entry[T]] = deque()
        self._wakeup = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chatvla-{name}")
        self._task: asyncio.Task | None = None
        self._busy = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop forming batches; queued items get UNAVAILABLE. The running batch finishes first."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            e = self._queue.popleft()
            if not e.future.done():
                e.future.set_exception(ServeError(Code.UNAVAILABLE, "server is shutting down"))
        self._on_depth(0)
        self._thread.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(
        self, payload: T, *, deadline: float | None = None, on_start: Callable[[], None] | None = None
    ) -> asyncio.Future:
        """Queue one item; the future resolves to `(result, BatchStats)`.

        `deadline` is a `time.monotonic()` instant; `on_start` runs (on the loop) when the item is
        taken into a batch, i.e. the moment it can no longer be withdrawn. Cancelling the future
        while it is queued withdraws the item.
        """
        if len(self._queue) >= self.max_queue:
            raise ServeError(Code.RESOURCE_EXHAUSTED, f"{self.name} queue is full ({self.max_queue})")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = _Entry(payload, fut, deadline, on_start)
        self._queue.append(entry)
        fut.add_done_callback(lambda f, e=entry: self._withdraw(e))
        self._on_depth(len(self._queue))
        self._wakeup.set()
        return fut

    def _withdraw(self, entry: _Entry[T]) -> None:
        if entry.future.cancelled():
            try:
                self._queue.remove(entry)
            except ValueError:
                return
            self._on_depth(len(self._queue))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait until the batch is full or the oldest item has waited max_wait, as long as
            # more items are on their way.
            while len(self._queue) < self.max_batch and self._more_coming():
                remaining = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                if not self._queue:
                    break
            batch = self._take()
            if not batch:
                continue
            self._busy = True
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._thread, self._fn, [e.payload for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name} returned {len(results)} results for {len(batch)} items")
                error: BaseException | None = None
            except Exception as exc:  # the engine failed this batch; the server carries on
                results, error = [], exc
            finally:
                self._busy = False
            stats = BatchStats(size=len(batch), seconds=time.perf_counter() - t0)
            self._on_batch(stats)
            for i, e in enumerate(batch):
                if e.future.done():
                    continue
                if error is not None:
                    e.future.set_exception(
                        ServeError(Code.INTERNAL, f"{self.name} stage failed: {type(error).__name__}: {error}")
                    )
                else:
                    e.future.set_result((results[i], stats))

    def _take(self) -> list[_Entry[T]]:
        now = time.monotonic()
        batch: list[_Entry[T]] = []
        while self._queue and len(batch) < self.max_batch:
            e = self._queue.popleft()
            if e.future.done():
                continue
            if e.deadline is not None and now >= e.deadline:
                e.future.set_exception(
                    ServeError(Code.DEADLINE_EXCEEDED, f"deadline passed while queued for {self.name}")
                )
                continue
            if e.on_start is not None:
                e.on_start()
            batch.append(e)
        self._on_depth(len(self._queue))
        return batch
