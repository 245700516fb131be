"""Image input against the `transformers` reference (tiny checkpoint with its vision tower, fp32).

One engine serves every test here. The reference is ``generate(pixel_values=...,
image_position_ids=..., mm_token_type_ids=...)`` on the same checkpoint and pixels (transformers'
PIL image processor on both sides), after ``torch.manual_seed(seed)``:

- seeded tokens equal for prompts with one image and with two images of different sizes and a
  text-only request, all in one batch (with 192 tokens a step: one prompt's image would straddle
  a prefill chunk's end, and is not split; seeded requests prefilled in chunks, which ended the
  engine before: vLLM rewinds its CPU generators there), and for a chat message with an image part;
- image features (vision tower + embedder) within 1e-5 of the reference's;
- the check can fail: the reference with plain Gemma 4's image mask (full layers causal inside
  an image) gives other tokens;
- prefix caching: the same image again reuses the cached blocks and gives the same tokens;
  another image of the same size (the same token ids) reuses nothing of them and gives its own
  reference's tokens (vLLM's multimodal hashes); a hit that would end inside an image is cut to
  the image's start;
- bad input is refused per request with a message naming the problem, the engine serves on.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import checkpoint, load_example, start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS

FEATURE_TOL = 1e-5
STEP_TOKENS = 192  # the engine's max_num_batched_tokens
LONG_TEXT = ("Once upon a time there was a small robot that loved the colours of the sea. It "
             "painted every morning and every evening, and one day it found a picture:") * 2
TURN = "<|turn>user\n{}<turn|>\n<|turn>model\n"  # the chat template's user turn (vLLM adds <bos>)


def image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


IMAGES = {"a": image(40, 56, 0), "b": image(120, 60, 1), "c": image(200, 90, 2),
          "d": image(40, 56, 3)}  # d: the size of a (same token ids), other pixels


@pytest.fixture(scope="module")
def ckpt():
    # the tiny checkpoint in 300 KB shards (the same weights): sharded loading, vision tower too
    return checkpoint("tiny", max_shard_size="300KB")


@pytest.fixture(scope="module")
def llm(ckpt):
    # 192 tokens a step: a prompt with a long text before its image is prefilled in chunks, and
    # the image must not be split between two of them
    # and the head in 6 tiles with 4 denoising steps per engine step (test_engine_with_head_tiles_*)
    engine = start_llm(ckpt, block_size=32, enable_prefix_caching=True,
                       limit_mm_per_prompt={"image": 2}, max_num_batched_tokens=STEP_TOKENS,
                       hf_overrides={"dgemma_head_tile": 100, "dgemma_steps_per_engine_step": 4})
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def model(ckpt):
    return ref.load_reference(str(ckpt))


def reference_tokens(model, ckpt, prompt_ids, images, seed, max_tokens, steps, budget=None, **kw):
    pixels = ref.pixel_inputs(str(ckpt), images, budget) if images else None
    return ref.until_eos(ref.generate_with_images(model, prompt_ids, pixels, seed,
                                                  max_new_tokens=max_tokens,
                                                  max_denoising_steps=steps, **kw),
                         max_tokens, EOS_IDS)


def expanded(llm, ckpt, model, text, images):
    """The prompt ids the reference gets: the tokenized prompt with each <|image|> expanded by
    the image's soft-token count from transformers' image processor."""
    ids = llm.get_tokenizer()(text).input_ids
    n = ref.pixel_inputs(str(ckpt), images)["num_soft_tokens"] if images else []
    return ref.expand_image_tokens(model.config, ids, n)


def test_batch_with_one_two_and_no_images_equals_reference(llm, model, ckpt):
    from vllm import SamplingParams

    cases = [  # (prompt, images, seed, max_tokens, steps)
        (TURN.format("<|image|>What is in the picture?"), ["a"], 11, 40, 4),
        (TURN.format("<|image|> and <|image|> Compare them."), ["b", "c"], 12, 32, 3),
        (TURN.format("Why is the sky blue?"), [], 13, 36, 4),
        (TURN.format("Describe <|image|> briefly."), ["c"], 14, 20, 5),
        # ~165 text tokens, then the image: a chunk of STEP_TOKENS would end inside it
        (TURN.format(LONG_TEXT + " <|image|> What is it?"), ["a"], 15, 24, 3),
    ]
    inputs = [{"prompt": p, "multi_modal_data": {"image": [IMAGES[k] for k in ims]}} if ims
              else {"prompt": p} for p, ims, *_ in cases]
    params = [SamplingParams(max_tokens=mt, seed=s, extra_args={"diffusion_max_steps": st})
              for _, _, s, mt, st in cases]
    outs = llm.generate(inputs, params, use_tqdm=False)
    counts = [ref.pixel_inputs(str(ckpt), [IMAGES[k]])["num_soft_tokens"][0] for k in "abc"]
    assert len(set(counts)) == 3, f"the test images should differ in soft tokens: {counts}"
    for (p, ims, seed, mt, steps), o in zip(cases, outs):
        images = [IMAGES[k] for k in ims]
        ids = expanded(llm, ckpt, model, p, images)
        assert list(o.prompt_token_ids) == ids, p
        if LONG_TEXT in p:  # the image straddles the first chunk's end
            rows = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
            assert rows[0] < STEP_TOKENS <= rows[-1], rows
        want = reference_tokens(model, ckpt, ids, images, seed, mt, steps)
        assert list(o.outputs[0].token_ids) == want, p
        if ims:  # the check can fail: plain Gemma 4's image mask gives other tokens
            other = reference_tokens(model, ckpt, ids, images, seed, mt, steps, gemma4_mask=True)
            assert other != want, f"{p}: the image mask on full layers did not matter"


def test_chat_message_with_an_image_part(llm, model, ckpt):
    from vllm import SamplingParams

    chat = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": IMAGES["b"]},
        {"type": "text", "text": "What is this?"}]}]
    sp = SamplingParams(max_tokens=24, seed=5, extra_args={"diffusion_max_steps": 4})
    o = llm.chat([chat], sp, use_tqdm=False)[0]
    ids = list(o.prompt_token_ids)
    assert ids == ref.expand_image_tokens(
        model.config, llm.get_tokenizer().apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                               "text": "What is this?"}]}],
            add_generation_prompt=True, tokenize=True, return_dict=False),
        ref.pixel_inputs(str(ckpt), [IMAGES["b"]])["num_soft_tokens"])
    assert list(o.outputs[0].token_ids) == reference_tokens(model, ckpt, ids, [IMAGES["b"]], 5, 24, 4)


def test_soft_token_budget_per_request(llm, model, ckpt):
    """``mm_processor_kwargs={"max_soft_tokens": 140}``: the image is resized to that budget, as
    transformers' processor does with the same setting; in one batch with a request at the
    default budget (70: the vision tower gets images of two patch counts), both equal the
    reference's tokens."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=20, seed=41, extra_args={"diffusion_max_steps": 3})
    outs = llm.generate([{"prompt": TURN.format("<|image|>What is it?"),
                          "multi_modal_data": {"image": IMAGES["b"]},
                          "mm_processor_kwargs": {"max_soft_tokens": budget}} if budget else
                         {"prompt": TURN.format("<|image|>What is it?"),
                          "multi_modal_data": {"image": IMAGES["c"]}}
                         for budget in (140, None)], sp, use_tqdm=False)
    for o, img, budget in zip(outs, "bc", (140, None)):
        ids = list(o.prompt_token_ids)
        n = ref.pixel_inputs(str(ckpt), [IMAGES[img]], budget)["num_soft_tokens"][0]
        assert ids.count(model.config.image_token_id) == n and (n > 70) == bool(budget)
        assert list(o.outputs[0].token_ids) == reference_tokens(model, ckpt, ids, [IMAGES[img]],
                                                                41, 20, 3, budget=budget), img


