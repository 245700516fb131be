"""The checkpoint factory writes the release layout (checked with transformers and safetensors)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from conftest import checkpoint
from dgemma_vllm.checkpoints.factory import (
    EOS_ID, EOT_ID, PAD_ID, make_autoregressive_checkpoint, make_diffusion_checkpoint)


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
    assert gen["eos_token_id"] == [EOS_ID, EOT_ID] and gen["pad_token_id"] == PAD_ID
    assert gen["max_denoising_steps"] == 48 and gen["sampler_config"]["entropy_bound"] == 0.1
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert len(tok) == 512 and tok.eos_token_id == EOS_ID
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nHello<end_of_turn>\n") and text.endswith("model\n")
    ids = tok("The quick brown fox")["input_ids"]
    assert tok.decode(ids) == "The quick brown fox"


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
