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

CPUAttentionBackend, CPUAttentionBackendImpl, _ops = vllm_api.cpu_attention_classes()

BACKEND_NAME = "DGEMMA_CPU_ATTN"
CANVAS_WINDOWS = ("reference", "symmetric")

# Set by the model before it builds its layers (one value per process and model).
_canvas_window = "reference"


def set_canvas_window(mode: str) -> None:
    global _canvas_window
    if mode not in CANVAS_WINDOWS:
        raise ValueError(f"canvas_window must be one of {CANVAS_WINDOWS}, got {mode!r}")
    _canvas_window = mode


_layout_cache: dict[str, bool] = {}


def _k_is_transposed(isa: str, dtype: torch.dtype) -> bool:
    """Find, once per ISA, how the kernel lays K out inside a block: write known values with
    vLLM's own cache op and see which reading gives them back. Raises if neither does."""
    key = f"{isa}:{dtype}"
    if key in _layout_cache:
        return _layout_cache[key]
    nb, h, bs, d = 2, 1, 32, 32
    kv = torch.zeros(nb, h, bs, 2 * d, dtype=dtype)
    kc, vc = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    t = 40
    k = torch.arange(1, t * h * d + 1, dtype=torch.float32).view(t, h, d).to(dtype) / 64
    slots = torch.arange(t, dtype=torch.long) + 3
    _ops.cpu_attn_reshape_and_cache(k, -k, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                    kv_cache_dtype="auto")
    found = None
    for transposed in (False, True):
        if torch.equal(_gather(kc, slots, transposed), k):
            found = transposed
            break
    if found is None or not torch.equal(_gather(vc, slots, False), -k):
        raise RuntimeError(f"dgemma_vllm: unknown CPU KV-cache layout for isa={isa!r}; "
                           "use canvas_window='symmetric'")
    _layout_cache[key] = found
    return found


def _gather(cache: torch.Tensor, slots: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Read ``[n, kv_heads, head_dim]`` at `slots` from one half (K or V) of a CPU cache view
    ``[blocks, kv_heads, block_size, head_dim]`` (copies only the blocks it touches)."""
    _, h, bs, d = cache.shape
    blk, off = slots // bs, slots % bs
    used, inv = torch.unique(blk, return_inverse=True)
    blocks = cache[used]  # [u, h, bs, d], contiguous copy of the touched blocks
    if transposed:  # K block interior stored as [head_dim, block_size]
        return blocks.reshape(len(used), h, d, bs)[inv, :, :, off]
    return blocks[inv, :, off, :]


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
        transposed = _k_is_transposed(layer.isa, kv_cache.dtype)
        d = self.head_size
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
            k = _gather(k_cache, slots, transposed).float()  # [n, kvh, d]
            v = _gather(v_cache, slots, False).float()
            q = query[q0:q1].view(c, self.num_heads, d).float()
            rep = self.num_heads // self.num_kv_heads
            k = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # [H, n, d]
            v = v.transpose(0, 1).repeat_interleave(rep, dim=0)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, scale=self.scale)
            out[q0:q1] = o.transpose(0, 1).reshape(out[q0:q1].shape).to(out.dtype)


class DGemmaCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return DGemmaCPUAttentionImpl


def register() -> None:
    vllm_api.register_attention_backend(
        BACKEND_NAME, f"{__name__}.{DGemmaCPUAttentionBackend.__qualname__}"
    )


register()
