"""The CUDA path, checked on CPU by construction (no GPU here): a non-CPU platform stand-in for
imports and configuration, fake CUDA tensors for device placement.

- imports: with vLLM's platform answering "not CPU", registering the plugin and importing its
  worker and model modules loads none of vLLM's CPU-only modules (the CPU worker's shm module
  replaces torch.cuda.Event / Stream / current_stream, torch.accelerator.get_memory_info and
  Tensor.pin_memory; the CPU attention backend) and leaves those torch functions untouched;
- the config hook refuses, with a message naming the setting, what cannot run the canvas on GPU;
- the self-conditioning input of a batch mixing new and older canvases is built on the model's
  device (fake CUDA tensors: a host tensor in the concatenation raises a device mismatch).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from conftest import hook_config as _hook_config

import pytest
import torch

NOT_CPU_PLATFORM = '''
import vllm.platforms as P
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import PlatformEnum


class NotCpu(CpuPlatform):
    """A CUDA-like stand-in: not the CPU (is_cuda stays False: the CPU build has no CUDA ops)."""
    _enum = PlatformEnum.OOT
    device_name = device_type = "cuda"

    def is_cpu(self):
        return False


P._current_platform = NotCpu()
'''

IMPORT_CHECK = NOT_CPU_PLATFORM + '''
import sys, torch
watched = (torch.cuda.Event, torch.cuda.Stream, torch.cuda.current_stream,
           torch.accelerator.get_memory_info, torch.accelerator.synchronize, torch.Tensor.pin_memory)
from dgemma_vllm.engine import plugin
plugin.register()
import dgemma_vllm.engine.worker as W
import dgemma_vllm.model.dgemma  # noqa: F401
after = (torch.cuda.Event, torch.cuda.Stream, torch.cuda.current_stream,
         torch.accelerator.get_memory_info, torch.accelerator.synchronize, torch.Tensor.pin_memory)
loaded = [m for m in ("vllm.v1.worker.cpu.shm", "vllm.v1.worker.cpu_worker",
                      "vllm.v1.attention.backends.cpu_attn", "dgemma_vllm.engine.attention")
          if m in sys.modules]
print("LOADED", loaded)
print("UNTOUCHED", all(a is b for a, b in zip(watched, after)))
print("CLASSES", hasattr(W, "DGemmaGPUWorker"), hasattr(W, "DGemmaCPUWorker"))
'''


def test_not_cpu_platform_imports_nothing_cpu_specific():
    r = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "LOADED []" in out, out
    assert "UNTOUCHED True" in out, out
    assert "CLASSES True False" in out, out


@pytest.fixture
def not_cpu(monkeypatch):
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform

    class NotCpu(CpuPlatform):
        def is_cpu(self):
            return False

    monkeypatch.setattr(P, "_current_platform", NotCpu())


def hook_config(window="symmetric", **kw):
    """conftest.hook_config with the symmetric window unless a test asks for the reference."""
    return _hook_config(window=window, **kw)


def _hook(cfg):
    from dgemma_vllm.engine.config import DGemmaConfigHook

    DGemmaConfigHook.verify_and_update_config(cfg)
    return cfg


def test_gpu_defaults_triton_and_the_gpu_worker(not_cpu):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    cfg = _hook(hook_config())
    assert cfg.attention_config.backend == B.TRITON_ATTN
    assert cfg.parallel_config.worker_cls.endswith("DGemmaGPUWorker")
    assert cfg.model_config.hf_config.dgemma_fuse_commit is True


def _refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        _hook(cfg)


def test_gpu_serves_the_reference_window_on_triton_and_refuses_it_elsewhere(not_cpu):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    cfg = _hook(hook_config(window="reference"))  # the default: Triton's prefix ranges
    assert cfg.attention_config.backend == B.TRITON_ATTN
    _refused(hook_config(window="reference", backend=B.FLASH_ATTN, fa_version=4),
             "dgemma_canvas_window='reference'.*TRITON_ATTN")


def test_gpu_refuses_flashinfer_and_flash_attention_without_fa4(not_cpu):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    _refused(hook_config(backend=B.FLASHINFER), "FLASHINFER")
    _refused(hook_config(backend=B.FLASH_ATTN, fa_version=3), "FLASH_ATTN needs FlashAttention 4")
    # no FlashAttention build here: FA4 cannot be chosen for the user
    _refused(hook_config(backend=B.FLASH_ATTN), "FLASH_ATTN needs FlashAttention 4")
    _refused(hook_config(backend=B.FLEX_ATTENTION), "FLEX_ATTENTION")
    cfg = _hook(hook_config(backend=B.FLASH_ATTN, fa_version=4))  # FA4: served, fusion off
    assert cfg.model_config.hf_config.dgemma_fuse_commit is False


def test_gpu_refuses_model_runner_v2_and_dual_batch_overlap(not_cpu):
    _refused(hook_config(v2=True), "model runner V2")
    _refused(hook_config(dbo=True), "dual-batch overlap")


def test_cpu_hook_is_unchanged_by_the_gpu_checks():
    cfg = _hook(hook_config(window="reference", backend=None))  # the real (CPU) platform
    assert cfg.attention_config.backend is None
    assert cfg.parallel_config.worker_cls.endswith("DGemmaCPUWorker")


def test_quantized_head_or_embedding_is_refused():
    from dgemma_vllm.model.dgemma import refuse_quantized_head

    class Fp8LinearMethod:  # any quantization method of vLLM's
        pass

    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    plain = SimpleNamespace(quant_method=UnquantizedEmbeddingMethod())
    refuse_quantized_head(plain, plain)
    with pytest.raises(ValueError, match="quantized lm_head"):
        refuse_quantized_head(SimpleNamespace(quant_method=Fp8LinearMethod()), plain)
    with pytest.raises(ValueError, match="quantized embed_tokens"):
        refuse_quantized_head(plain, SimpleNamespace(quant_method=Fp8LinearMethod()))


def _compile_cfg(eager=False, lora=None, mode=None):
    return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager), lora_config=lora,
                           compilation_config=SimpleNamespace(cudagraph_mode=mode))


def test_compiled_by_default_piecewise_graphs_on_gpu_and_lora_eager():
    """The forward compiles unless --enforce-eager (CPU: as asked; GPU: piecewise CUDA graphs as
    the default, full graphs refused naming cudagraph_mode); LoRA runs eagerly on both."""
    from vllm.config import CUDAGraphMode

    from dgemma_vllm.engine.config import compile_checks

    cpu = _compile_cfg()
    compile_checks(cpu, cpu=True)
    assert cpu.model_config.enforce_eager is False and cpu.compilation_config.cudagraph_mode is None
    gpu = _compile_cfg()
    compile_checks(gpu, cpu=False)
    assert gpu.model_config.enforce_eager is False
    assert gpu.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    for ok in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
        cfg = _compile_cfg(mode=ok)
        compile_checks(cfg, cpu=False)
        assert cfg.compilation_config.cudagraph_mode == ok
    for full in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY,
                 CUDAGraphMode.FULL_AND_PIECEWISE):
        with pytest.raises(ValueError, match=f"cudagraph_mode={full.name}"):
            compile_checks(_compile_cfg(mode=full), cpu=False)
    compile_checks(_compile_cfg(eager=True, mode=CUDAGraphMode.FULL), cpu=False)  # eager: no graphs
    for on_cpu in (True, False):
        lora = _compile_cfg(lora=object(), mode=CUDAGraphMode.FULL)
        compile_checks(lora, cpu=on_cpu)
        assert lora.model_config.enforce_eager is True


def test_self_conditioning_input_stays_on_the_model_device():
    """A batch with a canvas on its first step (no soft embeddings yet) next to older canvases:
    the zeros are made on the device of the others (fake CUDA tensors raise on a host tensor in
    the concatenation, which the code of the review did)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dgemma_vllm.engine.runner import assemble_soft

    with FakeTensorMode(allow_non_fake_inputs=True):
        older = torch.empty(4, 8, device="cuda")
        cuda = older.device  # cuda:0, as the runner's logits_indices.device
        soft = assemble_soft([(None, 3), (older, 4), (None, 2)], 8, cuda)
        assert soft.device.type == "cuda" and tuple(soft.shape) == (9, 8)
        assert assemble_soft([(None, 3)], 8, cuda) is None
        # the review's code: zeros without a device next to GPU embeddings
        with pytest.raises(Exception, match="[Dd]evice"):
            torch.cat([torch.zeros(3, 8), older])


