"""vLLM's sampling parameters in the canvas head (dgemma_vllm/refine/filters.py), engine-free.

The plugin's rules are checked against vLLM's own functions on full logits (the reference
formulation: ``apply_top_k_top_p``, ``MinPLogitsProcessor``'s rule, ``apply_penalties``), and
the tiled, vocabulary-parallel head against the untiled one with the same rules (seeded draws:
the same tokens; candidate sets too small for the kept set take the one-row fallback).
"""

from __future__ import annotations

import threading

import pytest
import torch

from dgemma_vllm.refine.filters import (LogitEdits, SamplingFilter, ban_sequences, build_edits,
                                        candidate_filter, dense_filter, ends_bad_word,
                                        filter_params)
from dgemma_vllm.refine.head import RowSegment, VocabSlice, canvas_head
from test_head import _Group  # all-gather / all-reduce between threads (simulated ranks)

V, H, N, CAP = 1000, 32, 24, 30.0


def _weights(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=g) * 0.3, torch.randn(N, H, generator=g) * scale


def _vllm_filter(logits, k, p, m):
    """vLLM's rule on full rows: MinPLogitsProcessor (builtin.py) then apply_top_k_top_p."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    x = logits.clone()
    if m is not None:
        probs = torch.softmax(x, -1)
        x[probs < probs.amax(-1, keepdim=True) * m[:, None]] = float("-inf")
    return apply_top_k_top_p_pytorch(x, k, p)


@pytest.mark.parametrize("k,p,m", [(5, None, None), (None, 0.8, None), (None, None, 0.05),
                                   (40, 0.9, 0.01), (1, 0.5, None)])
def test_dense_filter_is_vllms_rule(k, p, m):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 300, generator=g) * 3
    kt = None if k is None else torch.full((64,), k, dtype=torch.long)
    pt = None if p is None else torch.full((64,), p)
    mt = None if m is None else torch.full((64,), m)
    ref = _vllm_filter(logits, kt, pt, mt)
    got = dense_filter(logits, *filter_params([SamplingFilter(k or 0, p or 1.0, m or 0.0)] * 64, "cpu"))
    assert torch.equal(torch.isinf(ref), torch.isinf(got))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_candidate_filter_equals_dense_where_it_says_exact():
    g = torch.Generator().manual_seed(2)
    vocab = 2000
    exact_rows = fallback = 0
    for trial in range(30):
        logits = torch.randn(16, vocab, generator=g) * (0.3 + trial * 0.2)
        f = SamplingFilter(top_k=[0, 8, 300][trial % 3], top_p=[1.0, 0.9, 0.5, 0.99][trial % 4],
                           min_p=[0.0, 0.1, 1e-4][trial % 3])
        if not f.active:
            continue
        params = filter_params([f] * 16, "cpu")
        dense = ~torch.isinf(dense_filter(logits, *params))
        cv, ci = logits.topk(256, dim=-1)
        kept, exact = candidate_filter(cv, *params, vocab, cv[:, 0], torch.logsumexp(logits, -1))
        for r in range(16):
            if exact[r]:
                exact_rows += 1
                got = torch.zeros(vocab, dtype=torch.bool)
                got[ci[r][kept[r]]] = True
                assert torch.equal(got, dense[r]), (trial, r, f)
            else:
                fallback += 1
                # only kept sets larger than the candidates before top_p need the full row
                pre = filter_params([SamplingFilter(f.top_k, 1.0, f.min_p)], "cpu")
                assert (~torch.isinf(dense_filter(logits[r:r + 1], *pre))).sum() >= 256
    assert exact_rows > 100 and fallback > 0


def _head(hidden, vs, *, seed, tile, segments, exact=True, temperature=1.0, sched=0.7):
    gen = torch.Generator().manual_seed(seed)
    out = canvas_head(hidden, vs, softcap=CAP, sched_t=torch.tensor(sched), temperature=temperature,
                      generator=gen, exact_noise=exact, want_soft=True, emb_dtype=torch.float32,
                      tile=tile, segments=segments)
    return out


def _reference_step(hidden, w, *, seed, edit, filt, temperature=1.0, sched=0.7):
    """transformers' step with a logits processor (`edit`, before the schedule) and the draw
    filter patched into its multinomial (vLLM's rule on the sampling logits)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.tanh(hidden @ w.T / CAP) * CAP
    logits = edit(logits)
    processed = logits / torch.tensor(sched)
    scaled = processed if temperature == 1.0 else logits / (torch.tensor(sched) * temperature)
    scaled = _vllm_filter(scaled, *filt) if filt is not None else scaled
    den = torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen)[:, 0]
    return den, processed.argmax(-1)


