"""vLLM's sampling parameters for block refinement, engine-free (plain torch).

Two kinds, applied where vLLM applies them (v1/sample/sampler.py), on every denoising step:

- :class:`LogitEdits` change a step's softcapped logits before the schedule temperature, in
  vLLM's order: ``allowed_token_ids`` (every other id -inf), single-token ``bad_words`` (-inf),
  ``min_tokens`` (stop ids -inf on the canvas rows before the ``min_tokens``-th output token),
  ``logit_bias`` (added), then the penalties over the prompt and the committed output tokens:
  ``repetition_penalty`` (``x * (1 / r if x > 0 else r)`` for ids in prompt or output),
  ``frequency_penalty`` (``- f * count in output``) and ``presence_penalty`` (``- p`` for ids in
  the output). The edited logits are the step's logits: the schedule temperature divides them
  and argmax, entropy, acceptance, stopping and self-conditioning all see them, as transformers'
  ``generate`` sees a ``logits_processor``.
- :class:`SamplingFilter` (``top_k``, ``top_p``, ``min_p``) restricts the distribution each
  denoising *draw* is made from (the step's logits at the schedule temperature times the
  request's temperature), as vLLM's sampler does: ``min_p`` first (drop ids with probability
  below ``min_p`` times the largest), then ``top_k`` (keep ids at least as large as the k-th
  largest logit), then ``top_p`` (of what is left, renormalized: drop ids whose cumulative mass
  counted from the smallest is at most ``1 - top_p``; the largest is always kept). It does not
  change the argmax, the entropy or the self-conditioning of the step.

The head (:mod:`dgemma_vllm.refine.head`) applies the edits tile by tile (sparse: only the ids
they name) and the filter exactly on a per-row candidate set merged across tiles and ranks
(:func:`candidate_filter`), with one row's full logits as the fallback where the kept set may
reach past the candidates (:func:`dense_filter`).

Multi-token ``bad_words`` cannot be a per-position mask on a canvas (the positions before it
are being refined at the same time): :func:`ban_sequences` projects the committed canvas
instead, left to right: where a bad word would end, the position takes its best alternative
under the final step's logits that ends none.

Written by hand because vLLM's versions (sampler ops, logits processors) work on ``[rows,
vocab]`` logits of a persistent input batch; the tests check these against vLLM's functions.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from .device import to_device

NEG_INF = float("-inf")
# Candidates per row of a filtered draw in the tiled head (at least top_k of its rows, at most
# MAX_CANDIDATES: rows whose kept set may be larger take the one-row fallback).
FILTER_CANDIDATES = 256
MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class SamplingFilter:
    top_k: int = 0  # 0: off (vLLM's -1 and values >= vocab too)
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off

    @classmethod
    def of(cls, sp, vocab: int) -> "SamplingFilter | None":
        """The filter of vLLM SamplingParams `sp` (None when every part is off)."""
        k = int(sp.top_k or 0)
        k = 0 if k < 0 or k >= vocab else k
        f = cls(top_k=k, top_p=float(sp.top_p), min_p=float(sp.min_p))
        return f if f.active else None

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def filter_params(filters: Sequence[SamplingFilter | None], device) -> tuple[torch.Tensor, ...]:
    """Per-row ``(top_k, top_p, min_p)`` columns ``[rows, 1]`` (off values where None)."""
    k = [f.top_k if f else 0 for f in filters]
    p = [f.top_p if f else 1.0 for f in filters]
    m = [f.min_p if f else 0.0 for f in filters]
    col = lambda v, dt: to_device(torch.tensor(v, dtype=dt).unsqueeze(1), device)  # noqa: E731
    return col(k, torch.long), col(p, torch.float32), col(m, torch.float32)


@torch.no_grad()
def dense_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """vLLM's min_p, top_k, top_p on full rows ``[rows, V]`` of sampling logits (per-row
    ``[rows, 1]`` parameters, off values allowed): a new tensor with dropped ids at -inf. No
    branch on device values (on a GPU: no host wait)."""
    v = logits.shape[-1]
    x = logits.float().clone()
    probs = torch.softmax(x, dim=-1)
    x.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * min_p, NEG_INF)  # min_p 0: none
    srt, idx = x.sort(dim=-1, descending=False)
    k = torch.where((top_k > 0) & (top_k < v), top_k, v)
    kth = srt.gather(1, (v - k).clamp(min=0))
    srt.masked_fill_(srt < kth, NEG_INF)
    cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
    drop = (cum <= 1 - top_p) & (top_p < 1.0)
    drop.narrow(1, v - 1, 1).fill_(False)  # the largest is always kept
    srt.masked_fill_(drop, NEG_INF)
    return x.scatter_(1, idx, srt)


@torch.no_grad()
def candidate_filter(cand: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, vocab: int, full_max: torch.Tensor,
                     full_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule on each row's K largest sampling logits ``cand`` (``[rows, K]``, descending)
    merged over all tiles and ranks. Returns ``(kept [rows, K] bool, exact [rows] bool)``:
    `exact` where the kept set is provably inside the candidates (else the caller takes the row's
    full logits). `full_max` is the row max, `full_lse` the log-sum-exp over the whole row (for
    top_p when neither min_p nor top_k cuts inside the candidates; None: such rows not exact)."""
    rows, kk = cand.shape
    c = cand.double()
    dev = c.device
    whole = kk >= vocab  # the candidates are the whole row
    kept = torch.isfinite(c)
    # min_p: p_i >= min_p * p_max  <=>  x_i >= max + log(min_p)
    use_m = min_p > 0
    thr = full_max.double()[:, None] + torch.log(min_p.double().clamp(min=1e-300))
    kept &= use_m.logical_not() | (c >= thr)
    use_k = (top_k > 0) & (top_k < vocab)
    kept_m = kept.clone()
    kth = c.gather(1, (top_k - 1).clamp(min=0, max=kk - 1))
    k_known = (use_k & (top_k > kk)).logical_not()  # the k-th largest is among the candidates
    # (k > K: every candidate is among the k largest)
    kept &= use_k.logical_not() | k_known.logical_not() | (c >= kth)
    # min_p and top_k keep every id at or above a value: if the smallest candidate is out, so is
    # every id past the candidates
    cut = kept_m[:, -1].logical_not() | (kept[:, -1].logical_not() & k_known[:, 0])
    if whole:
        cut = torch.ones_like(cut)
    use_p = (top_p < 1.0)[:, 0]
    # top_p over the renormalized kept set: its normalizer from the candidates when they hold
    # it, from the full row when no earlier filter applies (else unknown: not exact)
    x = torch.where(kept, c, NEG_INF)
    lse = torch.logsumexp(x, dim=-1)
    norm_known = cut.clone()
    if full_lse is not None:
        free = (use_m | use_k)[:, 0].logical_not()
        lse = torch.where(cut | free.logical_not(), lse, full_lse.double().to(dev))
        norm_known |= free
    probs = torch.exp(x - lse[:, None])
    above = probs.cumsum(dim=-1) - probs  # the kept mass before each candidate
    drop_p = (above >= top_p.double()) & use_p[:, None]
    drop_p.narrow(1, 0, 1).fill_(False)  # the largest is always kept
    reached = drop_p.any(dim=-1)  # the nucleus closes inside the candidates
    exact = torch.where(use_p, cut | (norm_known & reached), cut)
    return kept & drop_p.logical_not(), exact


