"""Server-level options given at start-up with --hf-overrides, one engine for all three: the
symmetric sliding window for canvas rows (against its own oracle), sampler defaults
(diffusion_max_steps) and the seeded-noise source (``dgemma_seeded_noise="device"``).


``--hf-overrides '{"dgemma_canvas_window": "symmetric"}'`` makes sliding layers in canvas mode
use ``|q - k| <= W - 1`` (HF's flash-attention path, upstream vLLM). Its oracle is the
reference decoder with that mask passed explicitly; where prompts exceed the window it differs
from the default (eager/sdpa) rule, which the test also shows.
"""

from __future__ import annotations

import pytest
import torch

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.engine.stats import request_stats
from dgemma_vllm.checkpoints.factory import get_geometry

REL_TOL = 1e-4


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("capture_sym")


@pytest.fixture(scope="module")
def llm(tiny_ckpt, capture_dir):
    # three start-up options, each checked below: the symmetric window, a sampler default, and
    # the seeded-noise source (its test does not depend on the window)
    engine = start_llm(tiny_ckpt, capture_dir=str(capture_dir), max_model_len=256,
                       hf_overrides={"dgemma_canvas_window": "symmetric", "diffusion_max_steps": 2,
                                     "dgemma_seeded_noise": "device"})
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def captured(llm, capture_dir):
    from vllm import SamplingParams

    cap = capture_dir
    prompt = [(7 * i) % 400 + 5 for i in range(40)]  # longer than the window (16)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2,
                        [SamplingParams(max_tokens=48, seed=4, ignore_eos=True,
                                        extra_args={"diffusion_max_steps": 3}),
                         SamplingParams(max_tokens=48, ignore_eos=True)], use_tqdm=False)
    stats = request_stats(llm)
    rid = outs[0].request_id
    steps = torch.load(next(f for f in cap.glob("*.pt") if f.stem.rsplit("-", 1)[0] == rid))
    return prompt, list(outs[0].outputs[0].token_ids), steps, stats[outs[1].request_id]


def test_symmetric_window_matches_its_oracle_and_differs_from_default(captured, tiny_ckpt):
    prompt, committed, steps, _ = captured
    model = ref.load_reference(str(tiny_ckpt))
    c = get_geometry("tiny").canvas_length
    cache = ref.new_cache(model)
    ref.encode(model, cache, prompt)
    encoded = len(prompt)
    worst_sym, max_default = 0.0, 0.0
    for st in steps:
        L = st["prefix_len"]
        while encoded < L:
            ref.encode(model, cache, committed[encoded - len(prompt): encoded - len(prompt) + c])
            encoded += c
        args = (model, cache, st["canvas"].tolist(), st["sc_logits"])
        sym = ref.canvas_logits(*args, prefix_len=L, symmetric_window=True)
        default = ref.canvas_logits(*args, prefix_len=L)
        worst_sym = max(worst_sym, rel_err(st["logits"], sym))
        max_default = max(max_default, rel_err(st["logits"], default))
    assert len(steps) == 9
    assert worst_sym <= REL_TOL
    assert max_default > 10 * REL_TOL


def test_server_level_sampler_default_takes_effect(captured):
    stats = captured[3]  # request without knobs on a server started with diffusion_max_steps=2
    assert (stats["canvases"], stats["denoising_steps"]) == (3, 6)