def _edits():
    prompt, output = [3, 5, 5, 9, 17, 400, 999], [5, 12, 12, 12, 600]
    e = build_edits(vocab=V, prompt=prompt, output=output, presence=0.5, frequency=0.3,
                    repetition=1.3, logit_bias={7: 4.0, 12: -2.0, 800: 1.5},
                    banned=[1, 2, 600], stop_ids=[0, 4], min_tokens=8)
    return prompt, output, e


def _vllm_edit(prompt, output):
    """The same edits by vLLM's own functions (min_tokens rows, logit bias, penalties)."""
    from vllm.model_executor.layers.utils import apply_penalties

    def f(logits):
        x = logits.clone()
        x[:, [1, 2, 600]] = float("-inf")  # bad words (single tokens)
        x[:3, [0, 4]] = float("-inf")  # min_tokens = 8 with 5 output tokens: rows 0..2
        x[:, 7] += 4.0
        x[:, 12] += -2.0
        x[:, 800] += 1.5
        n = x.shape[0]
        return apply_penalties(x, torch.tensor([prompt] * n), torch.tensor([output] * n),
                               torch.full((n,), 0.5), torch.full((n,), 0.3), torch.full((n,), 1.3))
    return f


@pytest.mark.parametrize("tile", [V, 128, 37])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_edits_and_filters_match_the_reference_step(tile, temperature):
    """Seeded: the head with edits and a filter draws the reference's tokens (vLLM's functions
    as the processor and the patched sampler), tiled or not."""
    w, hidden = _weights(3)
    prompt, output, e = _edits()
    for f in [SamplingFilter(top_k=20), SamplingFilter(top_p=0.7), SamplingFilter(min_p=0.05),
              SamplingFilter(top_k=50, top_p=0.9, min_p=0.01)]:
        vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
        got = _head(hidden, vs, seed=11, tile=tile, temperature=temperature,
                    segments=[RowSegment(0, N, e, f)])
        filt = (None if not f.top_k else torch.full((N,), f.top_k),
                None if f.top_p == 1.0 else torch.full((N,), f.top_p),
                None if not f.min_p else torch.full((N,), f.min_p))
        den, am = _reference_step(hidden, w, seed=11, edit=_vllm_edit(prompt, output), filt=filt,
                                  temperature=temperature)
        assert torch.equal(got.argmax, am), f
        assert torch.equal(got.denoiser, den), f
        # the edits are on every use of the logits: a banned id is never the argmax nor drawn
        assert not set(got.argmax.tolist()) & {1, 2, 600}


def test_fallback_rows_draw_from_the_full_row():
    """A top_p close to 1 on flat rows keeps more ids than the candidates: the fallback draws
    the reference's tokens."""
    w, hidden = _weights(4, scale=0.05)  # nearly uniform rows
    f = SamplingFilter(top_p=0.999)
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    got = _head(hidden, vs, seed=2, tile=100, segments=[RowSegment(0, N, None, f)])
    den, _ = _reference_step(hidden, w, seed=2, edit=lambda x: x,
                             filt=(None, torch.full((N,), 0.999), None))
    assert torch.equal(got.denoiser, den)


def test_unfiltered_rows_of_a_mixed_chunk_are_unchanged():
    """Unseeded batch: rows of a request without filters draw what they draw alone; the filtered
    request's tokens are inside its kept set."""
    w, hidden = _weights(5)
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    temps = [1.0] * N
    f = SamplingFilter(top_k=3)

    def run(segments):
        gen = torch.Generator().manual_seed(8)
        return canvas_head(hidden, vs, softcap=CAP, sched_t=[0.7] * N, temperature=temps,
                           generator=gen, exact_noise=False, want_soft=False,
                           emb_dtype=torch.float32, tile=128, segments=segments)

    plain = run(None)
    mixed = run([RowSegment(12, N, None, f)])
    assert torch.equal(plain.denoiser[:12], mixed.denoiser[:12])
    top3 = (torch.tanh(hidden @ w.T / CAP) * CAP).topk(3, -1).indices
    assert all(int(mixed.denoiser[r]) in top3[r].tolist() for r in range(12, N))