# ----------------------------------------------------------------------------- logit edits
@dataclass
class LogitEdits:
    """One request's edits of its canvas logits (see the module doc); ids are vocabulary ids."""

    ids: torch.Tensor | None = None  # [S] int64, sorted, unique: ids with an affine edit
    bias: torch.Tensor | None = None  # [S] fp32 logit_bias, added first (0 where none)
    rep: torch.Tensor | None = None  # [S] fp32 repetition penalty (1 where none)
    sub: torch.Tensor | None = None  # [S] fp32 frequency * count + presence (0 where none)
    banned: torch.Tensor | None = None  # [B] int64 ids always at -inf
    allowed: torch.Tensor | None = None  # [V] bool: the only ids not at -inf
    stop_ids: torch.Tensor | None = None  # [T] int64 ids at -inf on the first `stop_rows` rows
    stop_rows: int = 0

    def __post_init__(self):
        self._on: dict = {}  # (field, device) -> the field on that device (copied once)

    def freeze(self) -> "LogitEdits":
        """Host copies (sorted lists) of the id sets, for each tile's range without tensor ops
        (on a GPU no host work waits for the device; under fake tensors no data-dependent op)."""
        for name in ("ids", "banned", "stop_ids"):
            t = getattr(self, name)
            self._on["list:" + name] = [] if t is None else t.tolist()
        if self.allowed is not None:
            self._on["blocked"] = ~self.allowed
        return self

    def _range(self, name: str, c0: int, c1: int) -> tuple[int, int]:
        ids = self._on.get("list:" + name)
        if ids is None:
            self.freeze()
            ids = self._on["list:" + name]
        return bisect.bisect_left(ids, c0), bisect.bisect_left(ids, c1)

    def _at(self, name: str, dev) -> torch.Tensor:
        key = (name, str(dev))
        t = self._on.get(key)
        if t is None:
            t = self._on[key] = to_device(getattr(self, name), dev)
        return t

    @property
    def masks(self) -> bool:
        """Whether some ids are at -inf (the head then gives them zero sampling mass)."""
        return self.banned is not None or self.allowed is not None or (
            self.stop_ids is not None and self.stop_rows > 0)

    def apply_(self, logits: torch.Tensor, c0: int, row0: int = 0) -> torch.Tensor:
        """Edit ``logits`` in place: ``[rows, c]`` columns ``c0 .. c0 + c`` of the vocabulary,
        rows ``row0 ..`` of the request's canvas."""
        rows, c = logits.shape
        c1 = c0 + c
        dev = logits.device
        if self.allowed is not None:
            if "blocked" not in self._on:
                self.freeze()
            blocked = self._on.get(("blocked", str(dev)))
            if blocked is None:
                blocked = self._on[("blocked", str(dev))] = to_device(self._on["blocked"], dev)
            logits.masked_fill_(blocked.narrow(0, c0, c).unsqueeze(0), NEG_INF)
        if self.banned is not None:
            lo, hi = self._range("banned", c0, c1)
            if hi > lo:
                logits.index_fill_(1, self._at("banned", dev)[lo:hi] - c0, NEG_INF)
        if self.stop_ids is not None and self.stop_rows > row0:
            lo, hi = self._range("stop_ids", c0, c1)
            if hi > lo:
                logits[: self.stop_rows - row0].index_fill_(1, self._at("stop_ids", dev)[lo:hi] - c0,
                                                           NEG_INF)
        if self.ids is not None:
            lo, hi = self._range("ids", c0, c1)
            if hi > lo:
                cols = self._at("ids", dev)[lo:hi] - c0
                x = logits.index_select(1, cols)
                x = x + self._at("bias", dev)[lo:hi]
                r = self._at("rep", dev)[lo:hi]
                x = x * torch.where(x > 0, 1.0 / r, r)  # vLLM's repetition penalty
                x = x - self._at("sub", dev)[lo:hi]
                logits.index_copy_(1, cols, x)
        return logits


