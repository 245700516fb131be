"""Entry points: ``register`` (group ``vllm.general_plugins``) runs once in every vLLM process;
``cpu_ray_platform`` (group ``vllm.platform_plugins``) runs earlier, while vLLM resolves its
platform in every process, Ray workers included."""

from __future__ import annotations

import os

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    request_amx_permission()
    # The plugin drives the V1 model runner (the CUDA build defaults to V2 from 0.33 on).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from . import vllm_api as V
    from .config import ARCH, DGemmaConfigHook

    V.ModelRegistry.register_model(ARCH, "dgemma_vllm.model.dgemma:DGemmaForBlockDiffusion")
    V.MODELS_CONFIG_MAP[ARCH] = DGemmaConfigHook
    if V.in_api_server_process():
        from . import drafts

        drafts.install()  # diffusion_stream_drafts on the OpenAI streaming endpoints
        from . import tool_parser

        tool_parser.install()  # --tool-call-parser gemma4 enforces required / named tools
        from . import lora_endpoints

        lora_endpoints.install()  # a bad adapter on /v1/load_lora_adapter is a 400
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from . import attention  # noqa: F401  (registers the canvas-aware CPU backend)
    except ImportError:
        pass


def request_amx_permission() -> bool:
    """Ask the Linux kernel for AMX tile state in this process where the CPU has AMX tiles
    (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, through torch's ``torch.cpu._init_amx``). vLLM's CPU
    build runs AMX kernels for bf16 (attention ``isa="amx"``, GEMMs, MoE) without asking, and a
    process that was never granted the state dies of SIGILL at its first tile instruction (seen
    on Linux 6.x). Idempotent; True where permission is held. Runs in every vLLM process: the
    plugin entry point is loaded in each."""
    try:
        import torch

        if not torch.cpu._is_amx_tile_supported():
            return False
        return bool(torch.cpu._init_amx())
    except (AttributeError, RuntimeError, OSError):
        return False


def cpu_ray_platform() -> None:
    """Let vLLM's Ray executors run on the CPU build (tensor parallelism over Ray workers).

    vLLM 0.32's CPU platform has no ``ray_device_key``, and both Ray executors refuse it
    (v1/executor/ray_utils.py:574, ray_executor_v2.py). With the key ``"GPU"`` they place one
    worker per logical Ray "GPU": start the cluster with ``num_gpus`` = the number of ranks
    (``ray start --head --num-gpus 2`` / ``ray.init(num_gpus=2)``); the ``CUDA_VISIBLE_DEVICES`` Ray
    sets has no effect on CPU. Imports only the CPU platform class (no model code: this runs
    during platform detection). Returns None, so vLLM's own platform choice stands."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:  # CUDA build: its platform has a Ray key already
        return None
    if not getattr(CpuPlatform, "ray_device_key", ""):
        CpuPlatform.ray_device_key = "GPU"
    return None
