"""Isolation on the vLLM engine: while an attacker's well-formed observations fail inside the engine, none
of the victims' observations batched with them fails (the vLLM half of tests/server/test_isolation.py).

The engine is a subclass of the real VllmEngine sharing the session engine's vLLM, with the same fault
injection as the null and torch tests (FaultInjection, keyed by what the attacker sends), except
where the vLLM engine differs:

* vLLM batches reasoning itself (`submit_reasoning` hands each item to the running batch and reports it
  alone), so the reasoning fault is per item: `_reason` runs the attacker's request in vLLM's batch with
  the victims' requests, then raises for it (recorded with the batch size vLLM ran it in);
* the plug that holds the compute thread while attackers and victims queue sits in `submit_reasoning`;
* `act_batch` raises for any expert batch holding EXPERT_SEED, so the compute loop must retry item by
  item; the expert stage waits for every reasoning request in flight (a long expert_max_wait), so the
  expert attacker shares an expert batch with the victims.

The rounds themselves (gRPC Infer, Stream and HTTP victims against preprocess, reasoning and expert
attackers) and the assertions are the null/torch test's `_attack`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

pytest.importorskip("vllm")
pytest.importorskip("chatvla.server.app", reason="chatvla.server is not available")

from serverkit import serve  # noqa: F401  (the fixture)

# tests/server/test_isolation.py, by name through the pytest pythonpath (tests/server precedes tests/vllm;
# pytest itself imports this file as tests.vllm.test_isolation in importlib mode, so the names differ).
from test_isolation import DEADLINE_MS, REASONING_MARK, FaultInjection, Injected, _attack

from chatvla.engines.base import ReasonItem
from chatvla.engines.vllm_engine import VllmEngine, VllmReasoningResult
from chatvla.wire.vocabulary import STAGE_REASONING

pytestmark = pytest.mark.vllm


class FaultyVllm(FaultInjection, VllmEngine):
    """The session's VllmEngine with faults injected; `close` and `set_threads` leave it as the other
    tests expect it (running, its threads untouched)."""

    def submit_reasoning(self, items: Sequence[ReasonItem], done, yield_point: Callable[[], None] | None = None
                         ) -> None:
        self.entered.release()
        assert self.gate.wait(timeout=120), "test gate never opened"
        super().submit_reasoning(items, done, yield_point)

    async def _reason(self, item: ReasonItem) -> VllmReasoningResult:
        res = await super()._reason(item)  # the attacker's request runs in vLLM's batch too
        bad = item.reasoning == REASONING_MARK
        self.record.append((STAGE_REASONING, res.batch_size, int(bad)))
        if bad:
            raise Injected("the model refuses this reasoning text")
        return res

    def set_threads(self, n: int) -> None:
        pass

    def close(self) -> None:
        self.on_step = None


@pytest.fixture
def faulty_vllm(vllm_engine) -> Iterator[FaultyVllm]:
    """A FaultyVllm that is the session engine under another class: the two share one attribute dict (its
    vLLM, event loop, expert, and `on_step`, which vLLM's stat logger calls on the session engine)."""
    engine = object.__new__(FaultyVllm)
    engine.__dict__ = vars(vllm_engine)
    before = set(engine.__dict__)
    engine._init_faults()
    try:
        yield engine
    finally:
        engine.gate.set()
        engine.on_step = None
        for name in set(engine.__dict__) - before:
            del engine.__dict__[name]


async def test_vllm_engine_isolates_failing_items(serve, faulty_vllm):  # noqa: F811  (the fixture)
    srv = await serve(engine=faulty_vllm, warmup=False, max_batch=8,
                      deadline_ms=DEADLINE_MS, expert_max_batch=8, expert_max_wait_ms=10_000)
    await _attack(srv)
