"""Worker classes that install the plugin's runner (set as ``worker_cls`` by the config hook).

CPU: vLLM's CPUWorker builds a ``CPUModelRunner`` inside ``init_device``; the plugin replaces it
right after (weights are loaded later, in ``load_model``). GPU: ``Worker._make_model_runner`` is
vLLM's documented override point; the plugin returns its V1 runner there.
"""

from __future__ import annotations

import torch

from . import vllm_api as V
from .runner import DGemmaRunnerMixin


def _runner_class(base):
    class DGemmaModelRunner(DGemmaRunnerMixin, base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._dg_setup()

    DGemmaModelRunner.__qualname__ = f"DGemma{base.__name__}"
    return DGemmaModelRunner


try:
    _CPUWorker, _CPUModelRunner = V.cpu_worker_classes()
except ImportError:  # CUDA build
    _CPUWorker = _CPUModelRunner = None

if _CPUWorker is not None:
    DGemmaCPUModelRunner = _runner_class(_CPUModelRunner)

    class DGemmaCPUWorker(_CPUWorker):
        def dgemma_request_stats(self) -> dict:
            return self.model_runner.dg_request_stats()

        def dgemma_runner_stats(self) -> dict:
            return self.model_runner.dg_runner_stats()

        def init_device(self):
            super().init_device()
            self.model_runner = DGemmaCPUModelRunner(self.vllm_config, torch.device("cpu"))


try:
    _Worker, _GPUModelRunner = V.gpu_worker_classes()
except ImportError:
    _Worker = _GPUModelRunner = None

if _Worker is not None:

    class DGemmaGPUWorker(_Worker):
        def dgemma_request_stats(self) -> dict:
            return self.model_runner.dg_request_stats()

        def dgemma_runner_stats(self) -> dict:
            return self.model_runner.dg_runner_stats()

        def _make_model_runner(self):
            return _runner_class(_GPUModelRunner)(self.vllm_config, self.device)
