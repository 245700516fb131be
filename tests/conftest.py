"""Shared fixtures: random-weight checkpoints (built once, cached under .cache/) and vLLM engines.

Engines are expensive (~30 s to start on 2 cores): each test module starts the ones it needs
once (module scope) and shuts them down before the next module starts its own.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DGEMMA_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def checkpoint(geometry: str = "tiny", **kwargs) -> Path:
    from dgemma_vllm.checkpoints.factory import cached_checkpoint

    return cached_checkpoint(geometry, **kwargs)


def start_llm(path, *, capture_dir: str | None = None, **kwargs):
    """A vLLM engine with the plugin (loaded through its entry point) on `path`."""
    from vllm import LLM

    args = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1,
                max_model_len=1024, max_num_seqs=16, seed=0)
    args.update(kwargs)
    old = os.environ.get("DGEMMA_CAPTURE_DIR")
    if capture_dir:
        os.environ["DGEMMA_CAPTURE_DIR"] = str(capture_dir)
    try:
        return LLM(str(path), **args)
    finally:
        if capture_dir:
            if old is None:
                os.environ.pop("DGEMMA_CAPTURE_DIR", None)
            else:
                os.environ["DGEMMA_CAPTURE_DIR"] = old


def load_example(name: str):
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stop_llm(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def hook_config(window="reference", backend=None, fa_version=None, v2=False, dbo=False, **par):
    """A stand-in VllmConfig with what the plugin's config hook reads (its tests call
    ``DGemmaConfigHook.verify_and_update_config`` on it); `par` overrides parallel settings."""
    from types import SimpleNamespace

    hf = SimpleNamespace(dgemma_canvas_length=16, dgemma_fuse_commit=True,
                         dgemma_canvas_window=window)
    parallel = {"worker_cls": "auto", "decode_context_parallel_size": 1,
                "prefill_context_parallel_size": 1, "enable_dbo": dbo, **par}
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=None),
        parallel_config=SimpleNamespace(**parallel),
        model_config=SimpleNamespace(hf_config=hf, enforce_eager=True, max_model_len=256),
        attention_config=SimpleNamespace(backend=backend, flash_attn_version=fa_version),
        use_v2_model_runner=v2)


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    return checkpoint("tiny")
