"""LoRA adapters for DiffusionGemma: which modules take one, and how a PEFT adapter maps onto them.

vLLM's LoRA machinery (``--enable-lora``, the Punica kernels, the LRU adapter cache, the
dynamic load endpoints) does the work; this module holds what is DiffusionGemma's own:

- **Targets.** The attention projections (``q_proj k_proj v_proj o_proj``), the dense MLP
  (``gate_proj up_proj down_proj``) of every layer and the self-conditioning MLP (the same three
  names). Not the routed experts: vLLM 0.32's MoE LoRA layer runs only on its Triton kernel
  (``fused_moe/oracle/unquantized.py``: LoRA enabled -> TRITON), which the CPU build cannot run,
  so the plugin keeps the CPU MoE kernel by leaving the experts out (``model/dgemma.py``) and
  refuses an adapter that carries expert, router, embedding or head weights, naming the module.
- **Names.** Adapters are written against the HF model (PEFT's layout,
  ``base_model.model.<module>.lora_{A,B}.weight``). The checkpoint's one backbone is
  ``model.decoder.*`` (the encoder's text layers are tied to it, as the reference ties them), so
  a decoder module's adapter serves both modes, as the weights do. An adapter that also carries
  the encoder's copies (PEFT wraps both when its target pattern matches both) is accepted when
  each equals its decoder twin, and refused otherwise: one weight set cannot hold two deltas.
- **K = V layers.** Full-attention layers have no ``v_proj`` (``attention_k_eq_v``): the
  reference uses ``k_proj(x)`` as the values, and vLLM loads K into both the K and V slices of
  ``qkv_proj``. Their ``k_proj`` adapter is therefore applied to the V slice too (vLLM would leave
  it without one); a ``v_proj`` adapter on such a layer names a module the model does not have.
"""

from __future__ import annotations

import re

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM module suffixes the plugin wraps (packed names included) -> --lora-target-modules default
VLLM_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") + TARGETS
PEFT_TARGET_REGEX = (r"model\.decoder\.(layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
                     r"mlp\.(gate|up|down)_proj)|self_conditioning\.(gate|up|down)_proj)")

# HF adapter names -> the model's module names, beyond the weights mapper's renames (LoRA name
# parsing uses renames only: the self-conditioning gate / up projections, which weight loading
# stacks into gate_up_proj, keep their own names; vLLM packs their adapters itself)
LORA_RENAMES = {
    "self_conditioning.gate_proj": "self_conditioning.mlp.gate_proj",
    "self_conditioning.up_proj": "self_conditioning.mlp.up_proj",
}

_ENCODER = "model.encoder.language_model."


class AdapterError(ValueError):
    """An adapter the plugin cannot serve; the message names the module and the rule."""


