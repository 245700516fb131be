"""tensor_parallel_size=2 on CPU (vLLM's multiprocess executor): the same seeded tokens as one
rank and as the reference. The tiny geometry has one KV head (replicated over the two ranks),
two query heads (one per rank), experts and vocabulary split in two."""

from __future__ import annotations

import os

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_ID, EOT_ID


def test_two_ranks_equal_reference(tiny_ckpt):
    from vllm import SamplingParams

    # two ranks on one NUMA node: bind one core each by hand (vLLM's auto binding wants a node
    # per rank), and keep no core in reserve
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    model = ref.load_reference(str(tiny_ckpt))
    prompts = [[(11 * i + 5 * j) % 500 + 5 for j in range(3 + 9 * i)] for i in range(4)]
    params = [SamplingParams(max_tokens=40, seed=500 + i, extra_args={"diffusion_max_steps": 3})
              for i in range(4)]
    llm = start_llm(tiny_ckpt, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        stop_llm(llm)
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    for p, sp, o in zip(prompts, params, outs):
        want = ref.expected_tokens(model, p, sp.seed, 40, (EOS_ID, EOT_ID), max_denoising_steps=3)
        assert list(o.outputs[0].token_ids) == want
