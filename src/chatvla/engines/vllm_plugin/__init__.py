"""vLLM plugin: the out-of-tree ChatVLA-2 model classes and the hidden-state capture.

vLLM calls `register()` (entry point `vllm.general_plugins: chatvla`, see pyproject.toml) in every
process it starts (front end, engine core, workers), so the architecture names below resolve there
too. Registration is lazy (a "module:Class" string): nothing here imports vLLM or torch until vLLM
itself asks for the class, and `import chatvla.engines` never imports vLLM.

    ChatVLA2ForConditionalGeneration    the checkpoint's architecture: Qwen2-VL + ChatVLA MoE MLPs
    ChatVLA2HiddenCapture               the same + last-layer hidden-state capture during generation
                                        (selected by the engine with hf_overrides; needs the worker
                                        extension `chatvla.engines.vllm_plugin.capture.HiddenStateWorkerExtension`)
"""

from __future__ import annotations

ARCHITECTURE = "ChatVLA2ForConditionalGeneration"
CAPTURE_ARCHITECTURE = "ChatVLA2HiddenCapture"
WORKER_EXTENSION = "chatvla.engines.vllm_plugin.capture.HiddenStateWorkerExtension"

_CLASSES = {
    ARCHITECTURE: "chatvla.engines.vllm_plugin.model:ChatVLA2ForConditionalGeneration",
    CAPTURE_ARCHITECTURE: "chatvla.engines.vllm_plugin.capture:ChatVLA2HiddenCapture",
}


def register() -> None:
    """Register the ChatVLA-2 architectures with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch, target in _CLASSES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
