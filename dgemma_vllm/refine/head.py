"""The canvas head, tiled over the vocabulary and parallel over tensor-parallel ranks.

From the last hidden states of one request's canvas rows it computes everything a denoising
step needs per row: the sampled (denoiser) token, the argmax token, the entropy of the processed
distribution, and the self-conditioning soft embedding ``softmax(processed) @ E`` — without a
``[rows, vocab]`` tensor:

- rows are taken in chunks of ``budget // min(vocab, tile)`` and the vocabulary slice of this rank
  in tiles of ``tile`` columns; each tile yields partial statistics (running max, sum of
  exponentials, their z-weighted sum, best argmax, best sample, soft-embedding accumulator), merged
  online as in a streaming softmax;
- under tensor parallelism each rank only holds its vocabulary slice of the tied embedding; the
  per-row partials (a few numbers per row) are all-gathered and merged in vocabulary order, and the
  soft embeddings are all-reduced once. No rank ever holds full-vocabulary logits.

Sampling noise:

- ``exact_noise`` (seeded requests): the reference's draw, ``multinomial(softmax(z), 1)``, is
  ``argmax(p / q)`` with ``q`` one Exp(1) draw per vocabulary entry from the request's generator,
  consumed in row-major order. The tiled path draws the same ``q`` (a chunk of rows at a time,
  every rank the same values) and takes ``argmax(z - log q)``, the same argmax up to rounding;
  with one tile on one rank the reference operations themselves run (bit-identical).
- otherwise: always the tile path, even for one tile (its fused statistics pass, pre-packed
  GEMMs and single argmax cost 1.6-3x less than the reference operations' softmaxes and
  argmaxes: a 32-row lean step's head 2.97 against 8.97 ms, benchmarks/RESULTS.md); an exact
  categorical draw from two uniforms per (row, tile): reservoir-merging the
  tiles (pick the tile's own inverse-CDF draw with probability tile mass / running mass). All
  ranks draw the same uniforms, so the generators stay in step.

Engine-free (plain torch); the engine passes the weight slice, the collectives and, on CPU, a
tile GEMM with pre-packed weights (``VocabSlice.tile_matmul``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .device import draw_device, to_device, to_host
from .filters import (FILTER_CANDIDATES, MAX_CANDIDATES, LogitEdits, SamplingFilter,
                      candidate_filter, dense_filter, filter_params)
from .sampler import CanvasState, apply_step, apply_steps, entropy, temperature

DEFAULT_TILE = 32768  # vocabulary columns per tile
DEFAULT_BUDGET = 1 << 22  # elements of one [rows, columns] temporary (16 MiB in fp32)
# Floor of the shifted logits ``z - max`` before ``exp`` in the tiled pass: exp(-87) = 1.6e-38 is
# still a normal fp32 number. Below it exp returns subnormals (or underflows through them), which
# x86 CPUs compute far slower (a 256 x 4096 tile, most entries below -87: exp 0.46 -> 5.8 ms on
# this project's AVX-512 machine). It happens on confident rows at low schedule temperatures
# (softcap 30 / t_min 0.4 allows a spread of 150), not on the random-weight test checkpoints. A
# row's mass is at least 1 (its max contributes exp(0)), so entries raised to 1.6e-38 change its
# sums far below fp32 resolution; such an entry's probability becomes ~1e-38 instead of ~1e-40 or
# 0, for sampling and soft embeddings (tests/test_head.py: the reference's tokens, unchanged).
EXP_FLOOR = -87.0


@dataclass
class VocabSlice:
    """This rank's rows of the (tied) output embedding."""

    weight: torch.Tensor  # [>= size, hidden] output head rows
    start: int  # vocabulary id of weight[0]
    size: int  # real vocabulary rows held here
    vocab: int  # full vocabulary
    max_size: int | None = None  # largest slice over the ranks (equal tile counts everywhere)
    rank: int = 0
    ranks: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # t -> [ranks, *t.shape]
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # all-reduce (sum)
    embed: torch.Tensor | None = None  # input embedding rows for soft embeddings, if not tied
    # the engine's GEMM for the logits of one vocabulary tile: (hidden, c0, c1) -> hidden @
    # weight[c0:c1].T (e.g. a kernel with the tile's weight pre-packed); default F.linear
    tile_matmul: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
    # the engine's GEMM for one tile's soft-embedding share: (probs, c0, c1) -> probs @
    # soft_weight[c0:c1]; default torch.mm
    soft_matmul: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
    # a fused (compiled) ``tile_stats`` for unseeded tiles at unit temperature; None: the
    # in-place eager passes
    tile_stats: Callable | None = None

    @property
    def soft_weight(self) -> torch.Tensor:
        return self.weight if self.embed is None else self.embed


class RowFlags(NamedTuple):
    """Host-side facts of a chunk's per-row temperatures (several unseeded requests at once)."""

    all_greedy: bool  # every row has temperature 0
    unit: bool  # every sampled row has temperature 1 (greedy rows aside)


class RowStats(NamedTuple):
    denoiser: torch.Tensor  # [n] int64 sampled tokens (the argmax when greedy)
    argmax: torch.Tensor  # [n] int64
    entropy: torch.Tensor  # [n] fp32 entropy of softmax(processed)
    soft: torch.Tensor | None  # [n, hidden] softmax(processed) @ E (without the sqrt(H) scale)


