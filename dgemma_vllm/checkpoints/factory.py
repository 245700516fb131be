"""Random-weight DiffusionGemma checkpoints in the exact release layout.

No real weights can be downloaded where this project is built and tested, so every test,
demo and benchmark runs on checkpoints written here. They are written by `transformers`
itself (``DiffusionGemmaConfig`` / ``DiffusionGemmaForBlockDiffusion`` and
``save_pretrained``), so the file layout is the release's: tied keys absent, both
``layer_scalar`` copies present, ``canvas_length`` at the top of ``config.json``, optional
sharding.  Beside the weights go ``generation_config.json`` (EOS/pad ids and the sampler
defaults) and a byte-level BPE tokenizer built with ``tokenizers`` that carries a chat
template.

The same backbone geometry can also be written as an autoregressive Gemma 4 checkpoint
(``Gemma4ForCausalLM``) for side-by-side comparisons.

Random weights are drawn with a larger spread than the library's initialiser and the
norm weights, router scales and the two ``layer_scalar`` copies are perturbed away from 1,
so that a parity test can see a mistake such as ``1 + w`` instead of ``w`` or the encoder
and decoder scalars swapped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

S, F = "sliding_attention", "full_attention"

# Token ids of the release (release-config.md): pad 0, eos 1, bos 2; the turn markers 105 / 106
# (106 = end of turn, a stop id); 50, the release's third stop id (`<|tool_response>`: the model
# ends a tool-call turn with it, vLLM's Gemma 4 tool parser reads it so). The other Gemma 4 markers
# (tool calls, the string quote of tool arguments, the thinking channel) are placed at ids of our
# choosing below 106; the image markers sit at the top of the vocabulary in the release's order
# (boi < image < eoi), scaled down from 255999 / 258880 / 258882 of a 262144 vocabulary.
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SOT_ID, EOT_ID, TOOL_RESPONSE_ID = 105, 106, 50
EOS_IDS = (EOS_ID, EOT_ID, TOOL_RESPONSE_ID)  # generation_config.json eos_token_id: [1, 106, 50]
FIXED_SPECIAL_TOKENS = {
    PAD_ID: "<pad>", EOS_ID: "<eos>", BOS_ID: "<bos>", UNK_ID: "<unk>", MASK_ID: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
    TOOL_RESPONSE_ID: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    SOT_ID: "<|turn>", EOT_ID: "<turn|>",
}
IMAGE_TOKENS = ("<|image>", "<|image|>", "<image|>")  # boi, image soft token, eoi


def image_token_ids(vocab_size: int) -> dict[str, int]:
    """boi / image / eoi ids inside a vocabulary of `vocab_size` (the release's for 262144)."""
    if vocab_size == 262144:
        return {"boi_token_id": 255999, "image_token_id": 258880, "eoi_token_id": 258882}
    return {"boi_token_id": vocab_size - 4, "image_token_id": vocab_size - 2,
            "eoi_token_id": vocab_size - 1}


def special_token_ids(vocab_size: int) -> dict[int, str]:
    ids = dict(FIXED_SPECIAL_TOKENS)
    img = image_token_ids(vocab_size)
    for key, tok in zip(("boi_token_id", "image_token_id", "eoi_token_id"), IMAGE_TOKENS):
        ids[img[key]] = tok
    return ids


def is_special(token_id: int, vocab_size: int) -> bool:
    return token_id in special_token_ids(vocab_size)


def text_token_ids(vocab_size: int, lo: int = 0) -> list[int]:
    """Ids >= `lo` that are no special token (for random prompts of tests and benchmarks)."""
    sp = special_token_ids(vocab_size)
    return [i for i in range(lo, vocab_size) if i not in sp]


# Gemma 4's turn format (`<|turn>role\n ... <turn|>\n`, role `model` for the assistant, the
# thinking channel `<|channel>thought\n ... <channel|>` before an assistant answer that carries
# `reasoning_content`, `<|think|>` at the start of the system turn when `enable_thinking` is on).
# A reproduction from vLLM's Gemma 4 parsers, not the release's file (README: known differences).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% if sys is not none or enable_thinking is defined and enable_thinking %}"
    "<|turn>system\n{% if enable_thinking is defined and enable_thinking %}<|think|>{% endif %}"
    "{{ (sys or '') | trim }}<turn|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if role == 'model' and message.get('reasoning_content') %}"
    "<|channel>thought\n{{ message['reasoning_content'] | trim }}<channel|>"
    "{% endif %}"
    # content as a string, or as parts (OpenAI-style: images where they stand, then text)
    "{% set content = message['content'] or '' %}"
    "{% if content is string %}{{ content | trim }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# Sampler defaults of the released generation_config.json (semantics sheet, section C).
SAMPLER_DEFAULTS = dict(
    max_denoising_steps=48,
    entropy_bound=0.1,
    t_min=0.4,
    t_max=0.8,
    stability_threshold=1,
    confidence_threshold=0.005,
)


@dataclass(frozen=True)
class Geometry:
    """Text-backbone geometry (the vision tower is the release's at `full` and a one-layer stub of
    the same structure otherwise, `vision_config_kwargs`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int
    layer_types: tuple[str, ...] | None = None  # None: the release's 5 sliding : 1 full pattern
    max_position_embeddings: int = 8192
    init_std: float = 0.02
    perturb: float = 0.0  # spread of norm weights / scales / layer scalars around 1
    # factor on the q_norm / k_norm weights: Gemma 4 attends with scaling 1 on unit-RMS q and k,
    # so random norm weights near 1 give scores of spread ~head_dim and near one-hot attention,
    # whose winner a bf16 rounding flips (transformers' own bf16 logits then differ from its fp32
    # ones by ~50%); 0.1 makes the random model well conditioned for bf16 checks (~1%)
    qk_norm_scale: float = 1.0
    note: str = ""
    extra: dict = field(default_factory=dict)


GEOMETRIES: dict[str, Geometry] = {
    # Seconds on CPU. Both layer types, GQA, a window far below the prompts used in tests.
    "tiny": Geometry(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
        num_global_key_value_heads=1, sliding_window=16, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, canvas_length=16, layer_types=(S, F, S, F),
        init_std=0.1, perturb=0.25, note="unit tests and the demo",
    ),
    # Second small geometry: the release's 5:1 layer pattern, more heads, a 96-dim full-layer head
    # (vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ...).
    "small": Geometry(
        vocab_size=1024, hidden_size=96, intermediate_size=192, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=96,
        num_global_key_value_heads=1, sliding_window=32, num_experts=8, top_k_experts=2,
        moe_intermediate_size=48, canvas_length=32, init_std=0.1, perturb=0.25,
        note="second parity geometry (5 sliding : 1 full)",
    ),
    # Third parity geometry: odd canvas (12), tiny window (8), top-3 of 6 experts, 4 query heads.
    "tiny_alt": Geometry(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
        num_global_key_value_heads=1, sliding_window=8, num_experts=6, top_k_experts=3,
        moe_intermediate_size=32, canvas_length=12, layer_types=(S, S, F),
        init_std=0.1, perturb=0.25, note="third parity geometry (odd canvas, window 8)",
    ),
    # CPU benchmarks: 6 sliding + 2 full layers, realistic head dims and a 256-token canvas.
    "medium": Geometry(
        vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, global_head_dim=256,
        num_global_key_value_heads=1, sliding_window=512, num_experts=16, top_k_experts=2,
        moe_intermediate_size=256, canvas_length=256, layer_types=(S, S, S, F, S, S, S, F),
        init_std=0.05, perturb=0.1, note="CPU benchmarks",
    ),
    # A small-compute geometry for host overhead (issue 24): a canvas of 32, 256 hidden units, 4
    # layers, 4096 ids; a step computes in a few ms on CPU, so per-step host work decides speed,
    # as on a GPU at full size.
    "lean": Geometry(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
        num_global_key_value_heads=1, sliding_window=128, num_experts=8, top_k_experts=2,
        moe_intermediate_size=128, canvas_length=32, layer_types=(S, F, S, F),
        init_std=0.05, perturb=0.1, note="host-overhead benchmarks (small compute per step)",
    ),
    # google/diffusiongemma-26B-A4B-it as published (semantics sheet, section F). Config only.
    "full": Geometry(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
        moe_intermediate_size=704, canvas_length=256, max_position_embeddings=262144,
        note="full 26B-A4B geometry; config only (about 51.6 GB of bf16 weights)",
    ),
}


def get_geometry(name_or_geometry: str | Geometry, **overrides) -> Geometry:
    if isinstance(name_or_geometry, Geometry):
        geo = name_or_geometry
    else:
        if name_or_geometry not in GEOMETRIES:
            raise ValueError(
                f"geometry must be one of {sorted(GEOMETRIES)}, got {name_or_geometry!r}"
            )
        geo = GEOMETRIES[name_or_geometry]
    return replace(geo, **overrides) if overrides else geo


def _layer_types(geo: Geometry) -> list[str]:
    if geo.layer_types is not None:
        return list(geo.layer_types)
    return [S if (i + 1) % 6 else F for i in range(geo.num_hidden_layers)]


def text_config_kwargs(geo: Geometry) -> dict:
    return dict(
        vocab_size=geo.vocab_size,
        hidden_size=geo.hidden_size,
        intermediate_size=geo.intermediate_size,
        num_hidden_layers=geo.num_hidden_layers,
        num_attention_heads=geo.num_attention_heads,
        num_key_value_heads=geo.num_key_value_heads,
        head_dim=geo.head_dim,
        global_head_dim=geo.global_head_dim,
        num_global_key_value_heads=geo.num_global_key_value_heads,
        sliding_window=geo.sliding_window,
        layer_types=_layer_types(geo),
        num_experts=geo.num_experts,
        top_k_experts=geo.top_k_experts,
        moe_intermediate_size=geo.moe_intermediate_size,
        max_position_embeddings=geo.max_position_embeddings,
        initializer_range=geo.init_std,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        attention_bias=False,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1_000_000.0},
        },
        **geo.extra,
    )


def vision_config_kwargs(geo: Geometry) -> dict:
    """The release's Gemma 4 vision tower config (release-config.md), scaled down except for the
    `full` geometry; the image settings (patch 16, pooling 3, standardize, no clipped linears,
    rope theta 100) are the release's at every size."""
    full = geo.vocab_size == 262144
    return dict(
        model_type="gemma4_vision",
        hidden_size=1152 if full else 32, intermediate_size=4304 if full else 64,
        num_hidden_layers=27 if full else 1, num_attention_heads=16 if full else 2,
        num_key_value_heads=16 if full else 2, head_dim=72 if full else 16,
        patch_size=16, pooling_kernel_size=3, position_embedding_size=10240 if full else 64,
        standardize=True, use_clipped_linears=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        default_output_length=soft_tokens_per_image(geo),
    )


def soft_tokens_per_image(geo: Geometry) -> int:
    """The image budget: the release's 280 soft tokens; 70 (the smallest budget Gemma 4's image
    processor accepts) at the small sizes."""
    return 280 if geo.vocab_size == 262144 else 70


def save_image_processor(out: Path, geo: Geometry) -> None:
    """preprocessor_config.json as the release writes it (`Gemma4ImageProcessor`: patch 16,
    pooling 3, rescale 1/255, no normalisation), with this geometry's soft-token budget.
    transformers loads it as ``Gemma4ImageProcessorPil`` where torchvision is absent."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    Gemma4ImageProcessorPil(max_soft_tokens=soft_tokens_per_image(geo), patch_size=16,
                            pooling_kernel_size=3).save_pretrained(out)
    p = out / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg["image_processor_type"] = "Gemma4ImageProcessor"
    p.write_text(json.dumps(cfg, indent=2))


def diffusion_config(geo: Geometry, with_vision: bool = True):
    from transformers import DiffusionGemmaConfig

    return DiffusionGemmaConfig(
        # the release: image tokens attend bidirectionally within their image, text causally
        text_config={**text_config_kwargs(geo), "use_bidirectional_attention": "vision"},
        vision_config=vision_config_kwargs(geo) if with_vision else None,
        canvas_length=geo.canvas_length,
        tie_word_embeddings=True,
        architectures=["DiffusionGemmaForBlockDiffusion"],
        eos_token_id=list(EOS_IDS),
        vision_soft_tokens_per_image=soft_tokens_per_image(geo),
        **image_token_ids(geo.vocab_size),
    )


def _release_config_json(out: Path, geo: Geometry, dtype: str) -> None:
    """Fields the release's config.json carries that `save_pretrained` does not write as the
    release has them: the text config's `final_logit_softcapping` (a class attribute in
    transformers, so never saved), `global_head_dim` / `num_global_key_value_heads` (folded into
    `per_layer_config` on save), its `dtype`, and the vision rope as written in the release
    (transformers normalises `default` to `axial` on load)."""
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    t = cfg["text_config"]
    t["final_logit_softcapping"] = 30.0
    t["global_head_dim"] = geo.global_head_dim
    t["num_global_key_value_heads"] = geo.num_global_key_value_heads
    t["dtype"] = dtype
    cfg["dtype"] = dtype
    if "vision_config" in cfg and cfg["vision_config"] is not None:
        cfg["vision_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 100.0}
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def generation_config(geo: Geometry, **sampler_overrides):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    s = {**SAMPLER_DEFAULTS, **sampler_overrides}
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=256,
        max_denoising_steps=s["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(s["entropy_bound"])),
        t_min=s["t_min"],
        t_max=s["t_max"],
        stability_threshold=s["stability_threshold"],
        confidence_threshold=s["confidence_threshold"],
        pad_token_id=PAD_ID,
        eos_token_id=list(EOS_IDS),
    )


# ----------------------------------------------------------------------------- tokenizer
_CORPUS = """
The quick brown fox jumps over the lazy dog. A diffusion language model refines a whole block
of tokens at once instead of writing one token after another. Each canvas starts as noise and
becomes text after a few denoising steps; then it is committed and the next canvas begins.
Servers batch many requests together, share memory in pages and stream the answer back.
What is the capital of France? Paris is the capital of France. Tell me a story about a robot
who learns to paint. Once upon a time there was a small robot that loved the colours of the sea.
Write a poem about the moon. Explain how a transformer works in simple words. Numbers 0 1 2 3 4
5 6 7 8 9 10 100 1000. def hello(): return "world"  # code, too. Question: why is the sky blue?
Answer: because air scatters blue light more than red light. Thank you! You are welcome.
"""


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a small embedded corpus, with the release's special
    tokens at the release's ids (``special_token_ids``) and padded to `vocab_size` with
    ``<unused_k>`` entries, so that every model id decodes to something."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = special_token_ids(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 2048) - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    if len(trained) + len(specials) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + specials "
                         f"({len(trained) + len(specials)})")
    # the special tokens at their fixed ids, the trained pieces in their order at the free ids
    free = (i for i in range(vocab_size) if i not in specials)
    vocab = {t: i for i, t in specials.items()}
    for (piece, _), i in zip(trained, free):
        vocab[piece] = i
    k = 0
    for i in free:
        vocab[f"<unused_{k}>"] = i
        k += 1
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for i, t in sorted(specials.items())]
    out = Tokenizer.from_str(json.dumps(data))
    # Gemma's tokenizers put <bos> in front of every encoded text (add_bos_token)
    out.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    return out


def save_tokenizer(out: Path, vocab_size: int) -> None:
    from transformers import PreTrainedTokenizerFast

    specials = special_token_ids(vocab_size)
    named = {PAD_ID, EOS_ID, BOS_ID, UNK_ID}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab_size),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[t for i, t in sorted(specials.items()) if i not in named],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # the image markers by name (Gemma 4's processor reads tokenizer.image_token / boi / eoi)
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(zip(("boi_token", "image_token", "eoi_token"), IMAGE_TOKENS))
    p.write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------- weights
def _perturb_(model, geo: Geometry, seed: int) -> None:
    """Move norm weights, router scales and the layer scalars away from 1 (deterministically),
    then scale the attention q/k norm weights by ``geo.qk_norm_scale``."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    gv = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if geo.perturb > 0 and (name.endswith("layer_scalar") or "norm.weight" in name
                                    or name.endswith(("router.scale", "router.per_expert_scale"))):
                noise = (torch.rand(t.shape, generator=g) * 2 - 1) * geo.perturb
                t.copy_((1.0 + noise).to(t.dtype))
            if geo.perturb > 0 and name.endswith(("vision_tower.std_bias", "vision_tower.std_scale")):
                # the vision tower's standardisation (0 and 1 after init: a skipped or
                # misapplied standardize would go unseen)
                # (its own generator: the text weights stay those of earlier factory versions)
                noise = (torch.rand(t.shape, generator=gv) * 2 - 1) * geo.perturb
                t.copy_((noise + name.endswith("std_scale")).to(t.dtype))
            if geo.qk_norm_scale != 1.0 and name.endswith(("self_attn.q_norm.weight",
                                                           "self_attn.k_norm.weight")):
                t.mul_(geo.qk_norm_scale)


