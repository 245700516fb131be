"""Preemption under a deliberately small KV cache: every request completes and seeded outputs
equal the reference (the runner's canvas state survives; vLLM recomputes the committed KV), for
text requests, constrained ones and image requests (the vision tower runs again)."""

from __future__ import annotations

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS


def test_preempted_requests_complete_and_equal_reference(tiny_ckpt):
    from vllm import SamplingParams

    model = ref.load_reference(str(tiny_ckpt))
    prompts = [[(13 * i + 3 * j) % 500 + 5 for j in range(20 + i)] for i in range(8)]
    params = [SamplingParams(max_tokens=64, seed=300 + i, extra_args={"diffusion_max_steps": 3})
              for i in range(8)]
    llm = start_llm(tiny_ckpt, block_size=32, num_gpu_blocks_override=12, max_model_len=160,
                    disable_log_stats=False)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
        # constrained requests among plain ones, preempted: their grammar state (the worker's
        # matcher, vLLM's own) survives; each equals its solo run (alone, no preemption)
        from vllm.sampling_params import StructuredOutputsParams

        so = [StructuredOutputsParams(regex=r"[a-m ]{10,90}\."),
              StructuredOutputsParams(json={"type": "object", "properties": {
                  "k": {"type": "array", "items": {"type": "integer"}}}, "required": ["k"]})]
        cparams = [SamplingParams(max_tokens=64, seed=400 + i, extra_args={"diffusion_max_steps": 3},
                                  structured_outputs=so[i % 2] if i < 4 else None)
                   for i in range(8)]
        batch = llm.generate([{"prompt_token_ids": p} for p in prompts], cparams, use_tqdm=False)
        after = {m.name: m for m in llm.get_metrics()}["vllm:num_preemptions"].value
        solo = [llm.generate([{"prompt_token_ids": prompts[i]}], [cparams[i]], use_tqdm=False)[0]
                for i in range(4)]
        # image requests, preempted: vLLM runs the vision tower again for a recomputed prompt
        from test_images import IMAGES, TURN

        images = [IMAGES["a"], IMAGES["b"], IMAGES["c"], IMAGES["d"]] * 2
        iparams = [SamplingParams(max_tokens=48, seed=500 + i, extra_args={"diffusion_max_steps": 3})
                   for i in range(8)]
        ibatch = llm.generate([{"prompt": TURN.format(f"<|image|>Look {i}."),
                                "multi_modal_data": {"image": img}}
                               for i, img in enumerate(images)], iparams, use_tqdm=False)
        final = {m.name: m for m in llm.get_metrics()}["vllm:num_preemptions"].value
    finally:
        stop_llm(llm)
    preemptions = metrics["vllm:num_preemptions"].value
    assert preemptions > 0, "the KV cache was not small enough to force preemption"
    assert after > preemptions, "the constrained batch was not preempted"
    for i in range(4):
        got = batch[i].outputs[0]
        assert got.finish_reason in ("stop", "length") and list(got.token_ids) == list(
            solo[i].outputs[0].token_ids), i
    for p, sp, o in zip(prompts, params, outs):
        want = ref.expected_tokens(model, p, sp.seed, 64, EOS_IDS, max_denoising_steps=3)
        assert list(o.outputs[0].token_ids) == want
    assert final > after, "the image batch was not preempted"
    from test_images import reference_tokens

    for img, sp, o in zip(images, iparams, ibatch):
        want = reference_tokens(model, tiny_ckpt, list(o.prompt_token_ids), [img], sp.seed, 48, 3)
        assert list(o.outputs[0].token_ids) == want
    print(f"preemptions: {preemptions}")
