"""Worker classes that install the plugin's runner (set as ``worker_cls`` by the config hook).

CPU: vLLM's CPUWorker builds a ``CPUModelRunner`` inside ``init_device``; the plugin replaces it
right after (weights are loaded later, in ``load_model``). GPU: ``Worker._make_model_runner`` is
vLLM's documented override point; the plugin returns its V1 runner there.
"""

from __future__ import annotations

import os

import torch
from vllm.platforms import current_platform

from . import vllm_api as V
from .runner import DGemmaRunnerMixin


def _runner_class(base):
    class DGemmaModelRunner(DGemmaRunnerMixin, base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._dg_setup()

    DGemmaModelRunner.__qualname__ = f"DGemma{base.__name__}"
    return DGemmaModelRunner


# Benchmark hook: DGEMMA_TWO_RPC_STEP=1 keeps vLLM's two RPCs per engine step (execute_model,
# then sample_tokens) for a before/after side by side (benchmarks/bench.py --alt-env)
_ONE_HOP = os.environ.get("DGEMMA_TWO_RPC_STEP", "0") != "1"


class _StageMixin:
    """Pipeline stages after the first take their intermediate tensors only once the step's plan
    has arrived from the last stage (vllm_api.deferred_pp_receive; runner._dg_pp_exchange)."""

    def dgemma_rank_info(self) -> dict:
        """Where this worker runs: its pipeline stage and tensor rank, process id, and Ray node
        (None outside Ray), for ``collective_rpc`` (placement checks)."""
        import os

        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"pp_rank": V.get_pp_group().rank_in_group,
                "tp_rank": V.get_tensor_model_parallel_rank(), "pid": os.getpid(), "node": node}

    def dgemma_image_features(self, pixel_values, pixel_position_ids, num_soft_tokens) -> list:
        """The served model's image features (``embed_multimodal``) for processor outputs given
        as nested lists, returned as nested lists (for ``collective_rpc``: feature checks)."""
        model = self.model_runner.get_model()
        with torch.no_grad():
            feats = model.embed_multimodal(
                pixel_values=torch.tensor(pixel_values),
                pixel_position_ids=torch.tensor(pixel_position_ids),
                num_soft_tokens=list(num_soft_tokens))
        return [f.float().tolist() for f in feats]

    def execute_model(self, scheduler_output):
        stages, first, _ = V.pp_ranks()
        if stages == 1:
            out = super().execute_model(scheduler_output)
            if _ONE_HOP and V.samples_in_execute_model(out, scheduler_output, self.vllm_config):
                # One hop per step instead of two: vLLM's engine core sends a second RPC
                # (sample_tokens) only when execute_model returns None, and its grammar bitmask
                # is None when no request of the step is constrained, so the worker samples now
                # with the same (None) argument. One round trip fewer per step; on the 2-core
                # CPU its effect on tokens/s was inside the drift (0.93-1.03x, RESULTS.md)
                self.model_runner.dg_one_rpc_steps += 1
                return self.sample_tokens(None)
            return out
        if first:
            return super().execute_model(scheduler_output)
        with V.deferred_pp_receive():
            return super().execute_model(scheduler_output)


# Platform-gated: importing vLLM's CPU worker replaces torch.cuda.Event / Stream,
# torch.accelerator.get_memory_info (host RAM) and more (v1/worker/cpu/shm.py, imported by
# cpu_worker.py; the CUDA wheel ships it too), which would break a GPU worker's memory profile
# and NCCL streams. So the CPU classes are imported on the CPU platform only, the GPU ones
# elsewhere (tests/test_gpu_path.py checks it with a CUDA-like platform).
if current_platform.is_cpu():
    _CPUWorker, _CPUModelRunner = V.cpu_worker_classes()
    DGemmaCPUModelRunner = _runner_class(_CPUModelRunner)

    class DGemmaCPUWorker(_StageMixin, _CPUWorker):
        def dgemma_request_stats(self) -> dict:
            return self.model_runner.dg_request_stats()

        def dgemma_runner_stats(self) -> dict:
            return self.model_runner.dg_runner_stats()

        def init_device(self):
            super().init_device()
            self.model_runner = DGemmaCPUModelRunner(self.vllm_config, torch.device("cpu"))

else:
    _Worker, _GPUModelRunner = V.gpu_worker_classes()

    class DGemmaGPUWorker(_StageMixin, _Worker):
        def dgemma_request_stats(self) -> dict:
            return self.model_runner.dg_request_stats()

        def dgemma_runner_stats(self) -> dict:
            return self.model_runner.dg_runner_stats()

        def _make_model_runner(self):
            return _runner_class(_GPUModelRunner)(self.vllm_config, self.device)
