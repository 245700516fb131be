"""The dynamic LoRA endpoint's errors as the client's (API server process only).

``POST /v1/load_lora_adapter`` answers 500 ("InternalServerError") for every adapter the engine
cannot load except a missing one (vLLM 0.32, entrypoints/openai/models/serving.py). An adapter
whose rank is above ``--max-lora-rank``, whose tensors are missing, misnamed or of the wrong
shape, or which targets a module the model takes no adapter for (dgemma_vllm/model/lora.py) is
the request's fault: the plugin answers those with 400 and the engine's message, which names the
module or the setting. Other failures stay 500.
"""

from __future__ import annotations

import functools

from . import vllm_api as V

# what the worker's refusal says (vLLM's own checks, and dgemma_vllm.model.lora.AdapterError)
CLIENT_FAULTS = ("is greater than max_lora_rank", "LoRA adapter '", "expected target modules",
                 "doesn't contain tensors")


def is_client_fault(message: str) -> bool:
    return "Call to add_lora method failed" in message and any(s in message for s in CLIENT_FAULTS)


def install() -> None:
    cls = V.lora_serving_models_class()
    orig = cls.load_lora_adapter
    if getattr(orig, "_dgemma", False):
        return

    @functools.wraps(orig)
    async def load_lora_adapter(self, request, *args, **kwargs):
        out = await orig(self, request, *args, **kwargs)
        err = getattr(out, "error", None)
        if err is not None and err.code == 500 and is_client_fault(err.message or ""):
            err.code = 400
            err.type = "BadRequestError"
        return out

    load_lora_adapter._dgemma = True
    cls.load_lora_adapter = load_lora_adapter