class RowSegment(NamedTuple):
    """Rows ``start .. end`` of a head call belong to one request with these logit edits and
    draw filter (either None); ``row0``: the canvas row of ``start`` (min_tokens counts rows)."""

    start: int
    end: int
    edits: LogitEdits | None = None
    filter: SamplingFilter | None = None
    row0: int = 0


def _chunk_segments(segments, i, j):
    """`segments` restricted to rows ``i .. j``, in chunk coordinates; None if none applies."""
    if not segments:
        return None
    out = [RowSegment(max(s.start, i) - i, min(s.end, j) - i, s.edits, s.filter,
                      s.row0 + max(0, i - s.start))
           for s in segments if s.start < j and s.end > i and (s.edits is not None or s.filter)]
    return out or None


def _edit(logits, segs, c0):
    """Apply each segment's edits to its rows of a tile (vocabulary columns from ``c0``)."""
    for sg in segs or ():
        if sg.edits is not None:
            sg.edits.apply_(logits[sg.start:sg.end], c0, sg.row0)


def _masks(segs) -> bool:
    return any(sg.edits is not None and sg.edits.masks for sg in segs or ())


def _has_edits(segs) -> bool:
    return any(sg.edits is not None for sg in segs or ())


def _candidates(segs, vocab: int) -> int:
    """Candidates per row of a filtered chunk (host values): top_k + 1 where top_k is the only
    filter (the k-th largest and one below it decide the set), else at least
    FILTER_CANDIDATES; at most MAX_CANDIDATES (larger sets take the full-row fallback)."""
    need = 1
    for sg in segs or ():
        f = sg.filter
        if f:
            only_k = f.top_k > 0 and f.top_p >= 1.0 and f.min_p <= 0.0
            need = max(need, f.top_k + 1 if only_k else max(FILTER_CANDIDATES, f.top_k + 1))
    return min(vocab, MAX_CANDIDATES, need)


def _row_filters(segs, rows, device):
    """Per-row filter columns of a chunk, or None when no row of it is filtered."""
    if not any(sg.filter for sg in segs or ()):
        return None
    per_row = [None] * rows
    for sg in segs:
        for r in range(sg.start, sg.end):
            per_row[r] = sg.filter
    return filter_params(per_row, device)


def _finite(m):
    """A row max safe to subtract (rows whose tile is all -inf after edits: a very low value)."""
    return m.clamp(min=-1e30)