def test_seeded_noise_on_the_device_is_reproducible_and_host_noise_is_the_reference(llm, tiny_ckpt):
    """``dgemma_seeded_noise="device"`` (the GPU default; here the "device" is the CPU, so the
    generator is a second CPU generator): seeded requests are reproducible per seed, alone or in
    a batch, and their draws are not the CPU reference's, which the host option reproduces."""
    from vllm import SamplingParams

    prompt = [9, 30, 41, 77, 120, 7, 8]  # shorter than the window: the window rule plays no part
    sp = lambda seed: SamplingParams(max_tokens=32, seed=seed, ignore_eos=True,  # noqa: E731
                                     extra_args={"diffusion_max_steps": 3})

    def run(seeds, prompts=None):
        outs = llm.generate([{"prompt_token_ids": p} for p in (prompts or [prompt] * len(seeds))],
                            [sp(s) for s in seeds], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    solo = run([5])[0]
    again = run([5])[0]
    batched = run([5, 6, 7], [prompt, [11, 12, 13], [40] * 20])[0]
    assert solo == again == batched and len(solo) == 32
    model = ref.load_reference(str(tiny_ckpt))
    host = ref.generate(model, prompt, 5, max_new_tokens=32, max_denoising_steps=3)
    assert solo != host  # not the reference's draws (the default host noise equals them:
    # tests/test_parity.py, tests/test_engine.py)


def _isas():
    """The CPU attention ISAs vLLM can pick on this machine (cpu_attn._get_attn_isa)."""
    import platform

    out = []
    if platform.machine() in ("x86_64", "AMD64"):
        out += [("vec", torch.float32), ("vec", torch.bfloat16), ("vec16", torch.float32),
                ("vec16", torch.bfloat16)]
        if torch.cpu._is_amx_tile_supported():
            out.append(("amx", torch.bfloat16))
    return out


@pytest.mark.parametrize("isa,dtype", _isas(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("block_size,head_dim", [(32, 32), (128, 64), (128, 256)])
def test_kv_layout_probe_reads_back_what_vllm_wrote(isa, dtype, block_size, head_dim):
    """For every kernel layout vLLM can pick here (AMX with bf16 where the CPU has it), K and V
    written by vLLM's own cache op at scattered slots are read back exactly by the exact canvas
    window's gather, through the layout the start-up probe found."""
    from dgemma_vllm.engine import attention as A
    from dgemma_vllm.engine.plugin import request_amx_permission

    request_amx_permission()
    nb, h, bs, d = 5, 2, block_size, head_dim
    kv = torch.zeros(nb, h, bs, 2 * d, dtype=dtype)
    kc, vc = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(nb * bs, generator=g)[: 3 * bs // 2]
    k = torch.randn(len(slots), h, d, generator=g).to(dtype)
    v = torch.randn(len(slots), h, d, generator=g).to(dtype)
    A._ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                      kv_cache_dtype="auto")
    k_pos, v_pos = A.kv_layout(isa, dtype, bs, d)
    assert torch.equal(A._gather(kc, slots, k_pos), k)
    assert torch.equal(A._gather(vc, slots, v_pos), v)
    # the batched recompute's offsets into the whole layer cache: K then V, the same values; on
    # a contiguous cache and on a strided view as vLLM allocates them (one buffer holding three
    # layers' blocks side by side, this layer the middle one)
    shared = torch.zeros(nb, 3, h, bs, 2 * d, dtype=dtype)
    layer = shared[:, 1]
    lk, lv = layer.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    A._ops.cpu_attn_reshape_and_cache(k, v, lk, lv, slots, isa, k_scale=1.0, v_scale=1.0,
                                      kv_cache_dtype="auto")
    for cache in (kv, layer):
        flat = A.flat_cache(cache)
        assert flat is not None
        index = A.kv_element_index(slots, k_pos, v_pos, h, *cache.stride()[:2])
        kv_read = flat.index_select(0, index).view(2, len(slots), h, d)
        assert torch.equal(kv_read[0], k) and torch.equal(kv_read[1], v)
    assert not layer.is_contiguous()  # the case the engine meets
    assert A.flat_cache(kv.transpose(2, 3)) is None  # halves not contiguous: the gathers instead


def test_kv_layout_probe_refuses_an_unknown_layout(monkeypatch):
    """A cache op whose layout is not one permutation per block and head stops the probe (at
    engine start) with a message naming the option to use instead."""
    from dgemma_vllm.engine import attention as A

    def scrambled(k, v, kc, vc, slots, isa, **kw):  # every token of a block in one place
        kc[:, :, 0, :] = k[: kc.shape[0]].to(kc.dtype)
        vc[:, :, 0, :] = v[: vc.shape[0]].to(vc.dtype)

    monkeypatch.setattr(A._ops, "cpu_attn_reshape_and_cache", scrambled)
    monkeypatch.setattr(A, "_layout_cache", {})
    with pytest.raises(A.KVLayoutError, match="dgemma_canvas_window='symmetric'"):
        A.kv_layout("vec", torch.float32, 32, 32)


def test_canvas_window_plan_gathers_each_canvas_prefix_window():
    """The batched recompute's plan (one per step and KV-cache group): canvases grouped by
    length, each one's prefix keys ``[max(0, L - W + 1), L)`` as paged-cache slots (the same slots
    the per-canvas path reads), padding masked out, causal sequences and canvases that fit in
    the window left out."""
    from types import SimpleNamespace

    from dgemma_vllm.engine import attention as A

    w, bs = 8, 4
    # sequences: canvas (prefix 10, c 4), causal (prefix chunk), canvas fitting the window
    # (prefix 2, c 4), canvas (prefix 5, c 4: 9 > 8), canvas (prefix 20, c 3: the last, shorter)
    q_lens = [4, 6, 4, 4, 3]
    prefixes = [10, 0, 2, 5, 20]
    flags = [0, 1, 0, 0, 0]
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    seq = [p + n for p, n in zip(prefixes, q_lens)]
    g = torch.Generator().manual_seed(0)
    bt = torch.stack([torch.randperm(40, generator=g)[:8] for _ in q_lens]).int()
    md = SimpleNamespace(dynamic_causal=torch.tensor(flags, dtype=torch.int32),
                         query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                         seq_lens=torch.tensor(seq, dtype=torch.int32), block_table=bt)
    plan = A.canvas_window_plan(md, w, bs)
    by_c = {c: (rows, slots, bias) for c, rows, slots, bias in plan}
    assert sorted(by_c) == [3, 4]
    rows, slots, bias = by_c[4]  # sequences 0 and 3 (2 fits the window, 1 is causal)
    assert rows.tolist() == list(range(qsl[0], qsl[1])) + list(range(qsl[3], qsl[4]))
    n = bias.shape[-1] - 4
    assert n == w - 1 and bias.shape == (2, 1, n + 4) and bias.dtype == torch.float32
    for j, i in enumerate([0, 3]):
        lo = max(0, prefixes[i] - w + 1)
        want = A._kv_slots(SimpleNamespace(block_table=bt), i, torch.arange(lo, prefixes[i]), bs)
        cnt = prefixes[i] - lo
        assert bias[j, 0, :n].tolist() == [0.0] * cnt + [float("-inf")] * (n - cnt)
        assert (bias[j, 0, n:] == 0).all()
        assert slots.view(2, n)[j, :cnt].tolist() == want.tolist()
    rows, slots, bias = by_c[3]
    # one canvas (adjacent to nothing): its rows as a slice, read as views by the recompute
    assert rows == slice(qsl[4], qsl[5]) and (bias == 0).all() and bias.shape[-1] == 7 + 3
    # a batch of canvases alone, adjacent in the batch: one slice over all their rows
    md2 = SimpleNamespace(dynamic_causal=torch.zeros(2, dtype=torch.int32),
                          query_start_loc=torch.tensor([0, 4, 8], dtype=torch.int32),
                          seq_lens=torch.tensor([14, 9], dtype=torch.int32), block_table=bt[:2])
    (c2, rows2, slots2, _), = A.canvas_window_plan(md2, w, bs)
    assert c2 == 4 and rows2 == slice(0, 8) and slots2.numel() == 2 * (w - 1)
    assert A.canvas_window_plan(SimpleNamespace(**{**vars(md), "dynamic_causal": torch.ones(5, dtype=torch.int32)}), w, bs) is None


def test_window_covers_all_only_when_every_row_is_recomputed():
    """The impl skips vLLM's kernel on a sliding layer only when the exact window recomputes every
    query row of the step (a batch of canvases alone, each past its window): not with a causal
    row, a canvas within its window, or an image in the step."""
    from types import SimpleNamespace

    from dgemma_vllm.engine import attention as A

    w, bs = 8, 4
    bt = torch.arange(16, dtype=torch.int32).view(2, 8)

    def md(flags, q_lens, prefixes, images=None):
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        m = SimpleNamespace(dynamic_causal=torch.tensor(flags, dtype=torch.int32),
                            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                            seq_lens=torch.tensor([p + n for p, n in zip(prefixes, q_lens)],
                                                  dtype=torch.int32),
                            block_table=bt[:len(flags)], num_actual_tokens=qsl[-1],
                            dg_images=images)
        m.dg_canvas_window = A.canvas_window_plan(m, w, bs)
        return m

    assert A.window_covers_all(md([0, 0], [4, 4], [10, 6]))  # both past the window
    assert not A.window_covers_all(md([0, 1], [4, 4], [10, 6]))  # a causal row
    assert not A.window_covers_all(md([0, 0], [4, 4], [10, 2]))  # 2 + 4 fits the window
    assert not A.window_covers_all(md([0, 0], [4, 4], [10, 6], images=[(0, 1, 2, 3, 0)]))
    padded = md([0, 0], [4, 4], [10, 6])
    padded.num_actual_tokens += 1  # a row the plan does not cover
    assert not A.window_covers_all(padded)


@pytest.mark.parametrize("b,c,heads,kv_heads,n,d", [(1, 32, 4, 2, 31, 32), (16, 32, 4, 2, 31, 32),
                                                    (3, 12, 4, 1, 7, 64), (2, 5, 8, 8, 9, 32)])
def test_window_attention_equals_sdpa_with_gqa_and_a_key_mask(b, c, heads, kv_heads, n, d):
    """The recompute's hand-batched attention against ATen's SDPA (enable_gqa, boolean key
    mask) within 1e-5 absolute on unit-normal inputs (fp32 rounding: seen 3.6e-7); the same
    check with the KV heads read in the other order (query head i on KV head i % kv_heads,
    a layout slip) fails when there are two or more KV heads of more than one query head."""
    from dgemma_vllm.engine.attention import window_attention
    g = torch.Generator().manual_seed(b * 1000 + c)
    q = torch.randn(b, c, heads, d, generator=g)
    k = torch.randn(b, n + c, kv_heads, d, generator=g)
    v = torch.randn(b, n + c, kv_heads, d, generator=g)
    keep = torch.rand(b, n + c, generator=g) > 0.3
    keep[:, n:] = True  # a canvas always sees itself
    bias = torch.zeros(b, 1, n + c).masked_fill(~keep[:, None], float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=keep[:, None, None], scale=d ** -0.5, enable_gqa=True).transpose(1, 2)
    got = window_attention(q, k, v, bias, d ** -0.5)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5
    if 1 < kv_heads < heads:
        slip = torch.arange(heads) % kv_heads
        wrong = sdpa(q.transpose(1, 2), k[:, :, slip].transpose(1, 2), v[:, :, slip].transpose(1, 2),
                     attn_mask=keep[:, None, None], scale=d ** -0.5).transpose(1, 2)
        assert float((got - wrong).abs().max()) > 1e-2