# ----------------------------------------------------------------------------- Triton's mask, ported
def triton_kv_mask(q_abs, k_pos, seq_len, window, causal, ranges, clamp):
    """Plain-torch port of vLLM 0.32's ``compute_kv_seq_mask``
    (v1/attention/ops/triton_attention_helpers.py:316-420) for one sequence, without chunked
    attention and R-SWA: ``causal`` is the sequence's flag (the per-sequence variant; True is also
    the plain causal one), ``window`` the kernel's SLIDING_WINDOW (``1 + window_size[0]``: W on
    sliding decoder layers, 0 on full ones), ``ranges`` its inclusive (start, end) prefix ranges,
    ``clamp`` the layer's mm_prefix_clamp_sliding_window. [queries, keys] bool."""
    q, k = q_abs[:, None], k_pos[None, :]
    mask = (k <= q) if causal else (k < seq_len)
    if window > 0:
        left = (q - k) < window
        mask = mask & (left if causal else left & ((k - q) < window))
    for start, end in ranges:
        mm = (q >= start) & (q <= end) & (k >= start) & (k <= end) & (start < end)
        if clamp and window > 0:
            mm = mm & ((q - k) < window)
        mask = mask | mm
    return mask


def reference_keys(L, C, window, sliding):
    """The reference's keys for every canvas query (semantics sheet B: DynamicCache keeps the last
    W - 1 cached tokens on sliding layers; the canvas sees all of itself)."""
    keys = torch.zeros(C, L + C, dtype=torch.bool)
    keys[:, (max(0, L - window + 1) if sliding else 0):] = True
    return keys