def adapter_dims(modules: dict, packed: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """Adapter-visible module name -> (in, out) features of the full (unsharded) weight, for
    vLLM's wrapped modules (name -> LoRA layer with ``base_layer``) and their packed
    constituents (``packed``: ``qkv_proj`` -> its q/k/v names, ``gate_up_proj`` -> gate/up)."""
    out: dict[str, tuple[int, int]] = {}
    for name, layer in modules.items():
        base = getattr(layer, "base_layer", layer)
        n_in = int(base.input_size)
        if hasattr(base, "total_num_kv_heads"):  # QKVParallelLinear
            sizes = [base.total_num_heads * base.head_size,
                     base.total_num_kv_heads * base.head_size,
                     base.total_num_kv_heads * base.v_head_size]
        elif hasattr(base, "output_sizes") and name in packed:
            sizes = list(base.output_sizes)
        else:
            sizes = [int(base.output_size)]
        parts = packed.get(name) or [name]
        for part, size in zip(parts, sizes):
            out[part] = (n_in, int(size))
    return out


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def all_layer_dims(dims: dict[str, tuple[int, int]], layer_types) -> dict[str, tuple[int, int]]:
    """`dims` (this pipeline stage's modules) completed with the layers of the other stages:
    a layer has the modules and dimensions of this stage's layers of the same type (sliding or
    full attention). Every stage then checks the whole adapter the same way, so that a bad module
    fails its load on all stages, not only on the stage that holds its layer."""
    by_type: dict[tuple[str, str], tuple[int, int]] = {}
    for name, d in dims.items():
        m = _LAYER.fullmatch(name)
        if m:
            by_type[(layer_types[int(m.group(1))], m.group(2))] = d
    out = dict(dims)
    for i, t in enumerate(layer_types):
        for (kind, suffix), d in by_type.items():
            if kind == t:
                out.setdefault(f"model.layers.{i}.{suffix}", d)
    return out


def k_eq_v_layers(text_config) -> set[int]:
    """Indices of the layers whose values are their keys (full attention, attention_k_eq_v)."""
    return {i for i, t in enumerate(text_config.layer_types) if t == "full_attention"}


def _same(a, b) -> bool:
    import torch

    return (a is None) == (b is None) and (a is None or torch.equal(a, b))


def conform(loras: dict, dims: dict[str, tuple[int, int]], k_eq_v: set[int], lora_name: str,
            make_copy, present: set[str] | None = None) -> dict:
    """Check and complete an adapter's per-module weights in place (``loras``: module name ->
    vLLM ``LoRALayerWeights`` with ``rank``, ``lora_a``, ``lora_b``, ``scaling``, after vLLM's
    renames; ``dims``: :func:`adapter_dims`).
    Encoder copies equal to their decoder twin are dropped; a ``k_proj`` adapter of a K = V layer
    is copied to its ``v_proj`` (``make_copy(weights, new_name)``). With pipeline stages
    (`present`: the modules of this stage; `dims`: :func:`all_layer_dims`) the whole adapter is
    checked and the modules of other stages' layers are then dropped here. Raises
    :class:`AdapterError`."""
    for name in [n for n in loras if n.startswith(_ENCODER)]:
        twin = "model." + name[len(_ENCODER):]
        a, b = loras[name], loras.get(twin)
        if b is None or not (_same(a.lora_a, b.lora_a) and _same(a.lora_b, b.lora_b)
                             and a.scaling == b.scaling):
            raise AdapterError(
                f"LoRA adapter {lora_name!r}: module {name!r} differs from its decoder twin "
                f"{twin!r}: DiffusionGemma's encoder and decoder share one weight set, so an "
                "adapter must give both the same weights (write it on model.decoder.* only)")
        del loras[name]
    for name in loras:
        m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.v_proj", name)
        if m and int(m.group(1)) in k_eq_v:
            raise AdapterError(
                f"LoRA adapter {lora_name!r}: module {name!r} does not exist: layer "
                f"{m.group(1)} is a full-attention layer whose values are its keys (k_proj)")
    bad = sorted(n for n in loras if n not in dims)
    if bad:
        raise AdapterError(
            f"LoRA adapter {lora_name!r}: module {bad[0]!r} cannot take an adapter "
            f"({len(bad)} such module(s)); supported: the attention projections, the dense MLP and "
            "the self-conditioning MLP (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj); "
            "the routed experts (vLLM's MoE LoRA kernel needs Triton), the router, the embedding "
            "and the head are not")
    for name, w in loras.items():
        for part in ("lora_a", "lora_b"):
            if getattr(w, part, None) is None:
                raise AdapterError(f"LoRA adapter {lora_name!r}: module {name!r} has no "
                                   f"{part.replace('_a', '_A').replace('_b', '_B')} weight")
        n_in, n_out = dims[name]
        want_a, want_b = (w.rank, n_in), (n_out, w.rank)
        if tuple(w.lora_a.shape) != want_a or tuple(w.lora_b.shape) != want_b:
            raise AdapterError(
                f"LoRA adapter {lora_name!r}: module {name!r} has lora_A {tuple(w.lora_a.shape)} "
                f"and lora_B {tuple(w.lora_b.shape)}; this model needs {want_a} and {want_b} "
                f"(rank {w.rank}, {n_in} in, {n_out} out features)")
    for i in sorted(k_eq_v):
        k = loras.get(f"model.layers.{i}.self_attn.k_proj")
        if k is not None:
            loras[f"model.layers.{i}.self_attn.v_proj"] = make_copy(
                k, f"model.layers.{i}.self_attn.v_proj")
    for name in [n for n in loras if present is not None and n not in present]:
        del loras[name]  # a layer of another pipeline stage (checked above all the same)
    return loras


def check_target_modules(target_modules) -> list[str]:
    """``--lora-target-modules`` for the plugin: unset -> the supported modules (so vLLM never
    wraps the routed experts); a refused module -> error naming it."""
    if not target_modules:
        return list(VLLM_TARGETS)
    bad = [t for t in target_modules if t.split(".")[-1] not in VLLM_TARGETS]
    if bad:
        raise ValueError(
            f"dgemma_vllm: --lora-target-modules {bad[0]!r} is not supported; choose from "
            f"{' '.join(TARGETS)} (the routed experts need vLLM's Triton MoE LoRA kernel, which "
            "this plugin does not use; the router, embedding and head take no adapter)")
    return list(target_modules)
