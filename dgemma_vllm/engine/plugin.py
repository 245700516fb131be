"""Entry point (group ``vllm.general_plugins``): runs once in every vLLM process."""

from __future__ import annotations

import os

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    # The plugin drives the V1 model runner (the CUDA build defaults to V2 from 0.33 on).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from . import vllm_api as V
    from .config import ARCH, DGemmaConfigHook

    V.ModelRegistry.register_model(ARCH, "dgemma_vllm.model.dgemma:DGemmaForBlockDiffusion")
    V.MODELS_CONFIG_MAP[ARCH] = DGemmaConfigHook
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from . import attention  # noqa: F401  (registers the canvas-aware CPU backend)
    except ImportError:
        pass