def build_edits(*, vocab: int, prompt: Sequence[int], output: Sequence[int],
                presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0,
                logit_bias: dict[int, float] | None = None,
                allowed: Sequence[int] | None = None, banned: Sequence[int] = (),
                stop_ids: Sequence[int] = (), min_tokens: int = 0) -> LogitEdits | None:
    """A request's edits for its next canvas (`output`: the tokens committed so far; the
    canvas's row j is output token ``len(output) + j``). None when nothing applies."""
    affine: dict[int, list[float]] = {}  # id -> [bias, rep, sub]

    def entry(i):
        return affine.setdefault(int(i), [0.0, 1.0, 0.0])

    for i, b in (logit_bias or {}).items():
        entry(i)[0] = float(b)
    if repetition != 1.0:
        for i in set(prompt) | set(output):
            entry(i)[1] = float(repetition)
    if frequency != 0.0 or presence != 0.0:
        ids, counts = torch.unique(torch.tensor(list(output), dtype=torch.long),
                                   return_counts=True) if output else (torch.empty(0), torch.empty(0))
        for i, n in zip(ids.tolist(), counts.tolist()):
            entry(i)[2] = frequency * n + presence
    e = LogitEdits()
    if affine:
        keys = sorted(affine)
        vals = torch.tensor([affine[k] for k in keys], dtype=torch.float32)
        e.ids = torch.tensor(keys, dtype=torch.long)
        e.bias, e.rep, e.sub = vals[:, 0].contiguous(), vals[:, 1].contiguous(), vals[:, 2].contiguous()
    if allowed is not None:
        e.allowed = torch.zeros(vocab, dtype=torch.bool)
        e.allowed[torch.tensor(list(allowed), dtype=torch.long)] = True
    if banned:
        e.banned = torch.tensor(sorted(set(banned)), dtype=torch.long)
    rows = int(min_tokens) - len(output)
    if stop_ids and rows > 0:
        e.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        e.stop_rows = rows
    if e.ids is None and not e.masks:
        return None
    return e.freeze()


# ----------------------------------------------------------------------------- bad words
def split_bad_words(seqs: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, ...]]]:
    """vLLM's bad-word token sequences: single tokens (a logit mask) and longer sequences (the
    commit projection)."""
    single = sorted({s[0] for s in seqs if len(s) == 1})
    multi = sorted({tuple(s) for s in seqs if len(s) > 1})
    return single, multi


def ends_bad_word(tokens: Sequence[int], seqs: Sequence[tuple[int, ...]]) -> bool:
    """Whether `tokens` ends with one of `seqs`."""
    n = len(tokens)
    return any(n >= len(s) and tuple(tokens[n - len(s):]) == s for s in seqs)


def ban_sequences(history: Sequence[int], canvas: list[int], seqs: Sequence[tuple[int, ...]],
                  alternatives, fixed: Sequence[int] = ()) -> list[int]:
    """The committed `canvas` with no bad word (`seqs`) ending in it, given the committed
    `history` before it: left to right, a position where one would end takes the first of
    ``alternatives(position)`` (its ids by the final step's logits, best first) that ends none.
    Positions in `fixed` (pins) keep their token."""
    keep = max((len(s) for s in seqs), default=1) - 1
    ctx = list(history[-keep:]) if keep else []
    out = list(canvas)
    fixed = set(fixed)
    for i in range(len(out)):
        if i not in fixed and ends_bad_word(ctx + out[: i + 1], seqs):
            for alt in alternatives(i):
                out[i] = int(alt)
                if not ends_bad_word(ctx + out[: i + 1], seqs):
                    break
            else:
                raise RuntimeError(f"bad_words: no alternative at canvas position {i}")
    return out
