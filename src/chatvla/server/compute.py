"""One compute team: every model call of the server runs on one thread, one stage batch at a time.

Why one thread: torch's OpenMP pool belongs to the thread that calls it. With one thread per stage,
two thread teams fight for the same cores (measured on a 2-core machine: every call 2-3x slower than
the model's own speed), and on a GPU the stages share one device anyway. So the stages take turns
on one thread that owns every core (`set_threads`), and throughput comes from batching.

Hand-offs: the scheduler puts a `Work` here once (`put`, from the event loop); the compute thread
preprocesses it, runs reasoning and then the expert, and hands it back once (`Work.on_done`, run on
the event loop). Reasoning results move to the expert queue on this thread, with no trip through the
event loop, so with nothing else queued an observation runs reason -> act back to back.

Batch formation: a reasoning batch goes straight on to the expert (reasoning on this thread could
only delay those chunks). With an engine that reasons on its own threads (vLLM), the expert waits up
to `expert_max_wait_s` for reasoning still running there, so items whose reasoning finished at
different steps share one expert batch. Reasoning waits up to `max_wait_s` (counted from when the
thread became free) for a fuller batch only while `more_coming()` says robots are about to send
(sessions with nothing in flight: closed-loop robots that just got their chunk), so a fleet does not
split into cohorts that take turns with half-full batches.

A background reasoning refresh (`Work.act = False`) decodes on the same thread when no batch is
waiting; between its tokens (`yield_point`) the thread runs any batch that has become ready, so a
refresh costs a waiting chunk at most one token step, and torch still sees one calling thread (a
second one would get its own OpenMP team and slow every call down). Engines that batch reasoning
themselves (vLLM) take background decodes into their own running batch instead.

The thread is the single worker of `compute_executor()`: the server loads and warms the engine on it
too, so no other thread ever enters torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatvla.engines.base import ActItem, Engine, EngineObservation, ReasoningResult, ReasonItem
from chatvla.server.errors import Code, ServeError
from chatvla.wire.vocabulary import STAGE_EXPERT, STAGE_REASONING

log = logging.getLogger("chatvla.server")

# A work is QUEUED for reasoning (withdrawable), RUNNING, REASONED (queued for the expert), then DONE.
QUEUED, RUNNING, REASONED, DONE, WITHDRAWN = "queued", "running", "reasoned", "done", "withdrawn"


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


@dataclass(frozen=True)
class ComputeConfig:
    max_batch: int = 8
    max_wait_s: float = 0.005
    expert_max_batch: int = 8
    expert_max_wait_s: float = 0.005


@dataclass(eq=False)
class Work:
    """One observation's way through the model. Fields below `on_reasoned` are written by the
    compute side and read on the event loop only after `on_done` (the hand-back)."""

    obs: EngineObservation
    seed: int | None  # None: zero noise (ActItem.seed)
    deadline: float  # time.monotonic() instant; checked when a batch is formed
    on_done: Callable[[Work], None]
    act: bool = True  # False: reasoning only (a background refresh)
    reasoning: str | None = None  # given text to pre-fill, or None to decode
    reasoning_token_ids: tuple[int, ...] | None = None
    source: Work | None = None  # share preprocessing with this work (same observation)
    on_reasoned: Callable[[Work], None] | None = None  # on the event loop, once the text exists
    prepared: Any = field(default=None, repr=False)
    reasoning_result: ReasoningResult | None = field(default=None, repr=False)
    actions: np.ndarray | None = field(default=None, repr=False)
    error: ServeError | None = None
    preprocess_s: float = 0.0
    reasoning_s: float = 0.0
    expert_s: float = 0.0
    reasoning_batch: int = 0
    expert_batch: int = 0
    reasoned_at: float = 0.0  # time.monotonic() when the reasoning was ready
    status: str = QUEUED
    queued_at: float = 0.0


def compute_executor() -> ThreadPoolExecutor:
    """The one thread that runs model code: engine loading, warm-up, then the compute loop."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatvla-compute")