def _mask_of(cm, i, window, clamp=False):
    qsl, seq = cm.query_start_loc_cpu.tolist(), cm.seq_lens.tolist()
    n = qsl[i + 1] - qsl[i]
    q_abs = torch.arange(seq[i] - n, seq[i])
    causal = bool(cm.causal) if not isinstance(cm.causal, torch.Tensor) else bool(cm.causal[i])
    ranges = (cm.mm_req_doc_ranges or {}).get(i, [])
    return triton_kv_mask(q_abs, torch.arange(seq[i]), seq[i], window, causal, ranges, clamp)


def _batch(lens, causal_flags, ranges=None):
    """Metadata of sequences (context before, rows) with the runner's causal flags."""
    from dgemma_vllm.engine import vllm_api as V

    qsl = [0]
    for _, n in lens:
        qsl.append(qsl[-1] + n)
    qsl = torch.tensor(qsl, dtype=torch.int32)
    seq = torch.tensor([b + n for b, n in lens], dtype=torch.int32)
    return V.CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=len(lens),
        num_actual_tokens=int(qsl[-1]), max_query_len=max(n for _, n in lens),
        max_seq_len=int(seq.max()), block_table_tensor=torch.zeros(len(lens), 4, dtype=torch.int32),
        slot_mapping=torch.arange(int(qsl[-1])), causal=torch.tensor(causal_flags, dtype=torch.int32),
        seq_lens_cpu_upper_bound=seq.clone(), mm_req_doc_ranges=ranges)