def test_image_features_equal_reference(llm, model, ckpt):
    import torch

    images = [IMAGES["a"], IMAGES["c"]]
    px = ref.pixel_inputs(str(ckpt), images)
    got = llm.collective_rpc("dgemma_image_features", args=(
        px["pixel_values"].tolist(), px["image_position_ids"].tolist(), px["num_soft_tokens"]))[0]
    want = ref.image_features(model, px["pixel_values"], px["image_position_ids"])
    assert [len(g) for g in got] == px["num_soft_tokens"]
    for g, w in zip(got, want):
        err = float((torch.tensor(g) - w.float()).abs().max() / w.float().abs().max())
        assert err <= FEATURE_TOL, err


def test_prefix_caching_keeps_images_apart(llm, model, ckpt):
    """Blocks of 32. A prompt whose cached blocks reach past its image: the same image again
    reuses them (the image included) and gives the same tokens; another image of the same size
    (the same token ids) reuses none of them. A prompt whose hit would end inside the image: the
    hit is cut to the image's start (the image's remaining rows need all of it on sliding layers,
    where vLLM keeps only the window before a hit), and the tokens are the reference's."""
    from vllm import SamplingParams

    long_text = TURN.format("<|image|>Tell me what you see in this image, in a few words please, "
                            "and then tell me a story about it, with a robot who paints the sea.")
    short_text = TURN.format("<|image|>Tell me what you see in this image, in a few words please.")
    sp = SamplingParams(max_tokens=20, seed=31, extra_args={"diffusion_max_steps": 3})

    def run(text, img):
        return llm.generate([{"prompt": text, "multi_modal_data": {"image": IMAGES[img]}}], sp,
                            use_tqdm=False)[0]

    first, again, other = run(long_text, "a"), run(long_text, "a"), run(long_text, "d")
    ids = list(first.prompt_token_ids)
    assert list(other.prompt_token_ids) == ids  # same size: the same token ids
    end = ids.index(model.config.eoi_token_id)
    assert again.num_cached_tokens > end, again.num_cached_tokens  # the image's blocks reused
    assert not other.num_cached_tokens, other.num_cached_tokens
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    short_first, short_again = run(short_text, "c"), run(short_text, "c")
    sids = list(short_first.prompt_token_ids)
    image_rows = [i for i, t in enumerate(sids) if t == model.config.image_token_id]
    # 32 <= the image's last row < the prompt's last full block: the hit would end inside it
    assert 32 < image_rows[-1] < (len(sids) - 1) // 32 * 32 + 32
    assert short_again.num_cached_tokens <= image_rows[0], short_again.num_cached_tokens
    for text_ids, img, o in ((ids, "a", first), (ids, "d", other), (sids, "c", short_again)):
        assert list(o.outputs[0].token_ids) == reference_tokens(model, ckpt, text_ids, [IMAGES[img]],
                                                                31, 20, 3), img


