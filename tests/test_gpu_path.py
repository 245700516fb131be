"""The CUDA path, checked on CPU by construction (no GPU here): a non-CPU platform stand-in for
imports and configuration, fake CUDA tensors for device placement.

- imports: with vLLM's platform answering "not CPU", registering the plugin and importing its
  worker and model modules loads none of vLLM's CPU-only modules (the CPU worker's shm module
  replaces torch.cuda.Event / Stream / current_stream, torch.accelerator.get_memory_info and
  Tensor.pin_memory; the CPU attention backend) and leaves those torch functions untouched;
- the config hook refuses, with a message naming the setting, what cannot run the canvas on GPU;
- the self-conditioning input of a batch mixing new and older canvases is built on the model's
  device (fake CUDA tensors: a host tensor in the concatenation raises a device mismatch).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

NOT_CPU_PLATFORM = '''
import vllm.platforms as P
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import PlatformEnum


class NotCpu(CpuPlatform):
    """A CUDA-like stand-in: not the CPU (is_cuda stays False: the CPU build has no CUDA ops)."""
    _enum = PlatformEnum.OOT
    device_name = device_type = "cuda"

    def is_cpu(self):
        return False


P._current_platform = NotCpu()
'''

IMPORT_CHECK = NOT_CPU_PLATFORM + '''
import sys, torch
watched = (torch.cuda.Event, torch.cuda.Stream, torch.cuda.current_stream,
           torch.accelerator.get_memory_info, torch.accelerator.synchronize, torch.Tensor.pin_memory)
from dgemma_vllm.engine import plugin
plugin.register()
import dgemma_vllm.engine.worker as W
import dgemma_vllm.model.dgemma  # noqa: F401
after = (torch.cuda.Event, torch.cuda.Stream, torch.cuda.current_stream,
         torch.accelerator.get_memory_info, torch.accelerator.synchronize, torch.Tensor.pin_memory)
loaded = [m for m in ("vllm.v1.worker.cpu.shm", "vllm.v1.worker.cpu_worker",
                      "vllm.v1.attention.backends.cpu_attn", "dgemma_vllm.engine.attention")
          if m in sys.modules]
print("LOADED", loaded)
print("UNTOUCHED", all(a is b for a, b in zip(watched, after)))
print("CLASSES", hasattr(W, "DGemmaGPUWorker"), hasattr(W, "DGemmaCPUWorker"))
'''


def test_not_cpu_platform_imports_nothing_cpu_specific():
    r = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "LOADED []" in out, out
    assert "UNTOUCHED True" in out, out
    assert "CLASSES True False" in out, out


@pytest.fixture
def not_cpu(monkeypatch):
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform

    class NotCpu(CpuPlatform):
        def is_cpu(self):
            return False

    monkeypatch.setattr(P, "_current_platform", NotCpu())


def _config(window="symmetric", backend=None, fa_version=None, v2=False, dbo=False):
    hf = SimpleNamespace(dgemma_canvas_length=16, dgemma_fuse_commit=True,
                         dgemma_canvas_window=window)
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=None),
        parallel_config=SimpleNamespace(worker_cls="auto", decode_context_parallel_size=1,
                                        prefill_context_parallel_size=1, enable_dbo=dbo),
        model_config=SimpleNamespace(hf_config=hf, enforce_eager=True, max_model_len=256),
        attention_config=SimpleNamespace(backend=backend, flash_attn_version=fa_version),
        use_v2_model_runner=v2)


def _hook(cfg):
    from dgemma_vllm.engine.config import DGemmaConfigHook

    DGemmaConfigHook.verify_and_update_config(cfg)
    return cfg


def test_gpu_defaults_triton_and_the_gpu_worker(not_cpu):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    cfg = _hook(_config())
    assert cfg.attention_config.backend == B.TRITON_ATTN
    assert cfg.parallel_config.worker_cls.endswith("DGemmaGPUWorker")
    assert cfg.model_config.hf_config.dgemma_fuse_commit is True


def _refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        _hook(cfg)


def test_gpu_refuses_the_reference_window_it_cannot_honour(not_cpu):
    _refused(_config(window="reference"), "dgemma_canvas_window='reference'.*symmetric")


def test_gpu_refuses_flashinfer_and_flash_attention_without_fa4(not_cpu):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    _refused(_config(backend=B.FLASHINFER), "FLASHINFER")
    _refused(_config(backend=B.FLASH_ATTN, fa_version=3), "FLASH_ATTN needs FlashAttention 4")
    # no FlashAttention build here: FA4 cannot be chosen for the user
    _refused(_config(backend=B.FLASH_ATTN), "FLASH_ATTN needs FlashAttention 4")
    _refused(_config(backend=B.FLEX_ATTENTION), "FLEX_ATTENTION")
    cfg = _hook(_config(backend=B.FLASH_ATTN, fa_version=4))  # FA4: served, fusion off
    assert cfg.model_config.hf_config.dgemma_fuse_commit is False


def test_gpu_refuses_model_runner_v2_and_dual_batch_overlap(not_cpu):
    _refused(_config(v2=True), "model runner V2")
    _refused(_config(dbo=True), "dual-batch overlap")


def test_cpu_hook_is_unchanged_by_the_gpu_checks():
    cfg = _hook(_config(window="reference", backend=None))  # the real (CPU) platform
    assert cfg.attention_config.backend is None
    assert cfg.parallel_config.worker_cls.endswith("DGemmaCPUWorker")


def test_quantized_head_or_embedding_is_refused():
    from dgemma_vllm.model.dgemma import refuse_quantized_head

    class Fp8LinearMethod:  # any quantization method of vLLM's
        pass

    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    plain = SimpleNamespace(quant_method=UnquantizedEmbeddingMethod())
    refuse_quantized_head(plain, plain)
    with pytest.raises(ValueError, match="quantized lm_head"):
        refuse_quantized_head(SimpleNamespace(quant_method=Fp8LinearMethod()), plain)
    with pytest.raises(ValueError, match="quantized embed_tokens"):
        refuse_quantized_head(plain, SimpleNamespace(quant_method=Fp8LinearMethod()))


def test_self_conditioning_input_stays_on_the_model_device():
    """A batch with a canvas on its first step (no soft embeddings yet) next to older canvases:
    the zeros are made on the device of the others (fake CUDA tensors raise on a host tensor in
    the concatenation, which the code of the review did)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dgemma_vllm.engine.runner import assemble_soft

    with FakeTensorMode(allow_non_fake_inputs=True):
        older = torch.empty(4, 8, device="cuda")
        cuda = older.device  # cuda:0, as the runner's logits_indices.device
        soft = assemble_soft([(None, 3), (older, 4), (None, 2)], 8, cuda)
        assert soft.device.type == "cuda" and tuple(soft.shape) == (9, 8)
        assert assemble_soft([(None, 3)], 8, cuda) is None
        # the review's code: zeros without a device next to GPU embeddings
        with pytest.raises(Exception, match="[Dd]evice"):
            torch.cat([torch.zeros(3, 8), older])
