"""Log-probabilities of committed tokens, and ranked alternatives, from the tiled head.

vLLM's ``logprobs`` (its default ``raw_logprobs`` mode) are the log-softmax of the raw logits at
the position a token was sampled from: before penalties, biases, masks and temperature. For a
committed canvas the position's logits are those of the step that committed it (the final
denoising step), softcapped, at temperature 1. This module computes, per canvas row and without
a ``[rows, vocab]`` tensor (tile by tile, merged across tensor-parallel ranks):

- the committed token's log-probability and its rank (vLLM's: the number of ids whose
  log-probability is at least the token's; 1 for the most likely);
- the ``n`` most likely ids and their log-probabilities.

It runs once per committed canvas, not per denoising step: only requests that ask for logprobs
pay for it (one more pass of the head's GEMMs over their canvas rows).

:func:`top_ids` is the same pass over the *edited* logits (refine/filters.py): each row's best
ids under the final step's logits, for the bad-word projection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .head import VocabSlice, _edit, _merge_top, merge, softcap_, tile_matmul


class Logprobs(NamedTuple):
    token: torch.Tensor  # [n] fp32 log-probability of each row's committed token
    rank: torch.Tensor  # [n] int64 its rank (1 = the most likely)
    top_ids: torch.Tensor  # [n, k] int64, most likely first
    top: torch.Tensor  # [n, k] fp32


def _tiles(vs: VocabSlice, cols: int):
    for c0 in range(0, vs.size, cols):
        yield c0, min(c0 + cols, vs.size)


def _raw(h, vs, c0, c1, softcap):
    return softcap_(tile_matmul(h, vs, c0, c1), softcap)


def _gather_top(vs, v, i, k):
    """Merge every rank's top-`k` (values, ids) (padded to `k`) into the global top-`k`."""
    rows = v.shape[0]
    if v.shape[1] < k:
        v = torch.cat([v, v.new_full((rows, k - v.shape[1]), float("-inf"))], -1)
        i = torch.cat([i, i.new_zeros((rows, k - i.shape[1]))], -1)
    g = vs.gather(torch.stack([v.double(), i.double()], -1))  # [ranks, rows, k, 2]
    gv = g[..., 0].permute(1, 0, 2).reshape(rows, -1)
    gi = g[..., 1].permute(1, 0, 2).reshape(rows, -1).long()
    return _merge_top(None, None, gv, gi, k)


@torch.no_grad()
def token_logprobs(h: torch.Tensor, vs: VocabSlice, tokens: torch.Tensor, *, softcap: float,
                   n_top: int, tile: int) -> Logprobs:
    """Raw log-probabilities of ``tokens`` (``[n]``, one per row of ``h``: ``[n, H]``)."""
    rows = h.shape[0]
    dev = h.device
    tokens = tokens.to(dev).long()
    cols = max(1, min(tile, vs.max_size or vs.size))
    k = max(1, n_top)
    m = s = tv = ti = None
    val = torch.full((rows,), float("-inf"), device=dev)
    for c0, c1 in _tiles(vs, cols):
        x = _raw(h, vs, c0, c1, softcap)
        mx = x.max(-1).values
        sx = torch.exp(x - mx[:, None]).sum(-1)
        if m is None:
            m, s = mx, sx
        else:
            m, s, _, _ = merge(m, s, torch.zeros_like(s), mx, sx, torch.zeros_like(s))
        a, b = vs.start + c0, vs.start + c1
        here = (tokens >= a) & (tokens < b)
        got = x.gather(1, (tokens - a).clamp(0, c1 - c0 - 1)[:, None])[:, 0]
        val = torch.where(here, got, val)
        v_, i_ = x.topk(min(k, c1 - c0), dim=-1)
        tv, ti = _merge_top(tv, ti, v_, i_ + a, k)
    if vs.ranks > 1:
        g = vs.gather(torch.stack([m.double(), s.double(), val.double()], -1))  # [ranks, rows, 3]
        m, s = g[0, :, 0], g[0, :, 1]
        for q in range(1, vs.ranks):
            m, s, _, _ = merge(m, s, torch.zeros_like(s), g[q, :, 0], g[q, :, 1], torch.zeros_like(s))
        val = g[..., 2].max(0).values  # the owning rank's value (-inf elsewhere)
        tv, ti = _gather_top(vs, tv, ti, k)
    lse = m.double() + torch.log(s.double())
    val = val.double()
    tv = tv.double()
    # rank = #(ids >= the token's value): from the top ids when the token is among them
    rank = (tv >= val[:, None]).sum(-1)
    far = (val < tv[:, -1]).nonzero()[:, 0]  # the same rows on every rank (merged values)
    if far.numel():  # count over the whole row: one more pass for those rows
        # the token itself is counted once, not compared: its logit recomputed from a GEMM over
        # other rows can round below `val` (seen on an AVX2 CPU: rank 590 for 591)
        cnt = torch.zeros(far.numel(), dtype=torch.float64, device=dev)
        tok = tokens[far]
        for c0, c1 in _tiles(vs, cols):
            x = _raw(h[far], vs, c0, c1, softcap).double()
            a = vs.start + c0
            own = (tok >= a) & (tok < vs.start + c1)
            x[own.nonzero()[:, 0], tok[own] - a] = float("-inf")
            cnt += (x >= val[far, None]).sum(-1).double()
        if vs.ranks > 1:
            cnt = vs.reduce(cnt)
        rank = rank.clone()
        rank[far] = cnt.long() + 1
    return Logprobs((val - lse).float(), rank.long(), ti[:, :n_top], (tv - lse[:, None]).float()[:, :n_top])


@torch.no_grad()
def top_ids(h: torch.Tensor, vs: VocabSlice, *, softcap: float, edits, row0: int, n: int,
            tile: int) -> torch.Tensor:
    """Each row's `n` best ids (``[rows, n]``) under the edited capped logits (`edits` of the
    request, rows from canvas row `row0`; the schedule temperature keeps the order)."""
    from .head import RowSegment

    cols = max(1, min(tile, vs.max_size or vs.size))
    segs = [RowSegment(0, h.shape[0], edits, None, row0)] if edits is not None else None
    tv = ti = None
    for c0, c1 in _tiles(vs, cols):
        x = _raw(h, vs, c0, c1, softcap)
        _edit(x, segs, vs.start + c0)
        v_, i_ = x.topk(min(n, c1 - c0), dim=-1)
        tv, ti = _merge_top(tv, ti, v_, i_ + vs.start + c0, n)
    if vs.ranks > 1:
        tv, ti = _gather_top(vs, tv, ti, n)
    return ti