@pytest.mark.parametrize("case", ["too_many", "no_placeholder", "placeholder_without_image",
                                  "budget", "budget_past_the_step", "processor_kwarg"])
def test_bad_image_input_is_refused_and_the_engine_serves_on(llm, case):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    sp = SamplingParams(max_tokens=8, seed=1, extra_args={"diffusion_max_steps": 2})
    prompt, images, words = {
        "too_many": (TURN.format("<|image|><|image|><|image|>"), ["a", "b", "c"], ("image", "2")),
        "no_placeholder": (TURN.format("no image marker here"), ["a"], ("placeholder",)),
        "placeholder_without_image": (TURN.format("<|image|> here"), [], ("image",)),
        "budget": (TURN.format("<|image|>"), ["a"], ("max_soft_tokens", "70, 140")),
        # 560 soft tokens cannot be prefilled in one step of STEP_TOKENS (an image is never split):
        # refused by vLLM's encoder-cache check, not left waiting
        "budget_past_the_step": (TURN.format("<|image|>"), ["b"], ("encoder cache",)),
        "processor_kwarg": (TURN.format("<|image|>"), ["a"], ("do_resize", "not supported")),
    }[case]
    request = {"prompt": prompt}
    if case.startswith(("budget", "processor")):
        request["mm_processor_kwargs"] = {"budget": {"max_soft_tokens": 100},
                                          "budget_past_the_step": {"max_soft_tokens": 560},
                                          "processor_kwarg": {"do_resize": False}}[case]
    if images:
        request["multi_modal_data"] = {"image": [IMAGES[k] for k in images]}
    with pytest.raises((ValueError, VLLMValidationError)) as err:
        llm.generate([request], sp, use_tqdm=False)
    assert all(w in str(err.value) for w in words), str(err.value)
    ok = llm.generate([{"prompt": TURN.format("<|image|>fine"),
                        "multi_modal_data": {"image": IMAGES["a"]}}], sp, use_tqdm=False)[0]
    assert ok.outputs[0].finish_reason in ("stop", "length")


def test_image_example_runs(llm):
    mod = load_example("image_request")
    texts = mod.run_offline(llm, mod.demo_image())
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_engine_with_head_tiles_and_step_groups_equals_reference(llm, model):
    """Text requests on this module's engine (`dgemma_head_tile` 100: the tiny vocabulary of 512
    in 6 tiles, the last partial; 4 denoising steps per engine step): seeded tokens equal the
    reference's, and steps did run inside engine steps (the image tests run on the same settings:
    a multimodal model's forward takes embeddings, which the grouped steps write)."""
    from vllm import SamplingParams

    prompts = [[(17 * i + 3 * j) % 500 + 5 for j in range(4 + 11 * i)] for i in range(4)]
    params = [SamplingParams(max_tokens=40, seed=70 + i, extra_args={"diffusion_max_steps": 6})
              for i in range(4)]
    from dgemma_vllm.engine.stats import runner_stats

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    counters = runner_stats(llm)
    unseeded = llm.generate([{"prompt_token_ids": prompts[0]}] * 2,
                            SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    for p, sp, o in zip(prompts, params, outs):
        want = ref.expected_tokens(model, p, sp.seed, 40, EOS_IDS, max_denoising_steps=6)
        assert list(o.outputs[0].token_ids) == want
    assert counters["inner_steps"] > 0, counters
    assert all(len(o.outputs[0].token_ids) == 24 for o in unseeded)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids
