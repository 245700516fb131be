"""Random LoRA adapters for a DiffusionGemma checkpoint, in PEFT's layout, written by ``peft``.

``peft`` wraps the checkpoint's ``transformers`` model (DiffusionGemmaForBlockDiffusion) and
``save_pretrained`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's
names (``base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight``), exactly what a
fine-tuning run writes. Only the decoder's modules are targeted: the encoder's text layers are
tied to them (one weight set, see ``dgemma_vllm/model/lora.py``), so merging the adapter into the
tied weights (``PeftModel.merge_and_unload``) gives the reference for both modes.

The weights are drawn from a seeded generator (A ~ N(0, 1/in), B ~ N(0, ``scale``)) rather than
PEFT's init (B = 0, a no-op adapter), so that each adapter visibly changes the output.

    dgemma-vllm make-adapter OUT_DIR --base CHECKPOINT [--rank 8] [--alpha 16] [--seed 0]
        [--targets all|attention|mlp] [--scale 0.05]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dgemma_vllm.checkpoints.factory import build_once, cache_root

TARGET_SETS = {
    "all": r"(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)|"
           r"self_conditioning\.(gate|up|down)_proj)",
    "attention": r"layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "mlp": r"(layers\.\d+\.mlp\.(gate|up|down)_proj|self_conditioning\.(gate|up|down)_proj)",
}


def make_adapter(out_dir, base, *, rank: int = 8, alpha: float = 16, seed: int = 0,
                 targets: str = "all", scale: float = 0.05) -> Path:
    """Write a random adapter for checkpoint `base` to `out_dir`; returns the directory."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dgemma_vllm import reference as ref

    if targets not in TARGET_SETS:
        raise ValueError(f"targets must be one of {sorted(TARGET_SETS)}, got {targets!r}")
    out = Path(out_dir)
    model = ref.load_reference.__wrapped__(str(base))  # a fresh model: peft wraps it in place
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, lora_dropout=0.0,
                     target_modules=rf"model\.decoder\.{TARGET_SETS[targets]}")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out))
    return out


def cached_adapter(base, name: str = "a", root=None, **kwargs) -> Path:
    """Build an adapter for `base` once and reuse it (keyed by base, name and arguments)."""
    root = cache_root(root)
    key = "-".join([Path(base).name, name] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
    out = root / "adapters" / key.replace("/", "_")
    if (out / "adapter_model.safetensors").exists():
        return out
    return build_once(out, lambda tmp: make_adapter(tmp, base, **kwargs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="dgemma-vllm make-adapter",
        description="Write a random LoRA adapter (PEFT layout) for a DiffusionGemma checkpoint.")
    p.add_argument("out_dir")
    p.add_argument("--base", required=True, help="the checkpoint directory the adapter is for")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (serve with --max-lora-rank >= r)")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha (the delta is alpha/r * B A)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="all", choices=sorted(TARGET_SETS),
                   help="all: attention projections, dense MLP and self-conditioning MLP")
    p.add_argument("--scale", type=float, default=0.05, help="standard deviation of B's entries")
    a = p.parse_args(argv)
    out = make_adapter(a.out_dir, a.base, rank=a.rank, alpha=a.alpha, seed=a.seed,
                       targets=a.targets, scale=a.scale)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
