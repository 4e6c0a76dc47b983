"""Last-layer hidden states captured during generation, inside vLLM's worker process.

`ChatVLA2HiddenCapture` is the ChatVLA-2 model whose `forward` also keeps, for every request in the
batch, the rows it computed: the final-norm output of each token fed to the model (prompt tokens at
prefill, each fed-back reasoning token at decode). `HiddenStateWorkerExtension` is mixed into vLLM's
worker (`worker_extension_cls`) so the engine can fetch those rows with `collective_rpc`.

Rows are stored by sequence position (the request's computed-token count when the chunk ran + the
row's offset in the chunk), so chunked prefill lands in place and a preempted request that is
recomputed overwrites its rows instead of duplicating them. A result with a gap is reported as
incomplete and the engine falls back to a pooling pass (it never guesses).

Limits: this reads vLLM V1 model-runner state (`input_batch.req_ids`, `input_batch.num_reqs`,
`input_batch.num_computed_tokens_cpu`, `query_start_loc.np`), checked against vLLM 0.32.0 (pinned);
prefix caching must be off (cached prefix tokens are never computed, so their rows would be missing:
the coverage check would catch it); the Python `forward` must run every step, i.e. eager mode or
piecewise CUDA graphs, not full-model CUDA graphs (docs/deployment-gpu.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from chatvla.engines.vllm_plugin.model import ChatVLA2ForConditionalGeneration

# Rows of requests nobody fetched (a crashed caller) are dropped after this long.
STALE_AFTER_S = 600.0


@dataclass
class _Rows:
    chunks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start position, [n, H] float32)
    max_batch: int = 0  # most requests that shared one forward pass with this one
    steps: int = 0
    touched: float = field(default_factory=time.monotonic)

    def assemble(self) -> torch.Tensor | None:
        """[num_positions, H] with later chunks winning, or None if some position was never computed."""
        if not self.chunks:
            return None
        end = max(s + t.shape[0] for s, t in self.chunks)
        out = torch.empty(end, self.chunks[0][1].shape[1], dtype=torch.float32)
        covered = np.zeros(end, dtype=bool)
        for s, t in self.chunks:
            out[s:s + t.shape[0]] = t
            covered[s:s + t.shape[0]] = True
        return out if covered.all() else None


class HiddenStateCaptureMixin:
    """Put before the model class in the bases; `forward` must return the final-norm hidden states."""

    _chatvla_runner = None  # the worker's model runner, set by HiddenStateWorkerExtension
    _chatvla_store: dict[str, _Rows]
    _chatvla_closed: dict[str, float]  # engine ids already fetched: a last step after that is not kept

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hs = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if self._chatvla_runner is not None and isinstance(hs, torch.Tensor):
            self._chatvla_record(hs)
        return hs

    def _chatvla_record(self, hs: torch.Tensor) -> None:
        runner = self._chatvla_runner
        batch = runner.input_batch
        n = int(batch.num_reqs)
        if n <= 0:
            return
        qsl = runner.query_start_loc.np[: n + 1]
        total = int(qsl[-1])
        if total <= 0 or total > hs.shape[0]:
            return  # a dummy / profiling run, or a layout this code does not know: record nothing
        rows = hs[:total].detach().to("cpu", torch.float32)
        computed = batch.num_computed_tokens_cpu
        now = time.monotonic()
        store = self._chatvla_store
        for i, rid in enumerate(batch.req_ids[:n]):
            a, b = int(qsl[i]), int(qsl[i + 1])
            if b <= a or rid is None or rid in self._chatvla_closed:
                continue
            entry = store.get(rid)
            if entry is None:
                entry = store[rid] = _Rows()
            entry.chunks.append((int(computed[i]), rows[a:b].clone()))
            entry.max_batch = max(entry.max_batch, n)
            entry.steps += 1
            entry.touched = now


class ChatVLA2HiddenCapture(HiddenStateCaptureMixin, ChatVLA2ForConditionalGeneration):
    """ChatVLA-2 + hidden-state capture (selected with hf_overrides={"architectures": [this name]})."""


def _matches(engine_id: str, wanted: str) -> bool:
    # AsyncLLM adds a suffix to the caller's request id inside the engine ("abc" -> "abc-1f2e3d4c").
    return engine_id == wanted or engine_id.startswith(wanted + "-")


class HiddenStateWorkerExtension:
    """Methods vLLM mixes into its worker; called through `collective_rpc("chatvla_capture_*")`.

    Return values cross a process boundary as msgpack: arrays travel as (shape, float32 bytes)."""

    def _chatvla_model(self):
        return self.model_runner.get_model()

    def chatvla_capture_install(self) -> bool:
        model = self._chatvla_model()
        if not isinstance(model, HiddenStateCaptureMixin):
            return False
        model._chatvla_store = {}
        model._chatvla_closed = {}
        model._chatvla_runner = self.model_runner
        return True

    def chatvla_capture_pop(self, req_ids: list[str]) -> dict[str, tuple | None]:
        """{caller id: (shape, bytes, max_batch, steps)} or None for incomplete rows; removes them."""
        model = self._chatvla_model()
        store = model._chatvla_store
        out: dict[str, tuple | None] = {}
        for key in list(store):
            wanted = next((r for r in req_ids if _matches(key, r)), None)
            if wanted is None:
                continue
            entry = store.pop(key)
            model._chatvla_closed[key] = time.monotonic()
            rows = entry.assemble()
            out[wanted] = None if rows is None else (
                list(rows.shape), rows.numpy().tobytes(), entry.max_batch, entry.steps)
        self._chatvla_drop_stale(model)
        return out

    def chatvla_capture_drop(self, req_ids: list[str]) -> int:
        model = self._chatvla_model()
        keys = [k for k in model._chatvla_store if any(_matches(k, r) for r in req_ids)]
        for k in keys:
            del model._chatvla_store[k]
            model._chatvla_closed[k] = time.monotonic()
        return len(keys)

    def chatvla_capture_pending(self) -> int:
        return len(self._chatvla_model()._chatvla_store)

    @staticmethod
    def _chatvla_drop_stale(model) -> None:
        limit = time.monotonic() - STALE_AFTER_S
        for k in [k for k, v in model._chatvla_store.items() if v.touched < limit]:
            del model._chatvla_store[k]
        for k in [k for k, t in model._chatvla_closed.items() if t < limit]:
            del model._chatvla_closed[k]
