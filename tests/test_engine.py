"""Offline engine behaviour on one shared tiny engine: lengths, stops, refusals, batching."""

from __future__ import annotations

import pytest

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_ID, EOT_ID

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
    assert not any(t in (EOS_ID, EOT_ID) for t in want[:21])
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
    (dict(logprobs=2), "logprobs"),
    (dict(prompt_logprobs=1), "prompt_logprobs"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(top_p=0.9), "top_p"),
    (dict(top_k=5), "top_k"),
    (dict(min_p=0.1), "min_p"),
    (dict(min_tokens=3), "min_tokens"),
    (dict(logit_bias={5: 1.0}), "logit_bias"),
    (dict(extra_args={"diffusion_max_steps": 0}), "diffusion_max_steps"),
    (dict(extra_args={"diffusion_t_min": 0.9, "diffusion_t_max": 0.1}), "diffusion_t_min"),
    (dict(extra_args={"diffusion_bogus": 1}), "diffusion_bogus"),
    (dict(extra_args={"diffusion_seed_canvas": [1, 2]}), "diffusion_seed_canvas"),
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
        want = reference_tokens(model, sp.seed, sp.max_tokens, prompt=p)[: sp.max_tokens]
        eos = [i for i, t in enumerate(want) if t in (EOS_ID, EOT_ID)]
        if eos:  # the reference keeps the EOS and pads after it; vLLM stops there
            want = want[: eos[0] + 1]
        assert list(o.outputs[0].token_ids) == want
