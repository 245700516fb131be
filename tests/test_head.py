"""The vocabulary-tiled, vocabulary-parallel canvas head (dgemma_vllm/refine/head.py).

Engine-free checks against the untiled reference operations (one tile, one rank: the sampler
of the reference, bit for bit), a two-rank split run in two threads with real gather/reduce
semantics, tensor memory at 1 and 16 concurrent canvases, and one engine whose head is cut into
many tiles giving the reference's seeded tokens.
"""

from __future__ import annotations

import threading
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dgemma_vllm.refine.head import VocabSlice, canvas_head, denoise_step, head_logits
from dgemma_vllm.refine.params import DiffusionParams
from dgemma_vllm.refine.sampler import CanvasState, entropy, refine_step

V, H, N, CAP = 1000, 32, 24, 30.0


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, H, generator=g) * 0.3, torch.randn(N, H, generator=g) * 2.0)


def _head(hidden, vs, *, seed, tile, temperature=1.0, exact=True, sched=0.7, budget=1 << 22):
    gen = torch.Generator().manual_seed(seed)
    out = canvas_head(hidden, vs, softcap=CAP, sched_t=torch.tensor(sched), temperature=temperature,
                      generator=gen, exact_noise=exact, want_soft=True, emb_dtype=torch.float32,
                      tile=tile, budget=budget)
    return out, gen


def _reference(hidden, w, *, seed, temperature=1.0, sched=0.7):
    """The reference's step operations on full logits (what transformers does)."""
    gen = torch.Generator().manual_seed(seed)
    logits = head_logits(hidden, w, CAP)
    processed = logits / torch.tensor(sched)
    scaled = processed if temperature == 1.0 else logits / (torch.tensor(sched) * temperature)
    probs = torch.softmax(scaled, -1, dtype=torch.float32)
    den = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    soft = torch.softmax(processed, -1) @ w
    return den, processed.argmax(-1), entropy(processed), soft, gen


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("tile,budget", [(V, 1 << 22), (V, 3 * V), (128, 1 << 22), (7, 3 * V)])
def test_tiled_head_matches_untiled_reference(tile, budget, temperature):
    w, hidden = _weights()
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    got, gen = _head(hidden, vs, seed=5, tile=tile, budget=budget, temperature=temperature)
    den, am, ent, soft, rgen = _reference(hidden, w, seed=5, temperature=temperature)
    assert torch.equal(got.denoiser, den)
    assert torch.equal(got.argmax, am)
    if tile >= V and budget >= N * V:  # one tile, one chunk: the reference operations themselves
        assert torch.equal(got.entropy, ent) and torch.equal(got.soft, soft)
    torch.testing.assert_close(got.entropy, ent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.soft, soft, rtol=1e-5, atol=1e-6)
    # the same number of draws: the generators continue identically (renoising comes next)
    assert torch.equal(torch.randint(0, V, (8,), generator=gen), torch.randint(0, V, (8,), generator=rgen))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("tile", [128, 7])
def test_tiled_head_matches_reference_far_below_the_row_max(tile, temperature):
    """Rows where most logits lie more than 87 below the max (exp underflows through fp32
    subnormals, which the tiled pass floors at exp(-87) for speed): the same tokens as the
    reference, entropy and soft embeddings within the same tolerance."""
    w, hidden = _weights()
    hidden = hidden * 20.0
    sched = 0.1
    z = head_logits(hidden, w, CAP) / sched
    assert ((z - z.max(-1, keepdim=True).values) < -104).float().mean() > 0.3  # the case is real
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    got, gen = _head(hidden, vs, seed=5, tile=tile, temperature=temperature, sched=sched)
    den, am, ent, soft, rgen = _reference(hidden, w, seed=5, temperature=temperature, sched=sched)
    assert torch.equal(got.denoiser, den)
    assert torch.equal(got.argmax, am)
    torch.testing.assert_close(got.entropy, ent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.soft, soft, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.randint(0, V, (8,), generator=gen), torch.randint(0, V, (8,), generator=rgen))


