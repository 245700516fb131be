"""Offline engine behaviour on one shared tiny engine: lengths, stops, refusals, batching."""

from __future__ import annotations

import pytest

from conftest import load_example, start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS

PROMPT = [9, 30, 41, 77, 120, 7, 8]
STEPS = {"diffusion_max_steps": 3}


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    engine = start_llm(tiny_ckpt, max_model_len=256)
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return ref.load_reference(str(tiny_ckpt))


def gen(llm, prompt=PROMPT, **kw):
    from vllm import SamplingParams

    kw.setdefault("extra_args", STEPS)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(**kw), use_tqdm=False)[0]
    return out.outputs[0]


def reference_tokens(model, seed, n, prompt=PROMPT):
    return ref.generate(model, prompt, seed, max_new_tokens=n, max_denoising_steps=3)


def test_stop_token_ids_cut_inside_a_canvas(llm, model):
    want = reference_tokens(model, 5, 48)
    assert not any(t in EOS_IDS for t in want[:21])
    stop = want[20]
    first = want.index(stop)
    o = gen(llm, max_tokens=48, seed=5, stop_token_ids=[stop])
    assert list(o.token_ids) == want[: first + 1] and o.finish_reason == "stop"


def test_stop_string(llm, model, tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    want = reference_tokens(model, 6, 48)
    full = gen(llm, max_tokens=48, seed=6).text
    assert full == tok.decode(want[: len(want)], skip_special_tokens=True)[: len(full)]
    stop_str = full[20:23]
    o = gen(llm, max_tokens=48, seed=6, stop=[stop_str])
    assert o.finish_reason == "stop" and stop_str not in o.text and full.startswith(o.text)
    assert o.text == full[: full.index(stop_str)]


def test_ignore_eos_and_max_tokens_exact(llm):
    for n in (1, 15, 17, 33):
        o = gen(llm, max_tokens=n, seed=11, ignore_eos=True)
        assert len(o.token_ids) == n and o.finish_reason == "length"


def test_max_model_len_is_respected(llm):
    prompt = [(i * 37) % 500 + 5 for i in range(250)]  # 6 tokens of room under max_model_len=256
    o = gen(llm, prompt=prompt, seed=1, ignore_eos=True)
    assert len(o.token_ids) == 6 and o.finish_reason == "length"


@pytest.mark.parametrize("kwargs,name", [
    # vLLM's ranges (the parameters themselves are served: tests/test_sampling_params.py)
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=1), "prompt_logprobs"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=9), "min_tokens"),
    (dict(logit_bias={10 ** 7: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[10 ** 7]), "allowed_token_ids"),
    (dict(extra_args={"diffusion_max_steps": 0}), "diffusion_max_steps"),
    (dict(extra_args={"diffusion_t_min": 0.9, "diffusion_t_max": 0.1}), "diffusion_t_min"),
    (dict(extra_args={"diffusion_bogus": 1}), "diffusion_bogus"),
    (dict(extra_args={"diffusion_seed_canvas": [1, 2]}), "diffusion_seed_canvas must hold exactly 16"),
    (dict(extra_args={"diffusion_seed_canvas": [999] * 16}), "diffusion_seed_canvas ids must be in"),
    (dict(extra_args={"diffusion_pinned": [0, 1]}), "diffusion_pinned needs diffusion_seed_canvas"),
    (dict(extra_args={"diffusion_seed_canvas": [5] * 16, "diffusion_pinned": [16]}), "diffusion_pinned must"),
    (dict(extra_args={"diffusion_canvas_length": 17}), "diffusion_canvas_length must be an integer in \\[1, 16\\]"),
    (dict(extra_args={"diffusion_stream_drafts": "yes"}), "diffusion_stream_drafts must be true or false"),
    (dict(n=2, extra_args={"diffusion_stream_drafts": True}), "diffusion_stream_drafts: needs n = 1"),
])
def test_unsupported_or_bad_params_are_refused(llm, kwargs, name):
    from vllm.exceptions import VLLMValidationError

    kwargs.setdefault("extra_args", STEPS)
    with pytest.raises((ValueError, VLLMValidationError), match=name):
        gen(llm, max_tokens=8, seed=0, **kwargs)
    assert len(gen(llm, max_tokens=8, seed=0).token_ids) > 0  # the engine is still up


def test_temperature_zero_is_deterministic(llm):
    a = gen(llm, max_tokens=20, seed=3, temperature=0.0, ignore_eos=True)
    b = gen(llm, max_tokens=20, seed=3, temperature=0.0, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_batch_equals_solo_and_requests_join_between_steps(llm, model):
    from vllm import SamplingParams

    seeds = list(range(20, 30))
    prompts = [PROMPT[: 1 + i % 7] + [50 + i] for i in range(len(seeds))]
    params = [SamplingParams(max_tokens=16 + 5 * i, seed=s, extra_args=STEPS)
              for i, s in enumerate(seeds)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, sp, o in zip(prompts, params, outs):
        want = ref.expected_tokens(model, p, sp.seed, sp.max_tokens, EOS_IDS,
                                   max_denoising_steps=3)
        assert list(o.outputs[0].token_ids) == want


def test_seed_canvas_with_pins_is_kept_and_seed_canvas_matches_reference(llm, model):
    seed = [(37 * i) % 400 + 5 for i in range(16)]
    pins = [0, 1, 2, 10, 15]
    o = gen(llm, max_tokens=32, seed=9, ignore_eos=True,
            extra_args={"diffusion_seed_canvas": seed, "diffusion_pinned": pins, "diffusion_max_steps": 3})
    assert all(o.token_ids[i] == seed[i] for i in pins)
    # without pins a seed canvas is the reference's `decoder_input_ids` for the first canvas
    o2 = gen(llm, max_tokens=32, seed=9, extra_args={"diffusion_seed_canvas": seed, "diffusion_max_steps": 3})
    import torch

    want = ref.expected_tokens(model, PROMPT, 9, 32, EOS_IDS, max_denoising_steps=3,
                               decoder_input_ids=torch.tensor([seed]))
    assert list(o2.token_ids) == want


def test_shorter_canvas_per_request(llm, model):
    from dgemma_vllm.engine.stats import request_stats

    o = gen(llm, max_tokens=24, seed=4, ignore_eos=True,
            extra_args={"diffusion_canvas_length": 8, "diffusion_max_steps": 2})
    assert len(o.token_ids) == 24
    assert request_stats(llm)  # stats are served
    # reference with an 8-token canvas
    model.config.canvas_length, old = 8, model.config.canvas_length
    try:
        want = ref.expected_tokens(model, PROMPT, 4, 24, EOS_IDS, max_denoising_steps=2)
    finally:
        model.config.canvas_length = old
    assert list(o.token_ids)[: len(want)] == want


def test_examples_run_on_the_shared_engine(llm, tiny_ckpt):
    texts = load_example("offline_generate").run(llm)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    ids = load_example("infill_pinned").run(llm, 16)
    assert len(ids) == 16