def _write(model_cls, cfg, gen, geo: Geometry, out: Path, *, seed: int, dtype: str,
           config_only: bool, release_json: bool = False, **save_kwargs) -> None:
    """Config, generation config, tokenizer and (unless `config_only`) random weights."""
    import torch

    if config_only:
        cfg.save_pretrained(out)
    else:
        torch.manual_seed(seed)
        model = model_cls(cfg)
        _perturb_(model, geo, seed)
        model = model.to(getattr(torch, dtype))
        model.generation_config = gen
        model.save_pretrained(out, **save_kwargs)
    gen.save_pretrained(out)
    save_tokenizer(out, geo.vocab_size)
    if release_json:
        _release_config_json(out, geo, dtype)
        save_image_processor(out, geo)


def make_diffusion_checkpoint(
    out_dir: str | os.PathLike,
    geometry: str | Geometry = "tiny",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_size: str | None = None,
    config_only: bool = False,
    sampler_overrides: dict | None = None,
    **geometry_overrides,
) -> Path:
    """Write a random-weight DiffusionGemma checkpoint (config, generation config, tokenizer,
    weights) to `out_dir` and return its path."""
    from transformers import DiffusionGemmaForBlockDiffusion

    geo = get_geometry(geometry, **geometry_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = generation_config(geo, **(sampler_overrides or {}))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    _write(DiffusionGemmaForBlockDiffusion, diffusion_config(geo), gen, geo, out, seed=seed,
           dtype=dtype, config_only=config_only, release_json=True, **kwargs)
    (out / "dgemma_geometry.json").write_text(json.dumps(asdict(geo), indent=2))
    return out


def make_autoregressive_checkpoint(
    out_dir: str | os.PathLike,
    geometry: str | Geometry = "tiny",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    config_only: bool = False,
    **geometry_overrides,
) -> Path:
    """Write the autoregressive Gemma 4 (`Gemma4ForCausalLM`) checkpoint of the same backbone
    geometry: MoE block on, k_eq_v full layers, no per-layer embeddings, softcap 30."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig, GenerationConfig

    geo = get_geometry(geometry, **geometry_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = text_config_kwargs(geo)
    cfg = Gemma4TextConfig(
        **kw,
        enable_moe_block=True,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        architectures=["Gemma4ForCausalLM"],
    )
    gen = GenerationConfig(bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=list(EOS_IDS))
    _write(Gemma4ForCausalLM, cfg, gen, geo, out, seed=seed, dtype=dtype, config_only=config_only)
    return out


FACTORY_VERSION = 3  # 3: image processor config, named image tokens, image parts in the chat template


def cached_checkpoint(geometry: str = "tiny", kind: str = "diffusion", root: str | os.PathLike | None = None,
                      **kwargs) -> Path:
    """Build a checkpoint once and reuse it (keyed by geometry, kind and arguments)."""
    root = cache_root(root)
    # FACTORY_VERSION: bumped whenever what the factory writes changes (stale caches are not reused)
    key = "-".join([f"v{FACTORY_VERSION}", kind, geometry]
                   + [f"{k}={v}" for k, v in sorted(kwargs.items())]).replace("/", "_")
    out = root / "checkpoints" / key
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    if kind == "diffusion":
        return build_once(out, lambda tmp: make_diffusion_checkpoint(tmp, geometry, **kwargs))
    if kind == "autoregressive":
        return build_once(out, lambda tmp: make_autoregressive_checkpoint(tmp, geometry, **kwargs))
    raise ValueError(f"kind must be 'diffusion' or 'autoregressive', got {kind!r}")


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Where cached checkpoints and adapters live: `root`, else $DGEMMA_CACHE, else .cache/."""
    return Path(root or os.environ.get("DGEMMA_CACHE", Path(__file__).resolve().parents[2] / ".cache"))


def build_once(out: Path, build) -> Path:
    """Write with `build(tmp_dir)` into a temporary sibling of `out`, then move it in place (a
    concurrent builder that moved first wins; its copy is kept)."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="dgemma-vllm make-checkpoint",
        description="Write a random-weight DiffusionGemma (or autoregressive Gemma 4) checkpoint "
        "in the release layout.",
    )
    p.add_argument("out_dir")
    p.add_argument("--geometry", default="tiny", choices=sorted(GEOMETRIES),
                   help="; ".join(f"{k}: {v.note}" for k, v in GEOMETRIES.items()))
    p.add_argument("--kind", default="diffusion", choices=["diffusion", "autoregressive"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default bfloat16, as the release)")
    p.add_argument("--max-shard-size", default=None, help='e.g. "200KB" to write sharded weights')
    p.add_argument("--config-only", action="store_true", help="write config/tokenizer, no weights")
    a = p.parse_args(argv)
    config_only = a.config_only or a.geometry == "full"
    if a.kind == "diffusion":
        out = make_diffusion_checkpoint(a.out_dir, a.geometry, seed=a.seed, dtype=a.dtype,
                                        max_shard_size=a.max_shard_size, config_only=config_only)
    else:
        out = make_autoregressive_checkpoint(a.out_dir, a.geometry, seed=a.seed, dtype=a.dtype,
                                             config_only=config_only)
    print(f"wrote {out}{' (config only)' if config_only else ''}")


if __name__ == "__main__":
    main()