def test_wrong_noise_order_would_be_caught():
    """The check above can fail: column-chunked noise (not the reference's row-major order)
    gives different draws."""
    w, hidden = _weights()
    gen = torch.Generator().manual_seed(5)
    logits = head_logits(hidden, w, CAP) / 0.7
    q = torch.cat([torch.empty(N, V // 2).exponential_(1, generator=gen) for _ in range(2)], 1)
    den, *_ = _reference(hidden, w, seed=5)
    assert not torch.equal((logits - q.log()).argmax(-1), den)


def test_inverse_cdf_tiles_draw_the_right_distribution():
    """Unseeded requests: the reservoir merge of per-tile inverse-CDF draws is an exact
    categorical draw (frequencies of 40k draws over a 12-word vocabulary), over several tiles
    and over one (unseeded rows take the tile path whatever the tile count)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 4, generator=g)
    hidden = torch.randn(1, 4, generator=g).expand(40000, 4).contiguous()
    vs = VocabSlice(weight=w, start=0, size=12, vocab=12)
    got, _ = _head(hidden, vs, seed=3, tile=5, exact=False, sched=1.0)
    p = torch.softmax(head_logits(hidden[:1], w, CAP)[0], -1)
    freq = torch.bincount(got.denoiser, minlength=12).double() / 40000
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / 40000).sqrt().max() + 1e-3
    one, _ = _head(hidden, vs, seed=3, tile=12, exact=False, sched=1.0)  # one tile
    freq1 = torch.bincount(one.denoiser, minlength=12).double() / 40000
    assert (freq1 - p).abs().max() < 4 * (p * (1 - p) / 40000).sqrt().max() + 1e-3


class _Group:
    """All-gather / all-reduce between threads (one per simulated rank)."""

    def __init__(self, ranks):
        self.ranks, self.barrier, self.box = ranks, threading.Barrier(ranks), {}

    def ops(self, rank):
        def exchange(t):
            self.box[rank] = t
            self.barrier.wait()
            out = [self.box[r] for r in range(self.ranks)]
            self.barrier.wait()
            return out

        return (lambda t: torch.stack(exchange(t))), (lambda t: sum(exchange(t)))


@pytest.mark.parametrize("exact", [True, False])
def test_two_vocabulary_ranks_equal_one(exact):
    """Vocabulary split over two ranks (uneven, 2 tiles each): each rank sees only its slice and a
    few numbers per row from the other; tokens equal the one-rank head (seeded noise: equal to
    the reference sampler too), soft embeddings and entropies match."""
    w, hidden = _weights(1)
    group, results = _Group(2), {}
    split, max_size = 520, 520

    def rank(r):
        lo, hi = (0, split) if r == 0 else (split, V)
        gather, reduce = group.ops(r)
        vs = VocabSlice(weight=w[lo:hi], start=lo, size=hi - lo, vocab=V, max_size=max_size, rank=r,
                        ranks=2, gather=gather, reduce=reduce)
        results[r] = _head(hidden, vs, seed=9, tile=300, exact=exact)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    (a, ga), (b, gb) = results[0], results[1]
    assert torch.equal(a.denoiser, b.denoiser) and torch.equal(a.argmax, b.argmax)
    assert torch.equal(torch.rand(4, generator=ga), torch.rand(4, generator=gb))  # ranks in step
    one, _ = _head(hidden, VocabSlice(weight=w, start=0, size=V, vocab=V), seed=9, tile=V, exact=exact)
    assert torch.equal(a.argmax, one.argmax)
    torch.testing.assert_close(a.entropy, one.entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.soft, one.soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.soft, one.soft, rtol=1e-5, atol=1e-6)
    if exact:
        assert torch.equal(a.denoiser, one.denoiser)


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensors created inside the block (storage-level, freed via weakref)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)


def _denoise_all(hidden_rows, vs, states, tile):
    for i, st in enumerate(states):
        denoise_step(st, hidden_rows[i], vs, softcap=CAP, emb_dtype=torch.float32,
                     normalizer=torch.tensor(H ** 0.5), tile=tile)


def test_head_memory_is_flat_in_concurrent_canvases():
    """One denoising step over 1 and over 16 canvases of 256 rows, vocabulary 32768 (the
    benchmark's `medium`), tile 4096: the tensors alive at the peak grow only by the per-request
    state (soft embeddings [256, H] each), never by [rows, vocab] logits."""
    vocab, hid, rows, tile = 32768, 64, 256, 4096
    g = torch.Generator().manual_seed(0)
    w = torch.randn(vocab, hid, generator=g) * 0.1
    vs = VocabSlice(weight=w, start=0, size=vocab, vocab=vocab)
    params = DiffusionParams(max_steps=4).validate()
    peaks = {}
    for reqs in (1, 16):
        hidden = [torch.randn(rows, hid, generator=g) for _ in range(reqs)]
        states = [CanvasState(params=params, vocab_size=vocab, generator=torch.Generator().manual_seed(i),
                              exact_noise=False) for i in range(reqs)]
        for st in states:
            st.start_canvas(rows)
        with _PeakTensorMemory() as mem:
            _denoise_all(hidden, vs, states, tile)
        peaks[reqs] = mem.peak
    per_request_state = rows * hid * 4  # the fp32 soft embeddings kept for the next step
    logits_bytes = 16 * rows * vocab * 4
    print(f"\n[head memory] peak 1 canvas {peaks[1] / 2**20:.1f} MiB, 16 canvases "
          f"{peaks[16] / 2**20:.1f} MiB (untiled logits alone: {logits_bytes / 2**20:.0f} MiB)")
    assert peaks[16] - peaks[1] <= 16 * 2 * per_request_state
    assert peaks[16] < 12 * rows * tile * 4  # a handful of [rows, tile] temporaries
    # the measurement can fail: the untiled path holds full logits
    with _PeakTensorMemory() as mem:
        refine_step(states[0], head_logits(hidden[0], w, CAP))
    assert mem.peak >= rows * vocab * 4


def _states(specs, vocab, gen_seed):
    out = []
    for i, (n, thr, pins) in enumerate(specs):
        p = DiffusionParams(max_steps=5, stability_threshold=thr, entropy_bound=2.5 + i,
                            confidence_threshold=9.0 if i < 2 else 0.0).validate()
        st = CanvasState(params=p, vocab_size=vocab, generator=torch.Generator().manual_seed(gen_seed + i),
                         exact_noise=False)
        seed = torch.arange(n) + 3 if pins is not None else None
        st.start_canvas(n, seed=seed, pins=None if pins is None else torch.tensor(pins))
        out.append(st)
    return out


def test_batched_update_equals_per_request_update():
    """apply_steps over several requests (two canvas lengths, stability 0/1/2, pins, different
    bounds) equals apply_step request by request when both draw the renoising from one generator
    in the same order; three steps so the stability history is exercised."""
    from dgemma_vllm.refine.sampler import apply_step, apply_steps

    specs = [(8, 1, None), (8, 0, None), (5, 2, [0, 3]), (8, 2, None), (5, 1, None)]
    a, b = _states(specs, 50, 0), _states(specs, 50, 0)
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        rows = sum(st.length for st in a)
        den, am = torch.randint(0, 50, (rows,), generator=g), torch.randint(0, 50, (rows,), generator=g)
        ent = torch.rand(rows, generator=g) * 2
        live = [i for i, st in enumerate(a) if st.commit is None]
        if not live:
            break
        sel = torch.cat([torch.arange(sum(a[j].length for j in range(i)), sum(a[j].length for j in range(i + 1)))
                         for i in live])
        apply_steps([a[i] for i in live], den[sel], am[sel], ent[sel], ga)
        o = 0
        for i in live:
            n = b[i].length
            b[i].generator = gb
            apply_step(b[i], den[sel][o:o + n], am[sel][o:o + n], ent[sel][o:o + n])
            o += n
        for x, y in zip(a, b):
            assert torch.equal(x.canvas, y.canvas) and torch.equal(x.argmax, y.argmax)
            assert x.cur_step == y.cur_step and x.steps == y.steps
            assert (x.commit is None) == (y.commit is None)
            if x.commit is not None:
                assert torch.equal(x.commit, y.commit)
            if x.history is not None:
                assert torch.equal(x.history, y.history)
    assert any(st.commit is not None for st in a) and any(st.commit is None for st in a)


@pytest.mark.parametrize("tile", [V, 128])
def test_batched_head_matches_per_request_head(tile):
    """One head pass over three requests' rows with per-row schedule temperatures (requests at
    temperature 1, 0.7 and 0 = greedy) gives each request's argmax, entropy and soft embeddings as
    its own pass does; greedy rows draw their argmax."""
    w, hidden = _weights(2)
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    parts = [(0, 8, 0.7, 1.0), (8, 16, 0.55, 0.7), (16, 24, 0.4, 0.0)]
    sched = torch.cat([torch.full((b - a,), s) for a, b, s, _ in parts])
    temps = torch.cat([torch.full((b - a,), t) for a, b, _, t in parts])
    batched = canvas_head(hidden, vs, softcap=CAP, sched_t=sched, temperature=temps,
                          generator=torch.Generator().manual_seed(0), exact_noise=False,
                          want_soft=True, emb_dtype=torch.float32, tile=tile)
    for a, b, s, t in parts:
        one, _ = _head(hidden[a:b], vs, seed=0, tile=tile, temperature=t, exact=False, sched=s)
        assert torch.equal(batched.argmax[a:b], one.argmax)
        torch.testing.assert_close(batched.entropy[a:b], one.entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.soft[a:b], one.soft, rtol=1e-5, atol=1e-6)
    assert torch.equal(batched.denoiser[16:], batched.argmax[16:])
    assert not torch.equal(batched.denoiser[:16], batched.argmax[:16])


@pytest.mark.parametrize("tile", [V, 128])
def test_per_row_unit_temperatures_draw_as_the_scalar_temperature(tile):
    """Per-row temperatures that are all 1 (greedy rows aside) take the scalar path's draw: the
    same uniforms, the same sampled tokens as a one-request pass at temperature 1.0; greedy rows
    still get their argmax, and a row at another temperature changes the draw."""
    w, hidden = _weights(3)
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    sched = torch.full((N,), 0.6)

    def batched(temps):
        return canvas_head(hidden, vs, softcap=CAP, sched_t=sched, temperature=temps,
                           generator=torch.Generator().manual_seed(5), exact_noise=False,
                           want_soft=True, emb_dtype=torch.float32, tile=tile)

    temps = torch.cat([torch.ones(16), torch.zeros(N - 16)])
    b = batched(temps)
    one, _ = _head(hidden[:16], vs, seed=5, tile=tile, temperature=1.0, exact=False, sched=0.6)
    assert torch.equal(b.denoiser[:16], one.denoiser)
    assert not torch.equal(one.denoiser, one.argmax)  # it did sample
    assert torch.equal(b.denoiser[16:], b.argmax[16:])
    torch.testing.assert_close(b.soft[:16], one.soft, rtol=1e-5, atol=1e-6)
    temps[0] = 0.5  # one row at another temperature: the general per-row path, whose other
    c = batched(temps)  # rows (logits / (sched * 1)) draw what the scalar path drew
    assert torch.equal(c.denoiser[1:], b.denoiser[1:]) and torch.equal(c.argmax, b.argmax)


@pytest.mark.parametrize("tile", [V, 128])
def test_untied_head_uses_its_own_weight_and_embeds_with_the_embedding(tile):
    """With tie_word_embeddings=False the logits come from the head and the self-conditioning soft
    embeddings from the input embedding (reference semantics)."""
    w, hidden = _weights(3)
    emb = torch.randn(V, H, generator=torch.Generator().manual_seed(9)) * 0.3
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V, embed=emb)
    got, _ = _head(hidden, vs, seed=5, tile=tile)
    den, am, ent, _, _ = _reference(hidden, w, seed=5)
    assert torch.equal(got.denoiser, den) and torch.equal(got.argmax, am)
    want_soft = torch.softmax(head_logits(hidden, w, CAP) / 0.7, -1) @ emb
    torch.testing.assert_close(got.soft, want_soft, rtol=1e-5, atol=1e-6)


def test_cpu_tile_matmul_is_each_tiles_product():
    """The engine's CPU tile GEMMs (vLLM's CPU GEMM dispatch, weights pre-packed per tile) give
    hidden @ weight[c0:c1].T (logits) and probs @ weight[c0:c1] (soft embeddings) for every tile,
    the last one narrower, within fp32 rounding; and the tiled head run with them keeps the
    untiled argmax."""
    from dgemma_vllm.engine import vllm_api

    w, hidden = _weights(4)
    mm = vllm_api.cpu_head_tile_matmul(w)
    sm = vllm_api.cpu_head_soft_matmul(w)
    probs = torch.rand(N, V, generator=torch.Generator().manual_seed(1))
    for c0, c1 in [(0, 128), (128, 256), (896, V)]:
        torch.testing.assert_close(mm(hidden, c0, c1), hidden @ w[c0:c1].T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sm(probs[:, c0:c1], c0, c1), probs[:, c0:c1] @ w[c0:c1],
                                   rtol=1e-5, atol=1e-5)
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V, tile_matmul=mm, soft_matmul=sm)
    out, _ = _head(hidden, vs, seed=0, tile=128, temperature=0.0)
    _, am, ent, soft, _ = _reference(hidden, w, seed=0)
    assert torch.equal(out.argmax, am) and torch.equal(out.denoiser, am)
    torch.testing.assert_close(out.entropy, ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.soft, soft, rtol=1e-5, atol=1e-5)


def test_tile_stats_is_the_eager_passes_and_compiles_to_the_same_tokens():
    """``tile_stats`` (the fused form of one unseeded unit-temperature tile) computes exactly what
    the eager in-place passes compute; compiled (the engine's CPU default: ATen's softcap, then
    the rest through inductor) it gives the same processed logits bit for bit, the same argmax
    and inverse-CDF draws, the rest within fp32 rounding; and a whole head run with it draws the
    same tokens as the eager head from the same generator."""
    from dgemma_vllm.refine.head import EXP_FLOOR, compiled_tile_stats, softcap_, tile_stats

    w, hidden = _weights(3)
    hidden = hidden * 8.0  # some rows reach below the exp floor
    raw = hidden @ w.T
    sched = torch.full((N, 1), 0.45)
    z = softcap_(raw.clone(), CAP).div_(sched)
    mz, iz = z.max(-1)
    zm = (z - mz[:, None]).clamp_(min=EXP_FLOOR)
    assert (zm == EXP_FLOOR).any()
    e = zm.exp()
    eager = (z, mz, iz, e, e.sum(-1), (e * zm).sum(-1), e.cumsum(-1))
    for a, b in zip(tile_stats(raw.clone(), CAP, sched), eager):
        assert torch.equal(a, b)
    fused = compiled_tile_stats(CAP)
    assert fused is not None, "torch.compile failed on this machine (see the warning)"
    got = fused(raw.clone(), CAP, sched)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[2], eager[2])
    from dgemma_vllm.refine.head import softcap_fast_  # unseeded rows' softcap, the same split

    assert torch.equal(fused(raw.clone(), CAP, sched, capping=softcap_fast_)[0],
                       softcap_fast_(raw.clone(), CAP).div_(sched))
    for a, b in zip(got, eager):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30)
    u = torch.rand(N, 1, generator=torch.Generator().manual_seed(2)) * eager[6][:, -1:]
    assert torch.equal(torch.searchsorted(fused(raw.clone(), CAP, sched)[6], u),
                      torch.searchsorted(eager[6], u))

    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    vs_fused = VocabSlice(weight=w, start=0, size=V, vocab=V, tile_stats=fused)
    for tile in (128, 7):
        runs = []
        for v in (vs, vs_fused):
            gen = torch.Generator().manual_seed(9)
            runs.append(canvas_head(hidden, v, softcap=CAP, sched_t=sched[:, 0], temperature=torch.ones(N),
                                    generator=gen, exact_noise=False, want_soft=True,
                                    emb_dtype=torch.float32, tile=tile))
        a, b = runs
        assert torch.equal(a.denoiser, b.denoiser) and torch.equal(a.argmax, b.argmax)
        torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.soft, b.soft, rtol=1e-5, atol=1e-6)


def test_fast_softcap_is_the_softcap_within_its_stated_bound_and_only_for_unseeded_rows():
    """``softcap_fast_`` (2c sigmoid(2x / c) - c, the unseeded rows' softcap) is ``softcap_``
    within c * 2**-21 over the whole range (small, large, saturating and non-finite-free
    logits), and in fp32 like it; a seeded head still takes the reference's tanh (the seeded
    tests above hold it to the reference's bits), an unseeded head the fast form (its
    processed logits differ from the tanh ones in the last bits, which a forgotten switch
    would not show)."""
    from dgemma_vllm.refine.head import softcap_, softcap_fast_

    for cap in (30.0, 15.0, 1.0):
        x = torch.cat([torch.linspace(-40 * cap, 40 * cap, 200001), torch.randn(100000) * cap,
                       torch.randn(100000) * 1e-3, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
        want = softcap_(x.clone(), cap)
        got = softcap_fast_(x.clone(), cap)
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() <= cap * 2.0 ** -21, cap
        assert got.abs().max().item() <= cap
    half = softcap_fast_(torch.randn(8, 16).to(torch.bfloat16), 30.0)
    assert half.dtype == torch.float32

    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    w, hidden = _weights(4)
    vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
    for exact, want_op, other in ((True, "tanh_", "sigmoid_"), (False, "sigmoid_", "tanh_")):
        calls.clear()
        with Spy():
            _head(hidden, vs, seed=1, tile=128, exact=exact)
        assert want_op in calls and other not in calls, (exact, sorted(set(calls)))


def test_head_compile_falls_back_to_the_eager_passes(monkeypatch, caplog):
    """Where torch.compile cannot run (e.g. no C++ compiler), the engine is told None with a
    warning naming the option, and keeps the eager passes."""
    from dgemma_vllm.refine import head

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(head.torch, "compile", broken)
    with caplog.at_level("WARNING", logger="dgemma_vllm"):
        assert head.compiled_tile_stats(CAP) is None
    assert "dgemma_head_compile" in caplog.text and "no compiler here" in caplog.text


def test_profile_head_runs_the_largest_chunks():
    """The head's profiling pass (run inside vLLM's memory profile on a GPU) runs both paths at
    their chunk sizes: the unseeded budget over the tile, the seeded noise rows of full width."""
    from dgemma_vllm.refine.head import chunk_rows, profile_head

    V, H = 4096, 32
    vs = VocabSlice(weight=torch.randn(V, H) * 0.1, start=0, size=V, vocab=V)
    rows, seeded = profile_head(vs, H, dtype=torch.float32, softcap=CAP, emb_dtype=torch.float32,
                                tile=512, budget=1 << 16, seeded_budget=1 << 16)
    assert (rows, seeded) == (128, 16)
    assert chunk_rows(vs, 512, 1 << 16, exact_noise=False) == rows
