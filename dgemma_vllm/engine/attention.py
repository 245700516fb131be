"""Canvas-aware attention over vLLM's paged KV cache (CPU backend).

Both modes run in one batch through vLLM's CPU attention kernel, with a per-request int32
``causal`` flag that the plugin's runner sets (1: prefill / commit pass, 0: canvas pass):

- causal rows (encoder mode): the kernel's causal attention with the layer's sliding window;
  their K/V are written to the paged cache and stay there (committed).
- canvas rows (decoder mode): the canvas K/V are written to the slots reserved right after
  the committed tokens (the scheduler rolls them back, so they are never committed and the
  commit pass overwrites them) and the kernel attends bidirectionally.

Full-attention layers need nothing more. On sliding layers the kernel applies the symmetric
window ``|q - k| <= W - 1`` to non-causal rows, whereas the reference (transformers, eager /
sdpa with its DynamicCache) lets every canvas query see the last ``W - 1`` cached tokens plus
the whole canvas: keys ``[max(0, L - W + 1), L + C)``. With ``canvas_window="reference"`` (the
default) this impl recomputes the canvas rows of sliding layers exactly that way, reading the
prefix K/V back from the paged cache; ``canvas_window="symmetric"`` keeps the kernel's window
(what HF's flash-attention path and upstream vLLM do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import vllm_api

(CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder,
 _ops) = vllm_api.cpu_attention_classes()

BACKEND_NAME = "DGEMMA_CPU_ATTN"
CANVAS_WINDOWS = ("reference", "symmetric")

# Set by the model before it builds its layers (one value per process and model).
_canvas_window = "reference"


def set_canvas_window(mode: str) -> None:
    global _canvas_window
    if mode not in CANVAS_WINDOWS:
        raise ValueError(f"canvas_window must be one of {CANVAS_WINDOWS}, got {mode!r}")
    _canvas_window = mode


_layout_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_DIGIT = 64  # probe values 1..64 (+64 for the second head): exact in bf16, fp16 and fp32


class KVLayoutError(RuntimeError):
    pass


def kv_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int):
    """Where vLLM's CPU cache op puts each (token offset, dim) of K and of V inside one block of
    one KV head, for this ISA, dtype and geometry: ``(k_pos, v_pos)``, two int64 ``[block_size,
    head_dim]`` maps into the block's ``block_size * head_dim`` entries of its K (V) half.

    Found by writing known values with vLLM's own op, not assumed: the ``vec`` kernels store K
    transposed inside a block, the ``amx`` kernels (bf16 on CPUs with AMX tiles) pack it in their
    own tile order, ``vec16`` / ``neon`` store it plainly. Each entry's index (token offset *
    head_dim + dim) is written in base-64 digits, one pass a digit, two heads and two blocks, and
    read back; anything but a permutation that is the same in every block and head raises
    ``KVLayoutError`` (at engine start: the builder asks for it)."""
    key = (isa, dtype, block_size, head_dim)
    if key in _layout_cache:
        return _layout_cache[key]
    nb, h, bs, d = 2, 2, block_size, head_dim
    n = bs * d
    index = torch.arange(n).view(bs, d)
    passes = 1
    while _DIGIT ** passes < n:
        passes += 1
    code_k = torch.zeros(nb, h, n, dtype=torch.long)
    code_v = torch.zeros(nb, h, n, dtype=torch.long)
    slots = torch.arange(nb * bs, dtype=torch.long)
    head_off = (torch.arange(h) * _DIGIT).view(1, h, 1)
    for p in range(passes):
        digit = (index // _DIGIT ** p) % _DIGIT  # [bs, d] in 0..63
        k = (digit.repeat(nb, 1)[:, None, :] + 1 + head_off).to(dtype)  # [nb*bs, h, d]
        kv = torch.zeros(nb, h, bs, 2 * d, dtype=dtype)
        kc, vc = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
        _ops.cpu_attn_reshape_and_cache(k, -k, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
        for code, half, sign in ((code_k, kc, 1), (code_v, vc, -1)):
            raw = (half.reshape(nb, h, n).float() * sign).round().long() - 1 - head_off
            if raw.min() < 0 or raw.max() >= _DIGIT:
                raise KVLayoutError(f"dgemma_vllm: unknown CPU KV-cache layout for isa={isa!r} "
                                    f"(values outside the block's half); use "
                                    "dgemma_canvas_window='symmetric'")
            code += raw * _DIGIT ** p
    maps = []
    for code in (code_k, code_v):
        ref = code[0, 0]
        if not bool((code == ref).all()) or not torch.equal(torch.sort(ref).values, torch.arange(n)):
            raise KVLayoutError(f"dgemma_vllm: unknown CPU KV-cache layout for isa={isa!r} "
                                "(not one permutation per block and head); use "
                                "dgemma_canvas_window='symmetric'")
        pos = torch.empty(n, dtype=torch.long)
        pos[ref] = torch.arange(n)  # entry index -> its place in the block
        maps.append(pos.view(bs, d))
    _layout_cache[key] = (maps[0], maps[1])
    return _layout_cache[key]


def _gather(cache: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[n, kv_heads, head_dim]`` at `slots` from one half (K or V) of a CPU cache view
    ``[blocks, kv_heads, block_size, head_dim]`` laid out as `pos` (``kv_layout``); reads only
    those entries."""
    nb, h, bs, d = cache.shape
    flat = cache.view(nb, h, bs * d)  # the block's half is contiguous: no copy
    blk, off = slots // bs, slots % bs
    heads = torch.arange(h, device=cache.device)
    return flat[blk[:, None, None], heads[None, :, None], pos.to(cache.device)[off][:, None, :]]


class DGemmaCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                              output_scale, output_block_scale)
        md = attn_metadata
        if (md is None or md.dynamic_causal is None or self.sliding_window in (None, -1)
                or _canvas_window != "reference"):
            return out
        self._fix_canvas_rows(layer, query, kv_cache, md, out)
        return out

    def _fix_canvas_rows(self, layer, query, kv_cache, md, out):
        w = self.sliding_window  # W: a query sees W keys including itself
        canvas = (md.dynamic_causal == 0).nonzero().flatten().tolist()
        if not canvas:
            return
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        nb, h, bs, _ = kv_cache.shape
        k_cache, v_cache = kv_cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        d = self.head_size
        k_pos, v_pos = kv_layout(layer.isa, kv_cache.dtype, bs, d)  # probed at start-up
        for i in canvas:
            q0, q1 = qsl[i], qsl[i + 1]
            c = q1 - q0
            seq = seq_lens[i]
            prefix = seq - c
            if prefix + c <= w:  # the kernel's symmetric window already sees every key
                continue
            start = max(0, prefix - w + 1)
            pos = torch.arange(start, seq, dtype=torch.long)
            bt = md.block_table[i]
            slots = bt[pos // bs].long() * bs + pos % bs
            k = _gather(k_cache, slots, k_pos).float()  # [n, kvh, d]
            v = _gather(v_cache, slots, v_pos).float()
            q = query[q0:q1].view(c, self.num_heads, d).float()
            rep = self.num_heads // self.num_kv_heads
            k = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # [H, n, d]
            v = v.transpose(0, 1).repeat_interleave(rep, dim=0)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, scale=self.scale)
            out[q0:q1] = o.transpose(0, 1).reshape(out[q0:q1].shape).to(out.dtype)


class DGemmaCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's builder; at construction (engine start, once per KV-cache group) it probes the
    cache layout the exact canvas window reads (``kv_layout``), so that a layout the plugin does
    not know stops the engine at start-up with a message instead of the first canvas."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if _canvas_window != "reference" or self.window_size in (None, -1):
            return
        if self.kv_cache_dtype not in ("auto", None) and "fp8" in str(self.kv_cache_dtype):
            raise ValueError("dgemma_vllm: the exact canvas window reads the KV cache back and "
                             f"does not read kv_cache_dtype={self.kv_cache_dtype!r}; use "
                             "kv_cache_dtype='auto' or dgemma_canvas_window='symmetric'")
        kv_layout(self.isa, self.dtype, self.block_size, self.head_dim)


class DGemmaCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_builder_cls():
        return DGemmaCPUAttentionMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return DGemmaCPUAttentionImpl


def register() -> None:
    vllm_api.register_attention_backend(
        BACKEND_NAME, f"{__name__}.{DGemmaCPUAttentionBackend.__qualname__}"
    )


register()