def softcap_(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """``tanh(logits / softcap) * softcap`` in fp32, in place on a fresh matmul output (the same
    operations and bits as the out-of-place form, one temporary instead of three)."""
    logits = logits.float() if logits.dtype != torch.float32 else logits
    return logits.div_(softcap).tanh_().mul_(softcap)


def softcap_fast_(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap_`` as ``2c sigmoid(2x / c) - c`` (the same function), in place. Written by hand
    because ATen's float tanh on CPU is its precise vectorized one: 161 us against 17 for a
    sigmoid of 32 x 4096 fp32 (2 threads, AVX512 EPYC), and the head softcaps every canvas row's
    full vocabulary each step. It rounds differently: within ``c * 2**-21`` of ``softcap_``
    (1.4e-5 at c = 30, 7.6e-6 measured; tests/test_head.py), so only unseeded rows take it;
    seeded rows keep the reference's operations and bits."""
    logits = logits.float() if logits.dtype != torch.float32 else logits
    return logits.mul_(2.0 / softcap).sigmoid_().mul_(2.0 * softcap).sub_(softcap)


def tile_matmul(h: torch.Tensor, vs: VocabSlice, c0: int, c1: int) -> torch.Tensor:
    """``h @ weight[c0:c1].T`` of one vocabulary tile (the engine's GEMM where it gave one)."""
    return vs.tile_matmul(h, c0, c1) if vs.tile_matmul is not None else F.linear(h, vs.weight[c0:c1])


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    """The capped fp32 logits of ``hidden`` against the head rows ``weight``."""
    return softcap_(F.linear(hidden, weight), softcap)


def is_tiled(size: int, ranks: int, tile: int) -> bool:
    """Whether the head takes the tiled path (else the reference's operations on one tile): a
    vocabulary slice of `size` rows on one of `ranks` ranks, `tile` columns per tile."""
    return ranks > 1 or size > tile


@torch.no_grad()
def canvas_head(hidden: torch.Tensor, vs: VocabSlice, *, softcap: float, sched_t: torch.Tensor,
                temperature: float, generator: torch.Generator | None, exact_noise: bool,
                want_soft: bool, emb_dtype: torch.dtype, tile: int = DEFAULT_TILE,
                budget: int = DEFAULT_BUDGET, segments: list[RowSegment] | None = None) -> RowStats:
    """Row statistics of canvas rows (``hidden``: ``[n, H]``); see the module doc. One request:
    `sched_t` a 0-d tensor and `temperature` a float. Several requests at once (unseeded only):
    both per row, ``[n]`` host tensors or sequences of floats (the schedule temperature of each
    row's request, its temperature; 0 = greedy). `segments`: the rows' logit edits and draw
    filters (refine/filters.py), by request."""
    per_row = isinstance(temperature, (torch.Tensor, list, tuple))
    if per_row and exact_noise:
        raise ValueError("per-row parameters are for unseeded requests (exact_noise=False)")
    cols = max(1, min(tile, vs.max_size or vs.size))
    # seeded: the noise is drawn a full row at a time
    rows = chunk_rows(vs, tile, budget, exact_noise=exact_noise and temperature != 0.0)
    # the reference's own operations only where they buy bit-identity: seeded draws on one tile
    exact_ops = exact_noise and not is_tiled(vs.size, vs.ranks, tile)
    step = _exact_chunk if exact_ops else _tiled_chunk

    if per_row:  # host values (Python floats): every decision below is made without the device
        temps = temperature.tolist() if isinstance(temperature, torch.Tensor) else list(temperature)
        scheds = sched_t.tolist() if isinstance(sched_t, torch.Tensor) else list(sched_t)

    def chunk_params(i):
        if not per_row:
            return sched_t, temperature
        dev = hidden.device
        t, st = temps[i:i + rows], scheds[i:i + rows]
        flags = RowFlags(all_greedy=all(x == 0 for x in t), unit=all(x in (0.0, 1.0) for x in t))
        col = lambda v: to_device(torch.tensor(v, dtype=torch.float32).unsqueeze(1), dev)  # noqa: E731
        return col(st), col(t), flags

    parts = [step(hidden[i:i + rows], vs, cols, softcap, *chunk_params(i), generator=generator,
                  exact_noise=exact_noise, want_soft=want_soft, emb_dtype=emb_dtype,
                  segs=_chunk_segments(segments, i, i + rows))
             for i in range(0, hidden.shape[0], rows)]
    den, am, ent, soft = zip(*parts)
    return RowStats(torch.cat(den), torch.cat(am), torch.cat(ent),
                    torch.cat(soft) if want_soft else None)


def chunk_rows(vs: VocabSlice, tile: int, budget: int, exact_noise: bool) -> int:
    """Rows of one chunk of ``canvas_head`` (its temporaries are ``[rows, min(vocab, tile)]``,
    and ``[rows, vocab]`` noise for seeded requests)."""
    cols = max(1, min(tile, vs.max_size or vs.size))
    if exact_noise:
        return max(1, budget // vs.vocab)
    return max(1, budget // min(vs.vocab, cols))


@torch.no_grad()
def profile_head(vs: VocabSlice, hidden_size: int, *, dtype: torch.dtype, softcap: float,
                 emb_dtype: torch.dtype, tile: int, budget: int, seeded_budget: int = DEFAULT_BUDGET,
                 device=None) -> tuple[int, int]:
    """Run the head once at its largest chunk, unseeded (at `budget`) and seeded (its noise rows
    at `seeded_budget`), on random hidden states, so that an engine's memory profiling (vLLM's
    profile run on a GPU) sees the head's temporaries. Draws from throwaway generators. Returns
    the two chunk sizes (rows)."""
    device = device or vs.weight.device
    rows = chunk_rows(vs, tile, budget, exact_noise=False)
    seeded = chunk_rows(vs, tile, seeded_budget, exact_noise=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.rand(max(rows, seeded), hidden_size, device=device, dtype=dtype)
    canvas_head(h[:rows], vs, softcap=softcap, sched_t=[1.0] * rows, temperature=[1.0] * rows,
                generator=gen, exact_noise=False, want_soft=True, emb_dtype=emb_dtype, tile=tile,
                budget=budget)
    canvas_head(h[:seeded], vs, softcap=softcap, sched_t=torch.tensor(1.0), temperature=1.0,
                generator=gen, exact_noise=True, want_soft=True, emb_dtype=emb_dtype, tile=tile,
                budget=seeded_budget)
    return rows, seeded


class PendingStep(NamedTuple):
    """A denoising step whose head has run (statistics on the model's device) and whose per-row
    update has not: steps of several requests are finished together (``finish_steps``), with one
    device-to-host copy for all of them."""

    states: list[CanvasState]
    stats: RowStats
    generator: torch.Generator | None  # the batch's shared generator (None: one seeded state)


@torch.no_grad()
def head_step(state: CanvasState, hidden: torch.Tensor, vs: VocabSlice, *, softcap: float,
              emb_dtype: torch.dtype, tile: int = DEFAULT_TILE,
              budget: int = DEFAULT_BUDGET, **_) -> PendingStep:
    """The head of one request's denoising step (its own generator and schedule temperature)."""
    p = state.params
    stats = canvas_head(hidden, vs, softcap=softcap, sched_t=temperature(p, state.cur_step),
                        temperature=p.temperature,
                        generator=state.noise_generator or state.generator,
                        exact_noise=state.exact_noise, want_soft=state.cur_step > 1,
                        emb_dtype=emb_dtype, tile=tile, budget=budget,
                        segments=state_segments([state]))
    return PendingStep([state], stats, None)


def state_segments(states: list[CanvasState]) -> list[RowSegment] | None:
    """The logit edits and draw filters of `states`' canvas rows (concatenated in order)."""
    out, o = [], 0
    for st in states:
        if st.edits is not None or st.filter is not None:
            out.append(RowSegment(o, o + st.length, st.edits, st.filter))
        o += st.length
    return out or None


@torch.no_grad()
def head_batch(states: list[CanvasState], hidden: torch.Tensor, vs: VocabSlice, *,
               softcap: float, emb_dtype: torch.dtype, generator: torch.Generator,
               tile: int = DEFAULT_TILE, budget: int = DEFAULT_BUDGET, **_) -> PendingStep:
    """The head of several unseeded requests' step at once (their canvas rows' hidden states
    concatenated, ``[sum n, H]``): per-row schedule temperatures, draws from one shared
    `generator` (the same on every rank)."""
    ns = [st.length for st in states]
    # per row, as host floats (the fp32 schedule value round-trips exactly through a float)
    sched = [v for st, n in zip(states, ns) for v in [float(temperature(st.params, st.cur_step))] * n]
    temps = [v for st, n in zip(states, ns) for v in [float(st.params.temperature)] * n]
    stats = canvas_head(hidden, vs, softcap=softcap, sched_t=sched, temperature=temps,
                        generator=generator, exact_noise=False,
                        want_soft=any(st.cur_step > 1 for st in states), emb_dtype=emb_dtype,
                        tile=tile, budget=budget, segments=state_segments(states))
    return PendingStep(list(states), stats, generator)


@torch.no_grad()
def finish_steps(pending: list[PendingStep], normalizer: torch.Tensor, on_error=None) -> None:
    """The per-row updates of `pending` steps (acceptance, renoising, stopping), their sampled,
    argmax and entropy rows brought to the host in one copy; keeps each canvas's
    self-conditioning soft embeddings (``softmax(processed) @ E * sqrt(H)``) in ``state.soft``
    (on the device) when it goes on. ``on_error(pending_step, exc)``, if given, takes an
    exception of one step's update and the others go on."""
    host = to_host(*[t for p in pending for t in (p.stats.denoiser, p.stats.argmax, p.stats.entropy)])
    for k, p in enumerate(pending):
        try:
            den, am, ent = host[3 * k: 3 * k + 3]
            if p.generator is None:
                apply_step(p.states[0], den, am, ent)
            else:
                apply_steps(p.states, den, am, ent, p.generator)
            soft, o = p.stats.soft, 0
            for st in p.states:
                n = st.length
                st.soft = None if st.commit is not None else soft[o:o + n] * normalizer.to(soft.dtype)
                o += n
        except Exception as exc:  # noqa: BLE001 - handed to the caller's per-request handling
            if on_error is None:
                raise
            on_error(p, exc)


def denoise_step(state: CanvasState, hidden: torch.Tensor, vs: VocabSlice, *,
                 normalizer: torch.Tensor, **kw) -> None:
    """One denoising step of one request from its canvas rows' hidden states ``[n, H]``."""
    finish_steps([head_step(state, hidden, vs, **kw)], normalizer)


def denoise_batch(states: list[CanvasState], hidden: torch.Tensor, vs: VocabSlice, *,
                  normalizer: torch.Tensor, **kw) -> None:
    """One denoising step of several unseeded requests at once (see ``head_batch``)."""
    finish_steps([head_batch(states, hidden, vs, **kw)], normalizer)


def _exact_chunk(h, vs, cols, softcap, sched_t, temperature, flags=None, *, generator,
                 exact_noise, want_soft, emb_dtype, segs=None):
    """One tile on one rank for a seeded request: the reference's own operations, row chunk by
    row chunk (row-wise operations and row-major noise make this bit-identical to the whole
    canvas at once). Logit edits on the capped logits, draw filters on the sampling logits
    (refine/filters.py). Unseeded rows always take ``_tiled_chunk``."""
    gen = generator
    w = vs.weight[: vs.size]
    logits = head_logits(h, w, softcap)
    _edit(logits, segs, vs.start)
    processed = logits / sched_t
    filt = _row_filters(segs, h.shape[0], h.device)
    probs = None
    argmax = processed.argmax(-1)
    if temperature == 0.0:
        denoiser = argmax
    else:
        scaled = processed if temperature == 1.0 else logits / (sched_t * temperature)
        if filt is not None:
            scaled = dense_filter(scaled, *filt)
        sample_probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
        probs = sample_probs if temperature == 1.0 and filt is None else None
        # multinomial(p, 1) is argmax(p / q), q ~ Exp(1) per entry (ATen); spelled out so the
        # request's CPU generator also serves tensors on a GPU
        q = torch.empty(sample_probs.shape, dtype=torch.float32,
                        device=draw_device(gen)).exponential_(1, generator=gen)
        denoiser = (sample_probs / to_device(q, sample_probs.device)).argmax(-1)
    ent = entropy(processed)
    soft = None
    if want_soft:
        if probs is None or emb_dtype != torch.float32:
            probs = torch.softmax(processed.to(emb_dtype), dim=-1, dtype=torch.float32)
        e = vs.soft_weight[: vs.size]
        soft = probs.to(e.dtype) @ e
    return denoiser, argmax, ent, soft


class _Online:
    """Streaming softmax statistics per row, relative to the running max m: S = sum exp(z - m),
    D = sum exp(z - m) (z - m) (entropy = log S - D / S, no cancellation), and optionally
    A = sum exp(z - m) E[v] (soft embeddings)."""

    def __init__(self):
        self.m = self.s = self.u = self.acc = None

    def add(self, zm, e, mz, emb=None):
        """One tile: ``zm`` = z - mz (its row max ``mz``), ``e`` = exp(zm), ``emb(e)`` the product
        with its embedding rows."""
        self.add_sums(mz, e.sum(-1), (e * zm).sum(-1), e, emb)

    def add_sums(self, mz, s, d, e, emb=None):
        """One tile from its sums ``s`` = sum e and ``d`` = sum e (z - mz)."""
        acc = emb(e).float() if emb is not None else None
        if self.m is None:
            self.m, self.s, self.u, self.acc = mz, s, d, acc
            return
        self.m, self.s, self.u, scales = merge(self.m, self.s, self.u, mz, s, d)
        if acc is not None:
            a, b = scales
            self.acc = self.acc * a[:, None] + acc * b[:, None]


def tile_stats(raw: torch.Tensor, softcap: float, sched_t: torch.Tensor):
    """One vocabulary tile of an unseeded unit-temperature step, written as one function for a
    compiler to fuse (``compiled_tile_stats``); the eager loop computes the same quantities in
    place, pass by pass. Returns the processed logits ``z = tanh(raw / softcap) * softcap /
    sched_t``, their row max and argmax, ``e = exp(max(z - max, EXP_FLOOR))``, ``sum e``,
    ``sum e (z - max)`` and ``cumsum e`` (the tile's inverse-CDF draw)."""
    return tile_rest(torch.tanh(raw.float() / softcap) * softcap / sched_t)  # fp32, as softcap_


def tile_rest(z: torch.Tensor):
    """``tile_stats`` after the softcap: everything but the tanh, for a compiler to fuse."""
    mz, iz = z.max(-1)
    zm = (z - mz[:, None]).clamp(min=EXP_FLOOR)
    e = zm.exp()
    return z, mz, iz, e, e.sum(-1), (e * zm).sum(-1), e.cumsum(-1)


def compiled_tile_stats(softcap: float, dtype: torch.dtype = torch.float32, warm_rows: int = 3,
                        warm_cols: int = 64, device=None) -> Callable | None:
    """``tile_stats`` with its passes after the softcap through ``torch.compile`` (inductor: one
    C++ loop nest on CPU instead of seven passes over the tile; the earlier whole-function graph
    measured 146-149 -> 127-128 ms per medium head step of 256 rows in benchmarks/RESULTS.md, this
    split form was not measured on medium in an engine), compiled here on a small tile of
    the model's logits `dtype`, on the model's `device` (a graph warmed on host tensors would be
    compiled again for the first GPU request), so that no request pays for it (dynamic shapes:
    one graph for every tile width and row count above 1). The softcap itself stays ATen's
    in-place ``softcap_`` on the tile's fresh matmul output (`raw` is overwritten): compiled into
    the loop nest, inductor evaluates the tanh again in each consumer loop (max, sums, cumsum),
    and a tanh costs ~3x an exp on CPU, so the whole-function graph was slower than the eager
    passes at 32 rows (1.27 against 0.96 ms for 32 x 4096 on the 2-core AVX2 machine; this
    split: 0.95; 512 x 1024: 4.55 whole, 3.28 split, 9.60 eager). The values are the eager
    passes' bit for bit up to the compiled reductions' rounding. None, with a warning, if it
    cannot be compiled here (e.g. no C++ compiler): the caller keeps the eager passes."""
    import logging

    try:
        rest = torch.compile(tile_rest, dynamic=True)

        def fn(raw, cap, sched_t, capping=softcap_):  # capping: the rows' softcap function
            return rest(capping(raw, cap).div_(sched_t))

        with torch.no_grad():
            fn(torch.randn(warm_rows, warm_cols, dtype=dtype, device=device), softcap,
               torch.full((warm_rows, 1), 0.5, device=device))
        return fn
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path is exact
        logging.getLogger("dgemma_vllm").warning(
            "dgemma_head_compile: torch.compile of the head tile failed (%s: %s); using the eager "
            "head", type(e).__name__, e)
        return None


def merge(m1, s1, d1, m2, s2, d2):
    """Merge two partial (max, sum, D) statistics; also returns the two rescaling factors."""
    m = torch.maximum(m1, m2)
    a, b = torch.exp(m1 - m), torch.exp(m2 - m)
    s = s1 * a + s2 * b
    d = a * (d1 + (m1 - m) * s1) + b * (d2 + (m2 - m) * s2)
    return m, s, d, (a, b)


def _tiled_chunk(h, vs, cols, softcap, sched_t, temperature, flags=None, *, generator,
                 exact_noise, want_soft, emb_dtype, segs=None):
    gen = generator
    k = h.shape[0]
    tiles = math.ceil((vs.max_size or vs.size) / cols)
    cap = softcap_ if exact_noise else softcap_fast_  # seeded rows: the reference's bits
    greedy = None
    if isinstance(temperature, torch.Tensor):  # several unseeded requests: per-row temperature
        greedy = temperature == 0
        sampling = not flags.all_greedy
        temperature = torch.where(greedy, 1.0, temperature)
        if flags.unit:  # the common case: sample from `z` itself (the same values as
            temperature = 1.0  # logits / (sched_t * 1), four passes fewer a tile)
    else:
        sampling = temperature != 0.0
    edits, masks = _has_edits(segs), _masks(segs)
    filt = _row_filters(segs, k, h.device) if sampling else None
    keep_logits = sampling and (isinstance(temperature, torch.Tensor) or temperature != 1.0)
    noise = uni = None
    if sampling and exact_noise:  # every rank draws the same full rows, in the reference's order
        noise = torch.empty(k, vs.vocab, dtype=torch.float32,
                            device=draw_device(gen)).exponential_(1, generator=gen)
        noise = to_device(noise, h.device)
    elif sampling:  # two uniforms per (row, tile of any rank), then one per rank merge
        uni = torch.rand(k, vs.ranks * tiles * 2 + vs.ranks, generator=gen, dtype=torch.float64,
                         device=draw_device(gen))
        uni = to_device(uni, h.device)
    stats = _Online()  # processed distribution (entropy; soft embeddings when fp32)
    soft_stats = _Online() if want_soft and emb_dtype != torch.float32 else None
    best_v = best_i = smp_v = smp_i = None
    res = _Online()  # reservoir mass of the sampling distribution (inverse-CDF draws)
    # filtered draws: each row's largest sampling logits (candidates) and, when they are not the
    # processed logits themselves, their normalizer
    n_cand = 0
    if filt is not None:
        n_cand = _candidates(segs, vs.vocab)
    cand_v = cand_i = None
    zs_stats = _Online() if filt is not None and keep_logits else None
    for t in range(tiles):
        c0, c1 = t * cols, min((t + 1) * cols, vs.size)
        if c0 >= c1:
            continue
        raw = tile_matmul(h, vs, c0, c1)
        emb = _soft_product(vs, c0, c1) if want_soft else None
        cdf = None
        if vs.tile_stats is not None and not keep_logits and noise is None and not edits:
            z, mz, iz, e, s_, d_, cdf = vs.tile_stats(raw, softcap, sched_t, capping=cap)
            stats.add_sums(mz, s_, d_, e, emb if soft_stats is None else None)
        else:
            logits = cap(raw, softcap)
            if edits:
                _edit(logits, segs, vs.start + c0)
            # the processed logits; in place when the sampling below does not need `logits` again
            z = logits / sched_t if keep_logits else logits.div_(sched_t)
            mz, iz = z.max(-1)
            if masks:
                mz = _finite(mz)
            zm = (z - mz[:, None]).clamp_(min=EXP_FLOOR)
            e = zm.exp()
            stats.add(zm, e, mz, emb if soft_stats is None else None)
            del zm
        if soft_stats is not None:
            zc = z.to(emb_dtype).float()
            mc = zc.max(-1).values
            if masks:
                mc = _finite(mc)
            zc.sub_(mc[:, None]).clamp_(min=EXP_FLOOR)
            soft_stats.add(zc, zc.exp(), mc, emb)
        best_v, best_i = _keep_max(best_v, best_i, mz, iz + (vs.start + c0))
        if not sampling:
            continue
        if isinstance(temperature, torch.Tensor):
            zs = logits / (sched_t * temperature)
        else:
            zs = z if temperature == 1.0 else logits / (sched_t * temperature)
        if filt is not None:
            tv, ti = zs.topk(min(n_cand, c1 - c0), dim=-1)
            cand_v, cand_i = _merge_top(cand_v, cand_i, tv, ti + (vs.start + c0), n_cand)
            if zs_stats is not None:
                ms = _finite(zs.max(-1).values)
                zs_stats.add_sums(ms, torch.exp((zs - ms[:, None]).clamp_(min=EXP_FLOOR)).sum(-1),
                                  torch.zeros_like(ms), None)
        if noise is not None:
            score = zs - torch.log(noise[:, vs.start + c0: vs.start + c1])
            sv, si = score.max(-1)
            smp_v, smp_i = _keep_max(smp_v, smp_i, sv, si + (vs.start + c0))
        else:
            ms = mz if zs is z else zs.max(-1).values
            if masks:
                ms = _finite(ms)
            ws = e if zs is z else torch.exp((zs - ms[:, None]).clamp_(min=EXP_FLOOR))
            if masks:  # ids at -inf get no sampling mass (not the floor's 1.6e-38)
                ws = ws.masked_fill(torch.isneginf(zs), 0.0)
            if cdf is None:  # (the fused tile's cdf is of z, and zs is z whenever it ran)
                cdf = ws.cumsum(-1)
            slot = 2 * (vs.rank * tiles + t)
            u_in = uni[:, slot + 1].to(cdf.dtype)[:, None] * cdf[:, -1:]
            cand = torch.searchsorted(cdf, u_in).squeeze(-1).clamp_(max=c1 - c0 - 1) + (vs.start + c0)
            smp_i = _reservoir(res, ms, cdf[:, -1], cand, uni[:, slot], smp_i)
    ent_parts = (stats.m, stats.s, stats.u)
    zs_parts = None if zs_stats is None else (zs_stats.m, zs_stats.s)
    if vs.ranks > 1:
        fields = [stats.m, stats.s, stats.u, best_v, best_i.double()]
        if sampling and noise is not None:
            fields += [smp_v, smp_i.double()]
        elif sampling:
            fields += [res.m, res.s, smp_i.double()]
        soft_src = soft_stats or stats
        if want_soft:
            fields += [soft_src.m, soft_src.s]
        if zs_stats is not None:
            fields += [zs_stats.m, zs_stats.s]
        g = vs.gather(torch.stack([f.double() for f in fields], -1))  # [ranks, k, F]
        m, s_, d = g[0, :, 0], g[0, :, 1], g[0, :, 2]
        for q in range(1, vs.ranks):
            m, s_, d, _ = merge(m, s_, d, g[q, :, 0], g[q, :, 1], g[q, :, 2])
        ent_parts = (m, s_, d)
        r = g[..., 3].argmax(0)  # first rank holding the best value: lowest vocabulary id
        best_i = g[..., 4].gather(0, r[None])[0].long()
        j = 5
        if sampling and noise is not None:
            r = g[..., j].argmax(0)
            smp_i = g[..., j + 1].gather(0, r[None])[0].long()
            j += 2
        elif sampling:
            merged = _Online()
            pick = None
            for q in range(vs.ranks):
                pick = _reservoir(merged, g[q, :, j], g[q, :, j + 1], g[q, :, j + 2].long(),
                                  uni[:, 2 * vs.ranks * tiles + q], pick)
            smp_i = pick
            j += 3
        if want_soft:
            sm, ss = g[..., j], g[..., j + 1]
            m_soft = sm.max(0).values
            sc = torch.exp(sm - m_soft)
            denom = (ss * sc).sum(0)
            acc = soft_src.acc * sc[vs.rank][:, None].to(soft_src.acc.dtype)
            soft_src.acc, soft_src.s = vs.reduce(acc), denom
            j += 2
        if zs_stats is not None:
            zm_, zsum = g[0, :, j], g[0, :, j + 1]
            for q in range(1, vs.ranks):
                zm_, zsum, _, _ = merge(zm_, zsum, torch.zeros_like(zsum), g[q, :, j],
                                        g[q, :, j + 1], torch.zeros_like(zsum))
            zs_parts = (zm_, zsum)
        if filt is not None:  # every rank's candidates, merged (the same on every rank)
            if cand_v.shape[1] < n_cand:  # a slice narrower than the candidates: pad
                fill = n_cand - cand_v.shape[1]
                cand_v = torch.cat([cand_v, cand_v.new_full((k, fill), float("-inf"))], -1)
                cand_i = torch.cat([cand_i, cand_i.new_zeros((k, fill))], -1)
            gc = vs.gather(torch.stack([cand_v.double(), cand_i.double()], -1))  # [ranks, k, K, 2]
            cand_v, cand_i = _merge_top(None, None, gc[..., 0].permute(1, 0, 2).reshape(k, -1),
                                        gc[..., 1].permute(1, 0, 2).reshape(k, -1).long(), n_cand)
    m_, s, d = ent_parts
    ent = (torch.log(s.double()) - d.double() / s.double()).float()
    soft = None
    if want_soft:
        src = soft_stats or stats
        soft = (src.acc / src.s[:, None].to(src.acc.dtype)).to(vs.soft_weight.dtype)
    denoiser = best_i if not sampling else smp_i
    if filt is not None:
        lse = (zs_parts[0].double() + torch.log(zs_parts[1].double()) if zs_parts is not None
               else m_.double() + torch.log(s.double()))
        denoiser = _filtered_draw(h, vs, cols, softcap, sched_t, temperature, segs, filt,
                                  cand_v, cand_i, lse, noise, uni, denoiser, cap=cap)
    if greedy is not None and sampling:
        denoiser = torch.where(greedy[:, 0], best_i, denoiser)
    return denoiser, best_i, ent, soft


def _merge_top(v, i, tv, ti, n):
    """The `n` largest of a running (values, ids) set and a tile's, descending; among equal
    values the lower id first (as a full-row sort would keep them together)."""
    if v is not None:
        tv, ti = torch.cat([v, tv.to(v.dtype)], -1), torch.cat([i, ti], -1)
    if tv.shape[-1] > n:
        tv, pos = tv.topk(n, dim=-1)
        ti = ti.gather(-1, pos)
    return tv, ti


def _filtered_draw(h, vs, cols, softcap, sched_t, temperature, segs, filt, cand_v, cand_i, lse,
                   noise, uni, drawn, cap=softcap_):
    """The draws of a chunk's filtered rows from their candidates (every rank the same: the
    candidates are merged); rows whose kept set may reach past them from their full logits.
    Other rows keep their unfiltered draw `drawn`."""
    top_k, top_p, min_p = filt
    on = ((top_k > 0) & (top_k < vs.vocab)) | (top_p < 1.0) | (min_p > 0)
    kept, exact = candidate_filter(cand_v, top_k, top_p, min_p, vs.vocab, cand_v[:, 0], lse)
    if noise is not None:  # the reference's argmax(p / q) over the kept ids
        score = cand_v.double() - torch.log(noise.gather(1, cand_i).double())
        score = score.masked_fill(kept.logical_not(), float("-inf"))
        pick = cand_i.gather(1, score.argmax(-1, keepdim=True))[:, 0]
    else:  # inverse CDF over the kept ids (one uniform per row)
        w = torch.exp(cand_v.double() - cand_v[:, :1].double()).masked_fill(kept.logical_not(), 0.0)
        cdf = w.cumsum(-1)
        j = torch.searchsorted(cdf, uni[:, :1] * cdf[:, -1:]).clamp_(max=cdf.shape[1] - 1)
        pick = cand_i.gather(1, j)[:, 0]
    out = torch.where(on[:, 0], pick, drawn)
    slow = _fallback_rows(on[:, 0] & exact.logical_not())
    group = max(1, DEFAULT_BUDGET // vs.vocab)  # full rows at a time: flat memory
    for g0 in range(0, len(slow), group):
        part = slow[g0:g0 + group]
        rows = to_device(torch.tensor(part), h.device)
        sel = lambda t: t.index_select(0, rows)  # noqa: E731
        full = _full_rows(sel(h), vs, cols, softcap, sched_t, temperature, segs, part, cap=cap)
        f = dense_filter(full, sel(top_k), sel(top_p), sel(min_p))
        p = torch.softmax(f, dim=-1, dtype=torch.float32)
        if noise is not None:
            got = (p / sel(noise)).argmax(-1)
        else:
            c = p.double().cumsum(-1)
            got = torch.searchsorted(c, sel(uni)[:, :1] * c[:, -1:]).clamp_(max=c.shape[1] - 1)[:, 0]
        out = out.index_copy(0, rows, got)
    return out


def _fallback_rows(mask: torch.Tensor) -> list[int]:
    """The rows of `mask` (on the host: one device-to-host copy of a filtered chunk's flags)."""
    return to_host(mask)[0].nonzero()[:, 0].tolist()


def _full_rows(h, vs, cols, softcap, sched_t, temperature, segs, rows, cap=softcap_):
    """Full-vocabulary sampling logits ``[len(rows), V]`` of chunk rows `rows` (``h`` their
    hidden states), computed as the tiles compute them (`cap`: their softcap); gathered over the
    ranks."""
    sub = []  # the rows' edits, as segments of the sub-batch
    for j, r in enumerate(rows):
        for sg in segs or ():
            if sg.start <= r < sg.end:
                sub.append(RowSegment(j, j + 1, sg.edits, sg.filter, sg.row0 + r - sg.start))
    idx = to_device(torch.tensor(rows), h.device)
    st = sched_t.index_select(0, idx) if isinstance(sched_t, torch.Tensor) and sched_t.dim() else sched_t
    t = temperature.index_select(0, idx) if isinstance(temperature, torch.Tensor) else temperature
    parts = []
    for c0 in range(0, vs.size, cols):
        c1 = min(c0 + cols, vs.size)
        raw = tile_matmul(h, vs, c0, c1)
        logits = cap(raw, softcap)
        _edit(logits, sub, vs.start + c0)
        z = logits / st
        parts.append(z if (not isinstance(t, torch.Tensor) and t == 1.0) else logits / (st * t))
    mine = torch.cat(parts, -1)
    if vs.ranks == 1:
        return mine
    per = vs.max_size or vs.size
    pad = torch.full((mine.shape[0], per), float("-inf"), dtype=mine.dtype, device=mine.device)
    pad[:, : mine.shape[1]] = mine
    g = vs.gather(pad)  # [ranks, rows, per]: rank q holds ids q * per ..
    return torch.cat([g[q, :, : max(0, min(per, vs.vocab - q * per))] for q in range(vs.ranks)], -1)


def _soft_product(vs, c0, c1):
    """``p -> p @ soft_weight[c0:c1]`` in the embedding's dtype (the engine's GEMM if it gave one)."""
    w = vs.soft_weight
    if vs.soft_matmul is not None:
        return lambda p: vs.soft_matmul(p.to(w.dtype), c0, c1)
    return lambda p: p.to(w.dtype) @ w[c0:c1]


def _keep_max(best_v, best_i, v, i):
    """Running (max, index) over tiles in vocabulary order; strict, so the earlier (lower) index
    wins ties, as argmax."""
    if best_v is None:
        return v, i
    better = v > best_v
    return torch.where(better, v, best_v), torch.where(better, i, best_i)


def _reservoir(state: _Online, m, s, cand, u, current):
    """Merge a block of mass ``s * exp(m)`` whose own draw is ``cand`` into the running draw:
    take ``cand`` with probability block mass / total mass (``u`` uniform)."""
    if state.m is None:
        state.m, state.s = m.double(), s.double()
        return cand
    m, s = m.double(), s.double()
    top = torch.maximum(state.m, m)
    a, b = state.s * torch.exp(state.m - top), s * torch.exp(m - top)
    take = u * (a + b) < b
    state.m, state.s = top, a + b
    return torch.where(take, cand, current)
