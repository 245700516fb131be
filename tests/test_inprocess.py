"""vLLM's in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the setting the README
recommends for offline use on a small CPU (issue 24: no engine-core process, so no shm hand-off
and no spinning reader beside the worker's threads): the plugin's runner, scheduler and step
groups run in the caller's process and give the reference's tokens.

One in-process engine with 4 denoising steps per engine step (the benchmarks' fastest offline
setting on 2 cores); seeded requests of several canvases, unseeded ones beside them; the seeded
ones must equal ``transformers``' generate with the same seed, and the runner's counters (read
through ``collective_rpc``, which the benchmarks use) must show step groups and one-RPC steps.
"""

from __future__ import annotations

import pytest

from conftest import start_llm, stop_llm


@pytest.fixture(scope="module")
def inprocess(tiny_ckpt):
    from vllm import SamplingParams

    from dgemma_vllm.engine.stats import engine_env, request_stats, runner_stats

    # the KV cache sized explicitly: vLLM's automatic size is the utilization's share less this
    # process's RSS, which in-process holds the test session too
    with engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = start_llm(tiny_ckpt, kv_cache_memory_bytes=256 << 20,
                        hf_overrides={"dgemma_steps_per_engine_step": 4})
    try:
        off = {"diffusion_stability_threshold": 0, "diffusion_confidence_threshold": 1e-9}
        spec = [(6, 40, 900, {"diffusion_max_steps": 5, **off}),
                (11, 33, 901, {"diffusion_max_steps": 3, **off}),
                (8, 24, None, {"diffusion_max_steps": 6}),
                (5, 16, None, {"diffusion_max_steps": 2})]
        prompts = [[(17 * i + 5 * j) % 480 + 10 for j in range(n)] for i, (n, *_) in enumerate(spec)]
        params = [SamplingParams(max_tokens=m, ignore_eos=True, seed=s, extra_args=e)
                  for _, m, s, e in spec]
        before = runner_stats(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        after = runner_stats(llm)
        per_request = request_stats(llm)
        yield dict(client=type(llm.llm_engine.engine_core).__name__, spec=spec, prompts=prompts,
                   outs=outs, before=before, after=after,
                   requests=[per_request[o.request_id.rsplit("-", 1)[0]] for o in outs])
    finally:
        stop_llm(llm)


def test_inprocess_engine_runs_in_this_process(inprocess):
    assert inprocess["client"] == "InprocClient"  # vLLM's engine core in this process
    outs = inprocess["outs"]
    assert all(len(o.outputs[0].token_ids) == m for o, (_, m, _, _) in zip(outs, inprocess["spec"]))
    d = {k: inprocess["after"][k] - inprocess["before"].get(k, 0)
         for k in ("engine_steps", "inner_steps", "one_rpc_steps")}
    assert d["engine_steps"] > 0 and d["inner_steps"] > 0, d  # step groups ran
    assert d["one_rpc_steps"] == d["engine_steps"], d
    for req, (_, m, _, e) in zip(inprocess["requests"], inprocess["spec"]):
        canvases = -(-m // 16)  # tiny's canvas: 16
        assert req["canvases"] == canvases, req
        if "diffusion_stability_threshold" in e:  # no early stop: every step ran
            assert req["denoising_steps"] == e["diffusion_max_steps"] * canvases, req


def test_inprocess_tokens_equal_reference(inprocess, tiny_ckpt):
    from dgemma_vllm import reference as ref

    model = ref.load_reference(str(tiny_ckpt))
    checked = 0
    for p, (_, m, seed, extra), o in zip(inprocess["prompts"], inprocess["spec"], inprocess["outs"]):
        if seed is None:
            continue
        want = ref.expected_tokens(model, p, seed, m, (), max_denoising_steps=extra["diffusion_max_steps"],
                                   stability_threshold=0, confidence_threshold=1e-9)
        assert list(o.outputs[0].token_ids) == want
        checked += 1
    assert checked == 2