@pytest.mark.parametrize("f", [SamplingFilter(top_k=20, top_p=0.9), SamplingFilter(top_p=0.999)])
def test_two_vocabulary_ranks_filter_like_one(f):
    """Candidates merged across two ranks (and the fallback's gathered rows): the one-rank
    tokens, with edits that touch both slices."""
    w, hidden = _weights(6, scale=2.0 if f.top_k else 0.05)
    _, _, e = _edits()
    group, results = _Group(2), {}

    def rank(r):
        lo, hi = (0, 520) if r == 0 else (520, V)
        gather, reduce = group.ops(r)
        vs = VocabSlice(weight=w[lo:hi], start=lo, size=hi - lo, vocab=V, max_size=520, rank=r,
                        ranks=2, gather=gather, reduce=reduce)
        results[r] = _head(hidden, vs, seed=4, tile=200, segments=[RowSegment(0, N, e, f)])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    one = _head(hidden, VocabSlice(weight=w, start=0, size=V, vocab=V), seed=4, tile=V,
                segments=[RowSegment(0, N, e, f)])
    for r in (0, 1):
        assert torch.equal(results[r].denoiser, one.denoiser)
        assert torch.equal(results[r].argmax, one.argmax)
        torch.testing.assert_close(results[r].entropy, one.entropy, rtol=1e-5, atol=1e-6)


def test_allowed_token_ids_leave_only_those_ids():
    w, hidden = _weights(7)
    allowed = [10, 20, 30, 999]
    e = build_edits(vocab=V, prompt=[], output=[], allowed=allowed)
    for tile, exact in [(V, True), (128, True), (128, False), (V, False)]:
        vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
        got = _head(hidden, vs, seed=1, tile=tile, exact=exact, segments=[RowSegment(0, N, e, None)])
        assert set(got.denoiser.tolist()) <= set(allowed)
        assert set(got.argmax.tolist()) <= set(allowed)
        assert torch.isfinite(got.entropy).all() and torch.isfinite(got.soft).all()


def test_edits_equal_vllms_functions_on_full_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, V, generator=g) * 4
    prompt, output, e = _edits()
    ref = _vllm_edit(prompt, output)(logits)
    got = e.apply_(logits.clone(), 0, 0)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = ~torch.isinf(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-6, atol=1e-6)
    # tile by tile, from a later canvas row: the same
    tiled = logits.clone()
    for c0 in range(0, V, 77):
        e.apply_(tiled[2:, c0:c0 + 77], c0, 2)
    assert torch.equal(tiled[2:], got[2:])
    assert isinstance(e, LogitEdits) and build_edits(vocab=V, prompt=[1], output=[]) is None


def test_ban_sequences_projects_onto_text_without_bad_words():
    seqs = [(5, 6), (7, 8, 9), (6, 6)]
    hist = [1, 7]
    canvas = [8, 9, 5, 6, 6, 3]
    out = ban_sequences(hist, canvas, seqs, lambda i: [canvas[i], 6, 11, 12])
    toks = hist + out
    assert not any(ends_bad_word(toks[: j + 1], seqs) for j in range(len(toks)))
    assert out[0] == 8 and out[1] != 9 and out[-1] == 3  # only the ends of bad words change
    # a pinned position keeps its token
    assert ban_sequences([], [5, 6], seqs, lambda i: [11], fixed=[1]) == [5, 6]


@pytest.mark.parametrize("ranks", [1, 2])
def test_token_logprobs_equal_the_full_log_softmax(ranks):
    """Committed tokens' raw logprobs, ranks and top ids from tiles (and two ranks) equal
    torch.log_softmax of the full capped logits; tokens far down the row (pins, projections)
    get their exact rank from the counting pass."""
    from dgemma_vllm.refine.logprobs import token_logprobs, top_ids

    w, hidden = _weights(8)
    full = torch.log_softmax((torch.tanh(hidden @ w.T / CAP) * CAP).double(), -1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.where(torch.rand(N, generator=g) < 0.5, full.argmax(-1),
                         torch.randint(0, V, (N,), generator=g))
    group, results = _Group(ranks), {}

    def rank(r):
        if ranks == 1:
            vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
        else:
            lo, hi = (0, 520) if r == 0 else (520, V)
            gather, reduce = group.ops(r)
            vs = VocabSlice(weight=w[lo:hi], start=lo, size=hi - lo, vocab=V, max_size=520,
                            rank=r, ranks=2, gather=gather, reduce=reduce)
        results[r] = (token_logprobs(hidden, vs, tokens, softcap=CAP, n_top=5, tile=97),
                      top_ids(hidden, vs, softcap=CAP, edits=None, row0=0, n=3, tile=97))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for lp, best in results.values():
        want = full.gather(1, tokens[:, None])[:, 0]
        torch.testing.assert_close(lp.token.double(), want, rtol=0, atol=1e-5)
        assert torch.equal(lp.rank, (full >= want[:, None]).sum(-1))
        top = full.topk(5, -1)
        assert torch.equal(lp.top_ids, top.indices)
        torch.testing.assert_close(lp.top.double(), top.values, rtol=0, atol=1e-5)
        assert torch.equal(best, top.indices[:, :3])
    assert (results[0][0].rank > 5).any()  # some tokens needed the counting pass
