"""Thin wrappers around the `transformers` reference implementation (the oracle).

Nothing here re-implements the model: every number comes from
``transformers.DiffusionGemmaForBlockDiffusion`` on the same checkpoint. Tests and benchmarks
use these helpers to ask the reference the same questions the plugin answers.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def load_reference(path: str, dtype: str = "float32", attn_implementation: str = "eager"):
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    model.eval()
    return model


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


@torch.no_grad()
def encode(model, cache, token_ids: list[int]) -> None:
    """Causal encoder pass over `token_ids`, appended to `cache` at the next positions."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    model.model.encoder(input_ids=ids, past_key_values=cache)


@torch.no_grad()
def canvas_logits(model, cache, canvas_ids: list[int],
                  self_conditioning_logits: torch.Tensor | None = None, *,
                  prefix_len: int | None = None, position_shift: int = 0,
                  symmetric_window: bool = False) -> torch.Tensor:
    """Decoder (canvas) pass: softcapped fp32 logits ``[canvas, vocab]``; the cache is read only.

    `position_shift` and `symmetric_window` ask deliberately different questions (canvas at the
    wrong positions; sliding layers with the ``|q - k| <= W - 1`` window of flash attention
    instead of the eager/sdpa rule), used to show that a parity check can fail and as the oracle
    of the plugin's ``symmetric`` option."""
    ids = torch.tensor([canvas_ids], dtype=torch.long)
    c = ids.shape[1]
    L = cache.get_seq_length() if prefix_len is None else prefix_len
    pos = torch.arange(L + position_shift, L + position_shift + c)[None]
    sc = None if self_conditioning_logits is None else self_conditioning_logits[None]
    kwargs = {}
    if symmetric_window:
        cfg = model.config.get_text_config()
        w = cfg.sliding_window
        sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
        kept = cache.layers[sliding[0]].keys.shape[-2]
        k_pos = torch.arange(L - kept, L + c)
        q_pos = torch.arange(L, L + c)
        allowed = (q_pos[:, None] - k_pos[None, :]).abs() <= w - 1
        mask = torch.zeros(allowed.shape, dtype=torch.float32)
        mask[~allowed] = torch.finfo(torch.float32).min
        kwargs["decoder_attention_mask"] = {"full_attention": None,
                                            "sliding_attention": mask[None, None]}
    out = model(decoder_input_ids=ids, past_key_values=cache, self_conditioning_logits=sc,
                decoder_position_ids=pos, **kwargs)
    return out.logits[0]


@torch.no_grad()
def generate(model, prompt_ids: list[int], seed: int, **gen_kwargs) -> list[int]:
    """`generate` for one prompt after ``torch.manual_seed(seed)``; returns the new tokens."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(ids, **gen_kwargs)
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[0, len(prompt_ids):].tolist()


def expected_tokens(model, prompt_ids: list[int], seed: int, max_tokens: int, eos_ids,
                    **gen_kwargs) -> list[int]:
    """What a vLLM request must return: the reference's new tokens up to and including its
    first EOS (the reference keeps the EOS and pads after it), at most `max_tokens`."""
    toks = generate(model, prompt_ids, seed, max_new_tokens=max_tokens, **gen_kwargs)
    return until_eos(toks, max_tokens, eos_ids)


def until_eos(tokens: list[int], max_tokens: int, eos_ids) -> list[int]:
    """The reference's new tokens as a vLLM request returns them: up to and including the first
    EOS, at most `max_tokens`."""
    tokens = tokens[:max_tokens]
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


# ----------------------------------------------------------------------------- images
def image_processor(path: str):
    """The checkpoint's image processor as transformers loads it (``Gemma4ImageProcessorPil``
    where torchvision is absent: PIL and numpy only)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def pixel_inputs(path: str, images, max_soft_tokens: int | None = None) -> dict:
    """``pixel_values`` / ``image_position_ids`` (one row per image, padded to the budget's
    patches) and ``num_soft_tokens_per_image``, by the checkpoint's own image processor (at
    its budget, or `max_soft_tokens`)."""
    kw = {} if max_soft_tokens is None else {"max_soft_tokens": max_soft_tokens}
    out = image_processor(path)(list(images), return_tensors="pt", **kw)
    return {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"],
            "num_soft_tokens": [int(n) for n in out["num_soft_tokens_per_image"]]}


def expand_image_tokens(config, prompt_ids: list[int], num_soft_tokens: list[int]) -> list[int]:
    """Each image token of `prompt_ids` replaced by boi + N image tokens + eoi (N of that image,
    in order): what Gemma 4's processor makes of the chat template's one ``<|image|>`` per image."""
    out, k = [], 0
    for t in prompt_ids:
        if t == config.image_token_id:
            out += [config.boi_token_id] + [config.image_token_id] * num_soft_tokens[k] + [
                config.eoi_token_id]
            k += 1
        else:
            out.append(t)
    if k != len(num_soft_tokens):
        raise ValueError(f"{k} image tokens in the prompt for {len(num_soft_tokens)} images")
    return out


def mm_token_type_ids(config, ids: list[int]) -> torch.Tensor:
    """1 at image soft tokens, 0 elsewhere (transformers' ``create_mm_token_type_ids``)."""
    return torch.tensor([[1 if t == config.image_token_id else 0 for t in ids]])


@torch.no_grad()
def image_features(model, pixel_values, image_position_ids) -> list[torch.Tensor]:
    """The reference's image features (vision tower, then the multimodal embedder), one
    ``[N_i, hidden]`` tensor per image, each image encoded alone."""
    enc = model.model.encoder
    return [enc.get_image_features(pixel_values[i:i + 1].to(model.dtype),
                                   image_position_ids[i:i + 1]).pooler_output
            for i in range(pixel_values.shape[0])]


@torch.no_grad()
def generate_with_images(model, ids: list[int], pixels: dict | None, seed: int,
                         gemma4_mask: bool = False, **gen_kwargs) -> list[int]:
    """`generate(pixel_values=..., image_position_ids=..., mm_token_type_ids=...)` on the expanded
    prompt `ids` after ``torch.manual_seed(seed)``; returns the new tokens. `gemma4_mask` asks a
    deliberately different question: image tokens bidirectional on sliding layers only, full layers
    causal inside an image (plain Gemma 4's rule, not DiffusionGemma's), to show a check fails."""
    import contextlib

    kwargs = dict(gen_kwargs)
    if pixels is not None:
        kwargs.update(pixel_values=pixels["pixel_values"].to(model.dtype),
                      image_position_ids=pixels["image_position_ids"],
                      mm_token_type_ids=mm_token_type_ids(model.config, ids))
    enc = model.model.encoder
    ctx = contextlib.nullcontext()
    if gemma4_mask:
        orig = type(enc).create_masks_for_generate

        def masks(*a, mm_token_type_ids=None, **kw):
            with_blocks = orig(*a, mm_token_type_ids=mm_token_type_ids, **kw)
            causal = orig(*a, mm_token_type_ids=None, **kw)
            return {**with_blocks, "full_attention": causal["full_attention"]}

        ctx = _patched(enc, "create_masks_for_generate", masks)
    with ctx:
        torch.manual_seed(seed)
        out = model.generate(torch.tensor([ids], dtype=torch.long), **kwargs)
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[0, len(ids):].tolist()


def _patched(obj, name, value):
    import contextlib

    @contextlib.contextmanager
    def cm():
        setattr(obj, name, value)
        try:
            yield
        finally:
            delattr(obj, name)

    return cm()
