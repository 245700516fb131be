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

Images: DiffusionGemma's image soft tokens attend bidirectionally within their image on every
layer (the reference ORs a block overlay into the causal mask of full layers and into the
windowed causal mask of sliding layers). vLLM's CPU kernel is causal there; this impl recomputes
the rows of each image in the step from the paged cache with the reference's mask: key ``k``
is seen by image query ``q`` when ``k`` is in the same image, or ``k <= q`` (and ``q - k < W`` on
sliding layers). The images come from vLLM's ``mm_req_doc_ranges`` (the builder attaches those
that meet this step's queries); an image is never split over two prefill chunks (the config
hook sets ``disable_chunked_mm_input``).
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


def kv_element_index(slots: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor,
                     kv_heads: int, block_stride: int, head_stride: int) -> torch.Tensor:
    """The element offsets of K and V at `slots` in one layer's CPU cache ``[blocks, kv_heads,
    block_size, 2 * head_dim]`` whose (block, head) halves are contiguous (K's ``block_size *
    head_dim`` entries, then V's, laid out as `k_pos` / `v_pos`, ``kv_layout``), counted from the
    tensor's first element with its block and head strides: vLLM's layer caches are strided views
    (one buffer holds several layers' blocks side by side). int64 ``[2 * n * kv_heads *
    head_dim]``: K's ``[n, kv_heads, head_dim]`` then V's. Every sliding layer of a KV-cache group
    has the same geometry and strides, so one index per step serves them all: one
    ``index_select`` a layer (``flat_cache``) instead of two broadcast advanced-indexing gathers
    (``_gather``; 16 against 179 us for one 31-token prefix on a 2-core EPYC, 125 against 693 us
    for sixteen)."""
    bs, d = k_pos.shape
    blk, off = slots // bs, slots % bs
    base = (blk * block_stride)[:, None, None] \
        + (torch.arange(kv_heads, device=slots.device) * head_stride)[None, :, None]
    k = base + k_pos.to(slots.device)[off][:, None, :]
    v = base + bs * d + v_pos.to(slots.device)[off][:, None, :]
    return torch.cat([k.flatten(), v.flatten()])


