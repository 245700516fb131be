"""tensor_parallel_size=2 on CPU, with vLLM's multiprocess executor and with Ray: the same seeded
tokens as one rank and as the reference. The tiny geometry has one KV head (replicated over the
two ranks), two query heads (one per rank), experts and vocabulary split in two; the head is
vocabulary-parallel (each rank samples over its own half; dgemma_vllm/refine/head.py)."""

from __future__ import annotations

import os

import pytest

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_ID, EOT_ID

PROMPTS = [[(11 * i + 5 * j) % 500 + 5 for j in range(3 + 9 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return ref.load_reference(str(tiny_ckpt))


def _generate_and_check(llm, model):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=40, seed=500 + i, extra_args={"diffusion_max_steps": 3})
              for i in range(len(PROMPTS))]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for p, sp, o in zip(PROMPTS, params, outs):
        want = ref.expected_tokens(model, p, sp.seed, 40, (EOS_ID, EOT_ID), max_denoising_steps=3)
        assert list(o.outputs[0].token_ids) == want


def test_two_ranks_equal_reference(tiny_ckpt, model):
    # two ranks on one NUMA node: bind one core each by hand (vLLM's auto binding wants a node
    # per rank), and keep no core in reserve
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    try:
        llm = start_llm(tiny_ckpt, tensor_parallel_size=2, distributed_executor_backend="mp")
        try:
            _generate_and_check(llm, model)
        finally:
            stop_llm(llm)
    finally:
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def test_two_ranks_under_ray_equal_reference(tiny_ckpt, model):
    """A local Ray cluster (started and stopped here) with two logical GPUs, the placement unit
    vLLM's Ray executor asks for (see dgemma_vllm.engine.plugin.cpu_ray_platform); the engine
    process joins it through RAY_ADDRESS."""
    import ray

    ctx = ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ctx.address_info["address"]
    try:
        llm = start_llm(tiny_ckpt, tensor_parallel_size=2, distributed_executor_backend="ray")
        try:
            _generate_and_check(llm, model)
        finally:
            stop_llm(llm)
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