@pytest.mark.parametrize("W,C", [(16, 16), (32, 12), (1024, 256)])
def test_reference_window_through_triton_ranges_equals_the_oracle(W, C):
    """Canvas rows of every prefix regime (shorter than, equal to, longer than the window, far
    past it), a prefill chunk and a fused commit in one batch: after the runner's
    reference_window_metadata, the ported Triton mask gives each canvas query exactly the
    reference's keys on sliding and full layers, and leaves causal rows causal (and windowed);
    the port of the symmetric rule (flag 0, no ranges) differs from the oracle past the window."""
    from dgemma_vllm.engine.runner import reference_window_metadata, split_fused

    lens_before = [1, W - 1, W, W + 5, 3 * W + 7]
    seqs = [(b, C) for b in lens_before] + [(10, 7)]  # canvases, then a prefill chunk
    flags = [0] * len(lens_before) + [1]
    seqs.append((40, C + C))  # a fused commit: C committed rows then the next canvas
    flags.append(0)
    cm = split_fused(_batch(seqs, flags), torch.tensor(flags, dtype=torch.int32),
                     {len(seqs) - 1: C})
    out = reference_window_metadata(cm, W)
    assert out.causal is True  # no per-sequence causal tensor on the Triton path
    # the runner passes the sequences' flags from the host (no device read on a GPU): the same
    from dgemma_vllm.engine.plan import RowView, plan_step
    from dgemma_vllm.engine.runner import sequence_flags

    views = [RowView(f"c{i}", drafts=C, canvas=C) for i in range(len(lens_before))]
    views += [RowView("p", drafts=0), RowView("f", drafts=2 * C, canvas=C, commit=C, after_commit=C)]
    host = sequence_flags(plan_step(views))
    assert host == cm.causal.tolist()  # split_fused's sequence flags
    assert reference_window_metadata(cm, W, host).mm_req_doc_ranges == out.mm_req_doc_ranges
    canvases = list(range(len(lens_before))) + [out.num_reqs - 1]
    for i in range(out.num_reqs):
        seq, n = int(out.seq_lens[i]), int(out.query_start_loc_cpu[i + 1] - out.query_start_loc_cpu[i])
        for window, sliding in ((W, True), (0, False)):
            got = _mask_of(out, i, window)
            if i in canvases:
                assert torch.equal(got, reference_keys(seq - n, n, W, sliding)), (i, sliding)
            else:  # prefill chunk / committed rows: causal, windowed on sliding layers
                q = torch.arange(seq - n, seq)[:, None]
                k = torch.arange(seq)[None, :]
                want = (k <= q) & (((q - k) < W) if sliding else True)
                assert torch.equal(got, want), (i, sliding)
    # the port can fail: the symmetric rule (what Triton does with the causal tensor alone)
    past = [i for i, b in enumerate(lens_before) if b + C > W]
    diffs = [not torch.equal(_mask_of(cm, i, W), reference_keys(lens_before[i], C, W, True))
             for i in past]
    assert past and all(diffs)


def test_reference_window_keeps_image_ranges():
    """An image span of the prompt stays a bidirectional range next to the canvas's range."""
    from dgemma_vllm.engine.runner import reference_window_metadata

    cm = _batch([(50, 8)], [0], ranges={0: [(5, 20)]})
    out = reference_window_metadata(cm, 16)
    assert out.mm_req_doc_ranges == {0: [(5, 20), (50 - 16 + 1, 57)]}


def reference_image_masks(model, n: int, image: tuple[int, int]):
    """The reference's prefill masks ``{layer type: [n, n] bool}`` for a prompt of `n` tokens
    whose tokens ``image[0]..image[1]`` (inclusive) are one image (transformers' own mask code,
    as ``generate`` calls it with ``mm_token_type_ids``)."""
    mm = torch.zeros(1, n, dtype=torch.long)
    mm[0, image[0]:image[1] + 1] = 1
    masks = model.model.encoder.create_masks_for_generate(
        config=model.config, inputs_embeds=torch.empty(1, n, 0), attention_mask=None,
        past_key_values=None, position_ids=torch.arange(n)[None], mm_token_type_ids=mm)
    out = {}
    for kind, m in masks.items():
        m = m[0, 0]
        out[kind] = m if m.dtype == torch.bool else m == 0
    return out


