"""The checkpoint factory writes the release layout (checked with transformers and safetensors)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import checkpoint
from dgemma_vllm.checkpoints.factory import (
    EOS_ID, EOS_IDS, PAD_ID, make_autoregressive_checkpoint, make_diffusion_checkpoint)


def _keys(path):
    keys = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def test_release_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    assert cfg["model_type"] == "diffusion_gemma" and cfg["canvas_length"] == 16
    keys = _keys(tiny_ckpt)
    n = cfg["text_config"]["num_hidden_layers"]
    # tied keys absent, tie sources present
    assert "lm_head.weight" not in keys
    assert not any(k.startswith("model.encoder.language_model.") and not k.endswith("layer_scalar") for k in keys)
    assert "model.decoder.embed_tokens.weight" in keys
    # both layer_scalar copies stored
    for i in range(n):
        assert f"model.decoder.layers.{i}.layer_scalar" in keys
        assert f"model.encoder.language_model.layers.{i}.layer_scalar" in keys
    # full layers are k_eq_v (no v_proj), sliding layers have one
    types = cfg["text_config"]["layer_types"]
    for i, t in enumerate(types):
        assert (f"model.decoder.layers.{i}.self_attn.v_proj.weight" in keys) == (t == "sliding_attention")
    assert any(k.startswith("model.encoder.vision_tower.") for k in keys)
    assert {f"model.decoder.self_conditioning.{m}.weight" for m in ("pre_norm", "gate_proj", "up_proj", "down_proj")} <= keys


def test_generation_config_and_tokenizer(tiny_ckpt):
    from transformers import AutoTokenizer

    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(EOS_IDS) == [1, 106, 50] and gen["pad_token_id"] == PAD_ID
    assert gen["max_denoising_steps"] == 48 and gen["sampler_config"]["entropy_bound"] == 0.1
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert len(tok) == 512 and tok.eos_token_id == EOS_ID
    # the release's special tokens at the release's ids, the image markers inside the vocabulary
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert tok.convert_ids_to_tokens([0, 1, 2, 50, 105, 106]) == [
        "<pad>", "<eos>", "<bos>", "<|tool_response>", "<|turn>", "<turn|>"]
    assert tok.convert_ids_to_tokens([cfg["boi_token_id"], cfg["image_token_id"], cfg["eoi_token_id"]]) == [
        "<|image>", "<|image|>", "<image|>"]
    assert cfg["boi_token_id"] < cfg["image_token_id"] < cfg["eoi_token_id"] < 512
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello"},
                                    {"role": "assistant", "content": "Hi", "reasoning_content": "greet"},
                                    {"role": "user", "content": "Bye"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello<turn|>\n"
                    "<|turn>model\n<|channel>thought\ngreet<channel|>Hi<turn|>\n"
                    "<|turn>user\nBye<turn|>\n<|turn>model\n")
    think = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=True)
    assert think.startswith("<bos><|turn>system\n<|think|><turn|>\n")
    ids = tok("The quick brown fox")["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1  # <bos> first, as Gemma's tokenizers
    assert tok.decode(ids, skip_special_tokens=True) == "The quick brown fox"


# The release's config.json and generation_config.json as recorded in
# ../shared/reference/release-config.md (transcribed here by hand, so a drift of the factory fails).
RELEASE_TOP = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
    "canvas_length": 256, "eos_token_id": [1, 106, 50], "boi_token_id": 255999,
    "eoi_token_id": 258882, "image_token_id": 258880, "vision_soft_tokens_per_image": 280,
    "tie_word_embeddings": True,
}
RELEASE_TEXT = {
    "model_type": "diffusion_gemma_text", "dtype": "bfloat16", "hidden_size": 2816,
    "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
    "global_head_dim": 512, "num_global_key_value_heads": 2, "intermediate_size": 2112,
    "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
    "attention_bias": False, "sliding_window": 1024, "max_position_embeddings": 262144,
    "vocab_size": 262144, "use_bidirectional_attention": "vision", "pad_token_id": 0,
    "bos_token_id": 2, "eos_token_id": 1,
    "rope_parameters": {
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
}
RELEASE_VISION = {
    "model_type": "gemma4_vision", "hidden_size": 1152, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72, "intermediate_size": 4304,
    "patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 10240, "standardize": True,
    "use_clipped_linears": False, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    "rms_norm_eps": 1e-6,
}
RELEASE_GENERATION = {
    "max_new_tokens": 256, "max_denoising_steps": 48,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50], "pad_token_id": 0,
}


def _check(got: dict, want: dict, where: str) -> None:
    for k, v in want.items():
        assert k in got, f"{where}.{k} missing"
        assert got[k] == v, f"{where}.{k}: factory {got[k]!r}, release {v!r}"


def test_full_config_is_the_release(tmp_path):
    """The `full` geometry's config.json and generation_config.json hold every value the release
    records; the full layers have no v_proj and use the global head geometry."""
    p = make_diffusion_checkpoint(tmp_path / "full", "full", config_only=True)
    cfg = json.loads((p / "config.json").read_text())
    _check(cfg, RELEASE_TOP, "config")
    _check(cfg["text_config"], RELEASE_TEXT, "text_config")
    _check(cfg["vision_config"], RELEASE_VISION, "vision_config")
    gen = json.loads((p / "generation_config.json").read_text())
    _check(gen, RELEASE_GENERATION, "generation_config")
    for k in ("top_k", "top_p", "temperature"):
        assert k not in gen
    # the structure holds at small sizes too: same keys, same non-size values
    small = json.loads((make_diffusion_checkpoint(tmp_path / "t", "tiny", config_only=True)
                        / "config.json").read_text())
    assert set(small) == set(cfg) and set(small["text_config"]) == set(cfg["text_config"])
    assert set(small["vision_config"]) == set(cfg["vision_config"])
    for k in ("use_bidirectional_attention", "hidden_activation", "rope_parameters", "dtype",
              "final_logit_softcapping", "rms_norm_eps", "attention_bias"):
        assert small["text_config"][k] == cfg["text_config"][k], k
    assert small["eos_token_id"] == [1, 106, 50]


def test_sharded_and_reloadable(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    p = make_diffusion_checkpoint(tmp_path / "sh", "tiny", max_shard_size="300KB")
    assert len(list(p.glob("model-*.safetensors"))) > 1 and (p / "model.safetensors.index.json").exists()
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(p)
    dec = m.model.decoder.layers[0].layer_scalar.item()
    enc = m.model.encoder.language_model.layers[0].layer_scalar.item()
    assert dec != enc  # the two copies differ in test checkpoints, so mixing them up is visible


def test_full_geometry_config_only(tmp_path):
    from transformers import AutoConfig

    p = make_diffusion_checkpoint(tmp_path / "full", "full", config_only=True)
    assert not list(p.glob("*.safetensors"))
    t = AutoConfig.from_pretrained(p).text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_experts, t.top_k_experts, t.vocab_size) == (2816, 30, 128, 8, 262144)
    assert [i for i, x in enumerate(t.layer_types) if x == "full_attention"] == [5, 11, 17, 23, 29]
    assert (t.per_layer_config[5].head_dim, t.per_layer_config[5].num_key_value_heads) == (512, 2)
    assert (t.per_layer_config[0].head_dim, t.per_layer_config[0].num_key_value_heads) == (256, 8)


def test_autoregressive_twin(tmp_path):
    from transformers import Gemma4ForCausalLM

    p = make_autoregressive_checkpoint(tmp_path / "ar", "tiny")
    m = Gemma4ForCausalLM.from_pretrained(p)
    assert m.config.enable_moe_block and m.config.attention_k_eq_v
    assert m.config.num_experts == 4 and m.config.final_logit_softcapping == 30.0


def test_unknown_geometry_is_named():
    with pytest.raises(ValueError, match="geometry must be one of"):
        checkpoint("nope")


def test_cli_help_and_make_checkpoint(tmp_path):
    """`dgemma-vllm --help` lists every subcommand with its explanation; each subcommand answers
    `--help`; `make-checkpoint` writes a loadable checkpoint."""
    import subprocess
    import sys

    exe = [sys.executable, "-m", "dgemma_vllm.cli"]
    top = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("demo", "make-checkpoint", "serve", "bench"):
        assert f"dgemma-vllm {sub}" in top
    for sub in ("demo", "make-checkpoint", "bench"):
        r = subprocess.run([*exe, sub, "--help"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (sub, r.stdout[-500:], r.stderr[-500:])
    out = tmp_path / "ck"
    subprocess.run([*exe, "make-checkpoint", str(out), "--geometry", "tiny"], check=True,
                   capture_output=True, timeout=300)
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    assert (out / "tokenizer.json").exists()
