"""pipeline_parallel_size=2 on CPU: two stages of the tiny geometry's four layers (sliding + full
on each), with vLLM's multiprocess executor and tensor_parallel_size=2 (four ranks), with LoRA,
drafts and structured outputs. The canvas state and head live on the last stage; seeded tokens
equal the reference's. PP=2 alone runs under Ray, one stage on each of two Ray nodes
(tests/test_ray_nodes.py), and with the multiprocess executor in benchmarks/parallel.py (kept out
of the suite for its time)."""

from __future__ import annotations

import time

import pytest

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS
from dgemma_vllm.engine.stats import engine_env
from test_tensor_parallel import PROMPTS, _check_lora

STEPS = {"diffusion_max_steps": 3}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return ref.load_reference(str(tiny_ckpt))


def _seeded(llm, model, first_seed=500):
    """Seeded requests (fusion on: 40 tokens = three canvases of 16) equal the reference; two
    unseeded ones (the batched head) get exact lengths. Returns the last stage's runner stats."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=40, seed=first_seed + i, extra_args=STEPS)
              for i in range(len(PROMPTS))]
    unseeded = SamplingParams(max_tokens=40, ignore_eos=True, extra_args=STEPS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS + PROMPTS[:2]],
                        params + [unseeded, unseeded], use_tqdm=False)
    for p, sp, o in zip(PROMPTS, params, outs):
        want = ref.expected_tokens(model, p, sp.seed, 40, EOS_IDS, max_denoising_steps=3)
        assert list(o.outputs[0].token_ids) == want, sp.seed
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs[len(PROMPTS):])
    return llm.collective_rpc("dgemma_runner_stats")


def _check_stages(llm, stats, stages: int, ranks: int):
    """The canvas states live on the last stage only (every tensor rank of it); no stage keeps
    state after the requests finished; commits fused with the next canvas's first step."""
    info = llm.collective_rpc("dgemma_rank_info")
    assert sorted((i["pp_rank"], i["tp_rank"]) for i in info) == \
        [(s, t) for s in range(stages) for t in range(ranks)]
    for i, st in zip(info, stats):
        last = i["pp_rank"] == stages - 1
        assert (st["head_rows"] > 0) == last, (i, st)
        assert (st["fused_commits"] > 0) == last, (i, st)
        assert st["live_states"] == 0 and st["pending_commits"] == 0, st
    return info


def _drafts(llm, prompt, seed):
    """Streamed drafts of one request (diffusion_stream_drafts, stopping off, 3 steps), read from
    the engine core's outputs, and its tokens; plus the same request's tokens without drafts."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    xargs = {**STEPS, "diffusion_stability_threshold": 0, "diffusion_confidence_threshold": 0}
    plain = SamplingParams(max_tokens=40, seed=seed, ignore_eos=True, extra_args=xargs)
    want = list(llm.generate([{"prompt_token_ids": prompt}], plain, use_tqdm=False)[0]
                .outputs[0].token_ids)
    sp = SamplingParams(max_tokens=40, seed=seed, ignore_eos=True,
                        extra_args={**xargs, "diffusion_stream_drafts": True},
                        output_kind=RequestOutputKind.DELTA)
    engine = llm.llm_engine
    core = engine.engine_core
    seen, real = [], core.get_output

    def spy(*a, **k):
        out = real(*a, **k)
        for o in out.outputs:
            kv = o.kv_transfer_params
            if isinstance(kv, dict) and "dgemma_draft" in kv:
                seen.append(kv["dgemma_draft"])
        return out

    core.get_output = spy
    tokens = []
    try:
        engine.add_request("pp-drafts", {"prompt_token_ids": prompt}, sp)
        while engine.has_unfinished_requests():
            for ro in engine.step():
                tokens += list(ro.outputs[0].token_ids)
    finally:
        del core.get_output
    return seen, tokens, want


@pytest.fixture(scope="module")
def stages_of_two_ranks(tiny_ckpt):
    """PP=2 x TP=2 with the multiprocess executor and LoRA on (four ranks on two cores)."""
    with engine_env(VLLM_CPU_OMP_THREADS_BIND="0|1|0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0"):
        t = time.perf_counter()
        llm = start_llm(tiny_ckpt, pipeline_parallel_size=2, tensor_parallel_size=2,
                        enable_lora=True, max_lora_rank=8, max_loras=2)
        print(f"[PP=2 x TP=2] engine start {time.perf_counter() - t:.1f} s")
        try:
            yield llm
        finally:
            stop_llm(llm)


def test_two_stages_of_two_ranks_equal_reference(stages_of_two_ranks, model):
    llm = stages_of_two_ranks
    _check_stages(llm, _seeded(llm, model), stages=2, ranks=2)


def test_two_stages_keep_lora_drafts_and_structured_outputs(stages_of_two_ranks, tiny_ckpt):
    import re

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = stages_of_two_ranks
    _check_lora(llm, tiny_ckpt)  # two adapters + base in one batch = peft-merged references
    seen, tokens, want = _drafts(llm, PROMPTS[1], seed=12)
    assert tokens == want and len(tokens) == 40
    assert [(d["num_committed"], d["step"]) for d in seen] == [(0, 1), (0, 2), (16, 1), (16, 2),
                                                               (32, 1), (32, 2)]
    assert all(len(d["token_ids"]) == 16 for d in seen)
    so = SamplingParams(max_tokens=60, seed=3, extra_args=STEPS,
                        structured_outputs=StructuredOutputsParams(regex="[a-f]{3,20}\\.[0-9]{2}"))
    text = llm.generate([{"prompt_token_ids": PROMPTS[1]}], so, use_tqdm=False)[0].outputs[0].text
    assert re.fullmatch("[a-f]{3,20}\\.[0-9]{2}", text), text


def test_grouped_steps_refused_with_pipeline_stages():
    from conftest import hook_config
    from dgemma_vllm.engine.config import DGemmaConfigHook

    cfg = hook_config(pipeline_parallel_size=2)
    cfg.model_config.hf_config.dgemma_steps_per_engine_step = 4
    with pytest.raises(ValueError, match="dgemma_steps_per_engine_step=4 needs pipeline_parallel_size=1"):
        DGemmaConfigHook.verify_and_update_config(cfg)
    cfg = hook_config(pipeline_parallel_size=2)
    cfg.model_config.hf_config.dgemma_steps_per_engine_step = 1
    DGemmaConfigHook.verify_and_update_config(cfg)  # accepted