def test_image_ranges_through_triton_equal_the_reference_mask(tiny_ckpt):
    """GPU: image tokens reach Triton as vLLM's multimodal-prefix ranges (the runner keeps ranges
    longer than the window: the model's ``mm_prefix_clamp_sliding_window``), in layers built
    unclamped. The ported kernel mask of a prefill with an image 3x the window then equals the
    reference's mask on sliding and full layers (DiffusionGemma: bidirectional inside the image on
    every layer); Gemma 4's clamped ranges, or none on full layers, differ from it."""
    from dgemma_vllm import reference as ref
    from dgemma_vllm.model.dgemma import DGemmaForBlockDiffusion

    assert DGemmaForBlockDiffusion.mm_prefix_clamp_sliding_window is True
    model = ref.load_reference(str(tiny_ckpt))
    W = model.config.get_text_config().sliding_window
    n, image = 80, (6, 6 + 3 * W - 1)
    oracle = reference_image_masks(model, n, image)
    pos = torch.arange(n)
    for kind, window in (("sliding_attention", W), ("full_attention", 0)):
        got = triton_kv_mask(pos, pos, n, window, True, [image], clamp=False)
        assert torch.equal(got, oracle[kind]), kind
    clamped = triton_kv_mask(pos, pos, n, W, True, [image], clamp=True)
    assert not torch.equal(clamped, oracle["sliding_attention"])
    assert not torch.equal(triton_kv_mask(pos, pos, n, 0, True, [], clamp=False),
                           oracle["full_attention"])


# ----------------------------------------------------------------------------- the head on a GPU
def _fake_cuda_getitem():
    """``Tensor.__getitem__`` through aten ops: on a CPU-only torch, Python-level indexing of a
    fake CUDA tensor asks for a CUDA device guard ("not linked with support for cuda devices"),
    the aten ops it stands for do not. Basic indexing (ints, slices, None, Ellipsis) and one
    index tensor."""
    aten = torch.ops.aten
    orig = torch.Tensor.__getitem__

    def getitem(t, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.Tensor) for i in idx):
            return aten.index.Tensor(t, [idx[0]]) if len(idx) == 1 else orig(t, idx)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            fill = t.dim() - (len([i for i in idx if i is not None]) - 1)
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
        out, dim = t, 0
        for i in idx:
            if i is None:
                out, dim = aten.unsqueeze.default(out, dim), dim + 1
            elif isinstance(i, int):
                out = aten.select.int(out, dim, i)
            else:
                stop = (1 << 62) if i.stop is None else i.stop
                out = aten.slice.Tensor(out, dim, i.start or 0, stop, i.step or 1)
                dim += 1
        return out

    return getitem


