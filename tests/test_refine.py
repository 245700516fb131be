"""Engine-free refinement (dgemma_vllm.refine) against the reference's own sampler classes."""

from __future__ import annotations

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler, EntropyBoundSamplerConfig, LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria)

from dgemma_vllm.refine.params import DiffusionParams, from_generation_config
from dgemma_vllm.refine.sampler import CanvasState, refine_step


def reference_loop(logit_seq, seed, p: DiffusionParams, c, v):
    """The reference's `_denoising_step` for one row, on the global RNG."""
    torch.manual_seed(seed)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(p.entropy_bound), c, v, p.max_steps)
    stop = StableAndConfidentStoppingCriteria(p.stability_threshold, p.confidence_threshold)
    temp = LinearTemperatureScheduleLogitsProcessor(p.t_min, p.t_max, p.max_steps)
    canvas = sampler.initialize_canvas(1, "cpu")
    trace = [canvas.clone()]
    argmax = None
    for k, cur in enumerate(reversed(range(1, p.max_steps + 1))):
        processed = temp(None, logit_seq[k][None], cur_step=torch.tensor(cur, dtype=torch.int32))
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
        den = torch.multinomial(probs.view(-1, v), num_samples=1).view(1, c)
        argmax = processed.argmax(-1)
        acc = sampler.accept_canvas(canvas, den, processed, cur)
        canvas = sampler.renoise_canvas(acc, cur)
        trace.append(canvas.clone())
        if stop(argmax, processed).all():
            break
    return trace, argmax


def plugin_loop(logit_seq, seed, p, c, v):
    st = CanvasState(params=p, vocab_size=v, generator=torch.Generator().manual_seed(seed))
    st.start_canvas(c)
    trace = [st.canvas.clone()]
    k = 0
    while st.commit is None:
        refine_step(st, logit_seq[k])
        trace.append(st.canvas.clone())
        k += 1
    return trace, st.commit


@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize("seed", [0, 7])
def test_refine_matches_reference_sampler(kind, seed):
    c, v = 24, 300
    p = DiffusionParams(max_steps=6)
    g = torch.Generator().manual_seed(100 + seed)
    if kind == "random":
        seq = [torch.randn(c, v, generator=g) * 3 for _ in range(p.max_steps)]
    else:  # confident and stable: stops after 2 steps
        target = torch.randint(0, v, (c,), generator=g)
        one = torch.full((c, v), -30.0)
        one[torch.arange(c), target] = 30.0
        seq = [one] * p.max_steps
    want_trace, want_argmax = reference_loop(seq, seed, p, c, v)
    got_trace, got_commit = plugin_loop(seq, seed, p, c, v)
    assert len(got_trace) == len(want_trace)
    for a, b in zip(got_trace, want_trace):
        assert torch.equal(a, b)
    assert torch.equal(got_commit, want_argmax[0])
    if kind == "peaked":
        assert len(got_trace) == 3  # stopped early: 2 steps


def test_temperature_schedule_never_reaches_t_min():
    from dgemma_vllm.refine.sampler import temperature

    p = DiffusionParams(max_steps=4)
    assert [round(float(temperature(p, s)), 6) for s in (4, 3, 2, 1)] == [0.8, 0.7, 0.6, 0.5]


@pytest.mark.parametrize("bad,match", [
    ({"diffusion_max_steps": 0}, "diffusion_max_steps must be an integer in \\[1, 4096\\]"),
    ({"diffusion_max_steps": "8"}, "diffusion_max_steps"),
    ({"diffusion_entropy_bound": -1.0}, "diffusion_entropy_bound must be a number > 0"),
    ({"diffusion_t_min": 0.9, "diffusion_t_max": 0.5}, "diffusion_t_min .* must be <= diffusion_t_max"),
    ({"diffusion_stability_threshold": 1.5}, "diffusion_stability_threshold"),
    ({"diffusion_confidence_threshold": float("nan")}, "diffusion_confidence_threshold"),
])
def test_bad_knobs_name_the_parameter(bad, match):
    with pytest.raises(ValueError, match=match):
        DiffusionParams().with_overrides(bad)


def test_defaults_come_from_generation_config(tiny_ckpt):
    p = from_generation_config(str(tiny_ckpt))
    assert (p.max_steps, p.entropy_bound, p.t_min, p.t_max) == (48, 0.1, 0.4, 0.8)


def test_lean_entropy_is_bitwise_categorical():
    from dgemma_vllm.refine.sampler import entropy

    x = torch.randn(3, 17, 1000, generator=torch.Generator().manual_seed(1)) * 4
    assert torch.equal(entropy(x), torch.distributions.Categorical(logits=x).entropy())


def test_inverse_cdf_sampler_has_the_right_distribution():
    from dgemma_vllm.refine.sampler import sample_inverse_cdf

    probs = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.125])
    g = torch.Generator().manual_seed(0)
    draws = sample_inverse_cdf(probs.expand(200_000, 5).contiguous(), g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[3] == 0
    assert torch.allclose(freq, probs, atol=0.005)


@pytest.mark.parametrize("options,message", [
    ({"dgemma_canvas_window": "wide"}, "dgemma_canvas_window must be 'reference' or 'symmetric'"),
    ({"dgemma_head_tile": 0}, r"dgemma_head_tile must be an integer in \[1, 16777216\]"),
    ({"dgemma_head_tile": "big"}, "dgemma_head_tile must be an integer"),
    ({"dgemma_steps_per_engine_step": 17}, r"dgemma_steps_per_engine_step must be an integer in \[1, 16\]"),
    ({"dgemma_steps_per_engine_step": 2.0}, "dgemma_steps_per_engine_step must be an integer"),
    ({"dgemma_head_compile": "yes"}, "dgemma_head_compile must be true or false"),
    ({"dgemma_fuse_commit": 1}, "dgemma_fuse_commit must be true or false"),
])
def test_plugin_options_are_checked(options, message):
    from types import SimpleNamespace

    from dgemma_vllm.engine.config import validate_options

    validate_options(SimpleNamespace())  # defaults are valid
    with pytest.raises(ValueError, match=message):
        validate_options(SimpleNamespace(**options))