def _as_serve_error(exc: BaseException, stage: str) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    return ServeError(Code.INTERNAL, f"{stage} failed: {type(exc).__name__}: {exc}")


class ComputeLoop:
    """The compute thread and its two queues. `put`/`withdraw`/`close` are called from the event loop."""

    def __init__(
        self,
        engine: Engine,
        config: ComputeConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        on_depth: Callable[[str, int], None] = lambda stage, n: None,
        on_batch: Callable[[str, int], None] = lambda stage, n: None,
        more_coming: Callable[[], bool] = lambda: False,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self._loop = loop
        self._on_depth = on_depth
        self._on_batch = on_batch
        self._more_coming = more_coming
        self._self_batching = engine.batches_reasoning_itself
        p = engine.info.profile
        self._chunk_shape = (p.chunk_size, p.action_dim)
        self._cv = threading.Condition()
        self._reason_q: deque[Work] = deque()
        self._act_q: deque[Work] = deque()
        self._bg_q: deque[Work] = deque()
        self._engine_pending = 0  # reasoning items handed to a self-batching engine, not yet back
        self._stopping = False
        self._own_executor = executor is None
        self._executor = executor or compute_executor()
        self._main_done: Future | None = None
        self._in_decode = False  # a background decode is running (its yield points run batches)
        self._free_since = 0.0  # time.monotonic() when the last batch finished

    # --- event-loop side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._main_done = self._executor.submit(self._main)

    def put(self, work: Work) -> None:
        """The one hand-off in. Never blocks."""
        with self._cv:
            if self._stopping:
                raise ServeError(Code.UNAVAILABLE, "server is shutting down", reason="draining")
            work.status, work.queued_at = QUEUED, time.monotonic()
            if not work.act and not self._self_batching:
                self._bg_q.append(work)
            else:
                self._reason_q.append(work)
                self._on_depth(STAGE_REASONING, len(self._reason_q))
            self._cv.notify_all()

    def withdraw(self, work: Work) -> bool:
        """Take back a work that no batch has taken yet; False if it is already computing."""
        with self._cv:
            if work.status != QUEUED:
                return False
            for q in (self._reason_q, self._bg_q):
                try:
                    q.remove(work)
                except ValueError:
                    continue
                break
            work.status = WITHDRAWN
            self._on_depth(STAGE_REASONING, len(self._reason_q))
            return True

    @property
    def depth(self) -> int:
        return len(self._reason_q) + len(self._act_q)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the running batch, then answer everything still queued UNAVAILABLE. Blocking."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._main_done is not None:
            with contextlib.suppress(Exception):
                self._main_done.result(timeout)
        if self._own_executor:
            self._executor.shutdown(wait=False)
        with self._cv:
            left = [*self._reason_q, *self._act_q, *self._bg_q]
            self._reason_q.clear()
            self._act_q.clear()
            self._bg_q.clear()
        for w in left:
            self._fail(w, ServeError(Code.UNAVAILABLE, "server is shutting down"))

    # --- the compute thread ------------------------------------------------------------------------

    def _main(self) -> None:
        while True:
            with self._cv:
                stage, batch = self._next_batch(block=True)
            if stage is None:
                return
            self._run(stage, batch)

    def _run(self, stage: str, batch: list[Work]) -> None:
        if not batch:
            return
        try:
            self._run_stage(stage, batch)
        finally:
            self._free_since = time.monotonic()

    def _run_stage(self, stage: str, batch: list[Work]) -> None:
        try:
            if stage == STAGE_REASONING:
                self._run_reasoning(batch, None)
            elif stage == STAGE_EXPERT:
                self._run_expert(batch)
            else:  # a background refresh: waiting batches run between its tokens
                self._in_decode = True
                try:
                    self._run_reasoning(batch, self._yield_point)
                finally:
                    self._in_decode = False
        except Exception:  # a bug here must not stop the thread every robot depends on
            log.exception("compute batch failed")
            for w in batch:
                if w.status == RUNNING:
                    self._fail(w, ServeError(Code.INTERNAL, f"{stage} stage failed"))

    def _yield_point(self) -> None:
        """Between two tokens of a background decode: run one batch that is ready, if any."""
        with self._cv:
            stage, batch = self._next_batch(block=False)
        if stage is not None:
            self._run(stage, batch)

    def _next_batch(self, block: bool) -> tuple[str | None, list[Work]]:
        """Called holding the lock: the next batch to run. `block`: wait until there is one (None
        when stopping); otherwise return (None, []) at once if none is ready (no background decodes
        then: one runs at a time)."""
        c = self.config
        while True:
            if self._stopping:
                return None, []
            now = time.monotonic()
            r, a = self._reason_q, self._act_q
            if r and self._self_batching:
                return STAGE_REASONING, self._take(r, len(r), STAGE_REASONING, now)
            # Only reasoning that runs elsewhere (a self-batching engine) can add to a waiting expert
            # batch; reasoning that would run on this thread would only delay the waiting chunks.
            if a and (len(a) >= c.expert_max_batch or self._engine_pending == 0
                      or now - a[0].queued_at >= c.expert_max_wait_s):
                return STAGE_EXPERT, self._take(a, c.expert_max_batch, STAGE_EXPERT, now)
            timeout = a[0].queued_at + c.expert_max_wait_s - now if a else None
            if r:
                # Wait from when this thread became free, not from the oldest arrival: robots that
                # just got their chunks send their next observation within a few milliseconds.
                remaining = max(r[0].queued_at, self._free_since) + c.max_wait_s - now
                if a or len(r) >= c.max_batch or remaining <= 0 or not self._more_coming():
                    return STAGE_REASONING, self._take(r, c.max_batch, STAGE_REASONING, now)
                timeout = remaining if timeout is None else min(timeout, remaining)
            if block and self._bg_q and not self._in_decode:
                return "refresh", self._take(self._bg_q, c.max_batch, "refresh", now)
            if not block:
                return None, []
            self._cv.wait(timeout)

    def _take(self, q: deque[Work], n: int, stage: str, now: float) -> list[Work]:
        batch: list[Work] = []
        while q and len(batch) < n:
            w = q.popleft()
            if w.status not in (QUEUED, REASONED):
                continue
            if now >= w.deadline:
                w.status = RUNNING
                self._fail(w, ServeError(Code.DEADLINE_EXCEEDED, f"deadline passed while queued for {stage}"))
                continue
            w.status = RUNNING
            batch.append(w)
        if stage != "refresh":
            self._on_depth(stage, len(q))
        return batch

    def _prepare(self, w: Work) -> Any:
        src = w.source
        if src is not None and src.prepared is not None:
            return src.prepared
        t0 = time.perf_counter()
        try:
            prepared = self.engine.preprocess(w.obs)
        finally:
            w.preprocess_s = time.perf_counter() - t0
        if src is not None and src.prepared is None:
            src.prepared = prepared
        return prepared

    def _run_reasoning(self, batch: list[Work], yield_point: Callable[[], None] | None) -> None:
        ready: list[Work] = []
        for w in batch:
            try:
                if w.prepared is None:
                    w.prepared = self._prepare(w)
                ready.append(w)
            except ValueError as e:  # the engine cannot take this input (e.g. an image its processor refuses)
                self._fail(w, ServeError(Code.INVALID_ARGUMENT, f"the model cannot take it: {str(e)[:200]}",
                                         "observation"))
            except Exception as e:
                self._fail(w, _as_serve_error(e, "preprocess"))
        if not ready:
            return
        items = [ReasonItem(w.prepared, w.reasoning, w.reasoning_token_ids) for w in ready]
        if not self._self_batching:  # a self-batching engine reports its own forward passes (`on_step`)
            self._on_batch(STAGE_REASONING, len(items))
        t0 = time.perf_counter()
        if self._self_batching:
            with self._cv:
                self._engine_pending += len(ready)

            def done_async(i: int, res: ReasoningResult | BaseException) -> None:
                with self._cv:
                    self._engine_pending -= 1
                self._reasoned(ready[i], res, time.perf_counter() - t0, 0)

            self.engine.submit_reasoning(items, done_async)
            return
        results: dict[int, ReasoningResult | BaseException] = {}
        kwargs = {} if yield_point is None else {"yield_point": yield_point}
        self.engine.submit_reasoning(items, results.__setitem__, **kwargs)
        seconds = time.perf_counter() - t0
        for i, w in enumerate(ready):
            self._reasoned(w, results.get(i, RuntimeError("the engine gave no result")), seconds, len(ready))

    def _reasoned(self, w: Work, res: ReasoningResult | BaseException, seconds: float, size: int) -> None:
        if isinstance(res, BaseException):
            self._fail(w, _as_serve_error(res, STAGE_REASONING))
            return
        w.reasoning_result, w.reasoning_s, w.reasoned_at = res, seconds, time.monotonic()
        w.reasoning_batch = size or res.batch_size or 1
        if w.on_reasoned is not None and w.act:
            self._call_on_loop(w.on_reasoned, w)
        if not w.act:
            w.status = DONE
            self._call_on_loop(w.on_done, w)
            return
        with self._cv:
            w.queued_at, w.status = time.monotonic(), REASONED
            self._act_q.append(w)
            self._on_depth(STAGE_EXPERT, len(self._act_q))
            self._cv.notify_all()

    def _run_expert(self, batch: list[Work]) -> None:
        self._on_batch(STAGE_EXPERT, len(batch))
        t0 = time.perf_counter()
        outs = self._act(batch)
        seconds = time.perf_counter() - t0
        for w, out in zip(batch, outs):
            if isinstance(out, BaseException):
                self._fail(w, _as_serve_error(out, STAGE_EXPERT))
                continue
            w.actions, w.expert_s, w.expert_batch = out, seconds, len(batch)
            w.status = DONE
            self._call_on_loop(w.on_done, w)

    def _act(self, batch: Sequence[Work]) -> list[np.ndarray | BaseException]:
        """Actions per work; if the batch fails, each work is retried alone (one bad item fails only itself)."""
        items = [ActItem(w.reasoning_result, w.obs.state, w.seed) for w in batch]  # type: ignore[arg-type]
        try:
            outs = self.engine.act_batch(items)
            if len(outs) != len(items):
                raise RuntimeError(f"act_batch returned {len(outs)} chunks for {len(items)} items")
            return [self._check(a) for a in outs]
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        results: list[np.ndarray | BaseException] = []
        for it in items:
            try:
                results.append(self._check(self.engine.act_batch([it])[0]))
            except Exception as e:
                results.append(e)
        return results

    def _check(self, actions: Any) -> np.ndarray | BaseException:
        """Never send a robot garbage: wrong shape or non-finite actions become INTERNAL errors."""
        a = np.asarray(actions, dtype=np.float32)
        if a.shape != self._chunk_shape:
            return ServeError(Code.INTERNAL, f"engine returned actions of shape {a.shape}")
        if not np.isfinite(a).all():
            return ServeError(Code.INTERNAL, "engine returned non-finite actions")
        return a

    # --- hand-back -----------------------------------------------------------------------------------

    def _fail(self, w: Work, err: ServeError) -> None:
        w.error, w.status = err, DONE
        self._call_on_loop(w.on_done, w)

    def _call_on_loop(self, fn: Callable[[Work], None], w: Work) -> None:
        # RuntimeError: the event loop is closed, so nobody is waiting for this answer any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, w)