def _fake_cuda_patches(monkeypatch):
    """What the head needs to run on fake CUDA tensors of a CPU-only torch."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # NYI on fake tensors
    # fake tensors take no generator: the draws (made on the host) lose theirs here, their values
    # do not matter to a placement and synchronisation audit
    rand, exponential = torch.rand, torch.Tensor.exponential_
    monkeypatch.setattr(torch, "rand", lambda *a, generator=None, **kw: rand(*a, **kw))
    monkeypatch.setattr(torch.Tensor, "exponential_",
                        lambda self, lambd=1.0, generator=None: exponential(self, lambd))
    monkeypatch.setattr(torch.Tensor, "__getitem__", _fake_cuda_getitem())


class SyncCounter:
    """Counts, under FakeTensorMode, what would make the host wait for a GPU: device-to-host
    copies, blocking host-to-device copies and scalar reads of device tensors (``bool``, ``item``:
    FakeTensorMode raises on those, so any left in the head fails the test)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.syncs = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func)
                if name.startswith("aten._to_copy") and isinstance(args[0], torch.Tensor):
                    src, dst = args[0].device.type, torch.device(kwargs.get("device", args[0].device)).type
                    if src == "cuda" and dst == "cpu":
                        counter.syncs.append("device-to-host copy")
                    elif src == "cpu" and dst == "cuda" and not kwargs.get("non_blocking", False):
                        counter.syncs.append("blocking host-to-device copy")
                if name.startswith("aten._local_scalar_dense") and args[0].device.type == "cuda":
                    counter.syncs.append("scalar read of a device tensor")
                return func(*args, **kwargs)

        self.mode = Mode()


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("seeded", [False, True])
def test_head_on_fake_cuda_tensors_places_everything_on_the_device_and_syncs_once(
        monkeypatch, tiled, seeded):
    """The vocabulary head for a batch of canvases (several row chunks, several tiles when tiled;
    unseeded: per-row temperatures with a greedy row, the batched path; seeded: one request's
    exact noise) on fake CUDA tensors: no device mismatch, no scalar read of a device tensor, no
    blocking copy inside the head (noise and temperatures go through pinned memory), and the
    results reach the host in one copy, however many chunks and tiles."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dgemma_vllm.refine.head import VocabSlice, canvas_head, to_host

    _fake_cuda_patches(monkeypatch)
    V, H, n = 1024, 32, 48
    gen = torch.Generator().manual_seed(0)
    counter = SyncCounter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.empty(V, H, device="cuda")
        hidden = torch.empty(n, H, device="cuda")
        vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
        if seeded:
            kw = dict(sched_t=0.7, temperature=1.0, exact_noise=True)
        else:  # per row, as denoise_batch passes them; one greedy request's rows among them
            temps = [1.0] * n
            temps[3] = 0.0
            kw = dict(sched_t=[0.7] * n, temperature=temps, exact_noise=False)
        with counter.mode:
            stats = canvas_head(hidden, vs, softcap=30.0, generator=gen, want_soft=True,
                                emb_dtype=torch.float32, tile=256 if tiled else V,
                                budget=16 * 256 if not seeded else 16 * V, **kw)
            head_syncs = list(counter.syncs)
            den, am, ent = to_host(stats.denoiser, stats.argmax, stats.entropy)
        for t in (stats.denoiser, stats.argmax, stats.entropy, stats.soft):
            assert t.device.type == "cuda"
        assert den.device.type == am.device.type == ent.device.type == "cpu"
        assert (den.dtype, am.dtype, ent.dtype) == (torch.int64, torch.int64, torch.float32)
    assert head_syncs == [], head_syncs
    assert counter.syncs == ["device-to-host copy"], counter.syncs


@pytest.mark.parametrize("seeded", [False, True])
def test_filtered_and_edited_head_on_fake_cuda_tensors(monkeypatch, seeded):
    """Issue 18's head work on fake CUDA tensors: logit edits (penalties, bias, banned ids,
    min_tokens rows, allowed ids) and a draw filter, tiled, one row forced through the full-row
    fallback: everything on the device, no blocking copy or scalar read; the one host wait per
    filtered chunk is the copy of its fallback flags."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dgemma_vllm.refine import head
    from dgemma_vllm.refine.filters import SamplingFilter, build_edits
    from dgemma_vllm.refine.head import RowSegment, VocabSlice, canvas_head, to_host

    _fake_cuda_patches(monkeypatch)
    calls = []

    def fallback(mask):  # the real one reads values (nonzero) a fake tensor does not have
        to_host(mask)
        calls.append(1)
        return [1]

    monkeypatch.setattr(head, "_fallback_rows", fallback)
    V, H, n = 1024, 32, 48
    edits = build_edits(vocab=V, prompt=[3, 4, 900], output=[5, 5, 700], presence=0.5,
                        frequency=0.2, repetition=1.2, logit_bias={7: 2.0}, banned=[9, 1000],
                        stop_ids=[1, 2], min_tokens=10, allowed=list(range(0, V, 2)))
    segs = [RowSegment(0, 20, edits, SamplingFilter(top_k=40, top_p=0.9, min_p=0.01)),
            RowSegment(20, n, None, SamplingFilter(top_p=0.5))]
    gen = torch.Generator().manual_seed(0)
    counter = SyncCounter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        w = torch.empty(V, H, device="cuda")
        hidden = torch.empty(n, H, device="cuda")
        vs = VocabSlice(weight=w, start=0, size=V, vocab=V)
        if seeded:
            kw = dict(sched_t=0.7, temperature=1.0, exact_noise=True)
        else:
            kw = dict(sched_t=[0.7] * n, temperature=[1.0] * n, exact_noise=False)
        with counter.mode:
            stats = canvas_head(hidden, vs, softcap=30.0, generator=gen, want_soft=True,
                                emb_dtype=torch.float32, tile=256,
                                budget=16 * 256 if not seeded else 16 * V, segments=segs, **kw)
        for t in (stats.denoiser, stats.argmax, stats.entropy, stats.soft):
            assert t.device.type == "cuda"
    assert len(calls) == 3  # three chunks of 16 rows, each with filtered rows
    assert counter.syncs == ["device-to-host copy"] * 3, counter.syncs