def flat_cache(kv_cache: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of one layer's cache ``[blocks, kv_heads, block_size, 2 * head_dim]`` from its
    first element to its last (``kv_element_index`` offsets index it), or None when a (block,
    head)'s K and V halves are not one contiguous run."""
    nb, h, bs, two_d = kv_cache.shape
    s0, s1, s2, s3 = kv_cache.stride()
    if s3 != 1 or s2 != two_d:
        return None
    return kv_cache.as_strided(((nb - 1) * s0 + (h - 1) * s1 + bs * two_d,), (1,))


def image_blocks(cm) -> list[tuple[int, int, int, int, int]] | None:
    """Each image of vLLM's ``mm_req_doc_ranges`` that this step's queries meet, as
    ``(sequence, image start, first query, last query, first query's row)`` (positions,
    inclusive; the row in the step's flat batch); None when there is none."""
    ranges = cm.mm_req_doc_ranges
    if not ranges:
        return None
    qsl = cm.query_start_loc_cpu.tolist()
    seq = vllm_api.host_seq_lens(cm)
    out = []
    for i, spans in ranges.items():
        if i >= cm.num_reqs:
            continue
        first = seq[i] - (qsl[i + 1] - qsl[i])  # position of the sequence's first query
        for s, e in spans:
            p0, p1 = max(s, first), min(e, seq[i] - 1)  # the image's queries in this step
            if p0 <= p1:
                out.append((i, s, p0, p1, qsl[i] + p0 - first))
    return out or None


def canvas_window_plan(md, window: int, block_size: int):
    """The canvas rows of one step that the reference's window recomputes on sliding layers, in
    groups of canvases of equal length, for a batched recompute (one gather, one masked SDPA per
    group and layer instead of a dozen ops per canvas and layer). Built once per step and KV-cache
    group (the metadata builder), read by every sliding layer of the group.

    Per group: ``(c, rows, slots, bias)``: ``rows`` the ``[B * c]`` query rows (flat, canvas by
    canvas; a slice when the canvases are adjacent in the batch, as in a batch of canvases alone:
    views instead of three gathers and a scatter per layer), ``slots`` the ``[B * n]`` paged-cache
    slots of each canvas's prefix keys (the last ``W - 1`` cached tokens, ``n`` the longest such
    prefix; shorter ones are padded with their first slot), ``bias`` the float32 ``[B, 1, n + c]``
    additive key mask for ``window_attention`` (0 for prefix keys that exist and the canvas's own,
    -inf for padding). A canvas whose prefix and canvas fit in the window is left out (the kernel's
    symmetric window already sees every key). None when no canvas needs the recompute."""
    if md.dynamic_causal is None:
        return None
    flags = md.dynamic_causal.tolist()
    if all(flags):
        return None
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    by_len: dict[int, list[tuple[int, int, int]]] = {}  # c -> (sequence, first row, prefix)
    for i, f in enumerate(flags):
        if f:
            continue
        c = qsl[i + 1] - qsl[i]
        prefix = seq_lens[i] - c
        if c <= 0 or prefix + c <= window:
            continue
        by_len.setdefault(c, []).append((i, qsl[i], prefix))
    if not by_len:
        return None
    groups = []
    for c, seqs in by_len.items():
        starts = [max(0, L - window + 1) for _, _, L in seqs]
        counts = [L - s0 for (_, _, L), s0 in zip(seqs, starts)]
        n = max(counts)
        b = len(seqs)
        firsts = [q0 for _, q0, _ in seqs]
        if all(nxt == cur + c for cur, nxt in zip(firsts, firsts[1:])):  # adjacent: one view
            rows = slice(firsts[0], firsts[0] + len(seqs) * c)
        else:
            rows = (torch.tensor(firsts)[:, None] + torch.arange(c)[None, :]).flatten()
        j = torch.arange(n)[None, :]
        cnt = torch.tensor(counts)[:, None]
        pos = torch.tensor(starts)[:, None] + torch.where(j < cnt, j, 0)  # [B, n]
        bt = md.block_table[torch.tensor([i for i, _, _ in seqs])].long()  # [B, blocks]
        slots = (bt.gather(1, pos // block_size) * block_size + pos % block_size).flatten()
        keep = torch.cat([j < cnt, torch.ones(b, c, dtype=torch.bool)], 1)[:, None, :]
        bias = torch.zeros(keep.shape, dtype=torch.float32).masked_fill_(~keep, float("-inf"))
        groups.append((c, rows, slots, bias))
    return groups


def _kv_slots(md, i: int, pos: torch.Tensor, bs: int) -> torch.Tensor:
    bt = md.block_table[i]
    return bt[pos // bs].long() * bs + pos % bs


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Grouped-query attention of ``q`` ``[B, c, heads, d]`` over ``k`` / ``v`` ``[B, n,
    kv_heads, d]`` with an additive key bias ``[B, 1, n]``, in float32: ``[B, c, heads, d]``.
    Query head ``i`` reads KV head ``i // (heads / kv_heads)`` (SDPA's ``enable_gqa``).

    Written as one ``baddbmm``, a softmax and one ``bmm`` over (canvas, KV head) batches, with
    the query heads of a KV head stacked as rows, instead of ATen's CPU
    ``scaled_dot_product_attention``: at these shapes (a few dozen queries, a window of keys)
    SDPA's CPU path costs 67 against 52 us for one 32-row canvas and 704 against 332 us for
    sixteen (a 2-core Xeon, one thread, 2026-12-05), and this runs on every sliding layer of
    every canvas step. The same arithmetic as transformers' eager attention (scores in float32,
    mask added, softmax, weighted sum); tests/test_canvas_window.py checks it against SDPA."""
    b, c, h, d = q.shape
    hk, n = k.shape[2], k.shape[1]
    rep = h // hk
    qg = q.float().permute(0, 2, 1, 3).reshape(b * hk, rep * c, d)  # heads g*rep..: rows
    kg = k.float().permute(0, 2, 3, 1).reshape(b * hk, d, n)
    vg = v.float().permute(0, 2, 1, 3).reshape(b * hk, n, d)
    bias = bias[:, None].expand(b, hk, 1, n).reshape(b * hk, 1, n)
    s = torch.baddbmm(bias, qg, kg, alpha=scale)
    o = torch.bmm(s.softmax(-1), vg)  # [B * kv_heads, rep * c, d]
    return o.view(b, hk, rep, c, d).permute(0, 3, 1, 2, 4).reshape(b, c, h, d)


def window_covers_all(md) -> bool:
    """Whether the exact canvas window (``md.dg_canvas_window``) recomputes every query row of
    the step: a batch of canvases alone, each past its window. Then vLLM's kernel pass over those
    rows on a sliding layer would be overwritten entirely, and the impl skips it."""
    groups = getattr(md, "dg_canvas_window", None)
    if not groups or getattr(md, "dg_images", None):
        return False
    return sum(c * bias.shape[0] for c, _, _, bias in groups) == md.num_actual_tokens


class DGemmaCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        md = attn_metadata
        if (md is not None and key is not None and value is not None
                and self.sliding_window not in (None, -1) and _canvas_window == "reference"
                and output_scale is None and output_block_scale is None
                and getattr(md, "dg_window_all", False)):
            # every row is a canvas row that the recompute below writes: the kernel's pass over
            # them (its symmetric window) would be thrown away, ~1/6 of small's forward at 16
            # canvases (benchmarks/RESULTS.md); its K/V write is vLLM's separate cache update
            self._fix_canvas_rows(layer, query, key, value, kv_cache, md, output)
            return output
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                              output_scale, output_block_scale)
        if md is None:
            return out
        if getattr(md, "dg_images", None):
            self._fix_image_rows(layer, query, kv_cache, md, out)
        if (md.dynamic_causal is None or self.sliding_window in (None, -1)
                or _canvas_window != "reference"):
            return out
        self._fix_canvas_rows(layer, query, key, value, kv_cache, md, out)
        return out

    def _paged(self, layer, kv_cache, md):
        """The step's query starts and sequence lengths (host), and a reader of K/V at positions
        of one sequence from the paged cache: ``read(i, pos) -> (k, v)``, float32
        ``[heads, n, head_dim]`` with the KV heads repeated for the query heads."""
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        nb, h, bs, _ = kv_cache.shape
        k_cache, v_cache = kv_cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        k_pos, v_pos = kv_layout(layer.isa, kv_cache.dtype, bs, self.head_size)  # probed at start-up
        rep = self.num_heads // self.num_kv_heads

        def read(i: int, pos: torch.Tensor):
            slots = _kv_slots(md, i, pos, bs)
            return tuple(_gather(c, slots, p).float().transpose(0, 1).repeat_interleave(rep, 0)
                         for c, p in ((k_cache, k_pos), (v_cache, v_pos)))

        return qsl, seq_lens, read

    def _fix_image_rows(self, layer, query, kv_cache, md, out):
        """Each image's query rows again, with DiffusionGemma's image mask (module docstring),
        over keys read back from the paged cache (the kernel has written this step's K/V)."""
        w = self.sliding_window
        windowed = w not in (None, -1)
        _, _, read = self._paged(layer, kv_cache, md)
        for i, s, p0, p1, row in md.dg_images:
            lo = max(0, p0 - w + 1) if windowed else 0
            kpos = torch.arange(lo, p1 + 1, dtype=torch.long)
            qpos = torch.arange(p0, p1 + 1, dtype=torch.long)
            k, v = read(i, kpos)
            rows = slice(row, row + p1 - p0 + 1)
            q = query[rows].view(-1, self.num_heads, self.head_size).float().transpose(0, 1)
            dist = qpos[:, None] - kpos[None, :]
            seen = dist >= 0
            if windowed:
                seen &= dist < w
            seen |= kpos[None, :] >= s  # the same image (keys end at its last token)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=self.scale)
            out[rows] = o.transpose(0, 1).reshape(out[rows].shape).to(out.dtype)

    def _fix_canvas_rows(self, layer, query, key, value, kv_cache, md, out):
        """The canvas rows again with the reference's window, batched over the step's canvases
        (``canvas_window_plan``, built by the metadata builder); a layer without its own K/V
        takes the per-canvas path (``_fix_canvas_rows_each``)."""
        if key is None or value is None or not hasattr(md, "dg_canvas_window"):
            return self._fix_canvas_rows_each(layer, query, key, value, kv_cache, md, out)
        if md.dg_canvas_window is None:
            return
        nb, h, bs, _ = kv_cache.shape
        k_pos, v_pos = kv_layout(layer.isa, kv_cache.dtype, bs, self.head_size)
        hk, d = self.num_kv_heads, self.head_size
        flat = flat_cache(kv_cache)
        if flat is None:
            k_cache, v_cache = kv_cache.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        else:
            # each group's K/V offsets: built by the first sliding layer of the step (they
            # depend on the layer tensor's strides, which the metadata builder does not see)
            # and reused by the others, which share geometry and strides
            memo = md.__dict__.setdefault("dg_window_index", {})
            geo = (layer.isa, kv_cache.dtype, h, bs, d, *kv_cache.stride()[:2])
            index = memo.get(geo)
            if index is None:
                index = memo[geo] = [kv_element_index(g[2], k_pos, v_pos, h, *geo[-2:])
                                     for g in md.dg_canvas_window]
        for j, (c, rows, slots, bias) in enumerate(md.dg_canvas_window):
            b = bias.shape[0]
            if flat is not None:
                kvp = flat.index_select(0, index[j]).view(2, b, -1, hk, d)
                kp, vp = kvp[0], kvp[1]  # [B, n, kv_heads, d]
            else:
                kp = _gather(k_cache, slots, k_pos).view(b, -1, hk, d)
                vp = _gather(v_cache, slots, v_pos).view(b, -1, hk, d)
            k = torch.cat([kp, key[rows].view(b, c, hk, d)], 1)  # [B, n + c, kv_heads, d]
            v = torch.cat([vp, value[rows].view(b, c, hk, d)], 1)
            o = window_attention(query[rows].view(b, c, self.num_heads, d), k, v,
                                 bias, self.scale)
            out[rows] = o.reshape(b * c, *out.shape[1:]).to(out.dtype)

    def _fix_canvas_rows_each(self, layer, query, key, value, kv_cache, md, out):
        """Each canvas's rows again with the reference's window: the last ``W - 1`` cached
        tokens read back from the paged cache, then the canvas's own K/V as this step computed
        them (the same values the kernel has just written to the cache: the cache dtype is the
        model's, an FP8 cache being refused at start-up), so only the prefix is gathered."""
        w = self.sliding_window  # W: a query sees W keys including itself
        canvas = (md.dynamic_causal == 0).nonzero().flatten().tolist()
        if not canvas:
            return
        qsl, seq_lens, read = self._paged(layer, kv_cache, md)
        rep = self.num_heads // self.num_kv_heads

        def own(x, q0, q1):  # [c, kv_heads * d] -> float32 [heads, c, d], as read() returns
            return x[q0:q1].reshape(q1 - q0, self.num_kv_heads, self.head_size).float() \
                .transpose(0, 1).repeat_interleave(rep, 0)

        for i in canvas:
            q0, q1 = qsl[i], qsl[i + 1]
            c = q1 - q0
            seq = seq_lens[i]
            prefix = seq - c
            if prefix + c <= w:  # the kernel's symmetric window already sees every key
                continue
            start = max(0, prefix - w + 1)
            if key is None or value is None:  # a layer without its own K/V: all from the cache
                k, v = read(i, torch.arange(start, seq, dtype=torch.long))
                mid = None
            else:
                k, v = own(key, q0, q1), own(value, q0, q1)
                mid = start < prefix
            if mid:
                kp, vp = read(i, torch.arange(start, prefix, dtype=torch.long))  # [H, n, d]
                k, v = torch.cat([kp, k], 1), torch.cat([vp, v], 1)
            q = query[q0:q1].view(c, self.num_heads, self.head_size).float()
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, scale=self.scale)
            out[q0:q1] = o.transpose(0, 1).reshape(out[q0:q1].shape).to(out.dtype)


class DGemmaCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's builder; at construction (engine start, once per KV-cache group) it probes the
    cache layout the exact canvas window reads (``kv_layout``), so that a layout the plugin does
    not know stops the engine at start-up with a message instead of the first canvas."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        images = bool(vllm_config.model_config.is_mm_prefix_lm)
        window = _canvas_window == "reference" and self.window_size not in (None, -1)
        if not (images or window):
            return
        if self.kv_cache_dtype not in ("auto", None) and "fp8" in str(self.kv_cache_dtype):
            uses = [(what, fix) for on, what, fix in (
                (window, "the exact canvas window", "dgemma_canvas_window='symmetric'"),
                (images, "image attention", "--limit-mm-per-prompt '{\"image\": 0}' (text only)"))
                if on]
            verb = "reads" if len(uses) == 1 else "read"
            raise ValueError(f"dgemma_vllm: {' and '.join(w for w, _ in uses)} {verb} the KV "
                             f"cache back and cannot read kv_cache_dtype={self.kv_cache_dtype!r}; "
                             f"use kv_cache_dtype='auto' or {' and '.join(f for _, f in uses)}")
        kv_layout(self.isa, self.dtype, self.block_size, self.head_dim)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md.dg_images = image_blocks(common_attn_metadata)
        if _canvas_window == "reference" and self.window_size not in (None, -1):
            md.dg_canvas_window = canvas_window_plan(md, self.window_size, self.block_size)
            md.dg_window_all = window_covers_all(md)
        return md


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
