"""LoRA adapters per request (issue 19), offline through vLLM's ``LoRARequest``.

Adapters are written by ``peft`` on the ``transformers`` model (PEFT's layout, decoder names,
``dgemma_vllm/checkpoints/adapters.py``); the reference is ``transformers``' generate on the
checkpoint with the adapter merged into its weights by ``peft`` (``merge_and_unload``: W +
alpha/r * B A, into the tied encoder/decoder weights). One engine (tiny, fp32, commit fusion on)
serves two adapters and the base model in one batch; bad adapters end only their requests.
The server surfaces (``--lora-modules``, the load/unload endpoints, ``/v1/models``) are in
tests/test_server.py, two ranks in tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.adapters import cached_adapter
from dgemma_vllm.checkpoints.factory import EOS_IDS
from dgemma_vllm.model import lora as L

PROMPTS = [[(13 * i + 3 * j) % 480 + 10 for j in range(2 + 7 * i)] for i in range(6)]
MAX_TOKENS, STEPS = 40, 3  # three canvases of 16: two commits fuse with the next canvas


def adapters(tiny_ckpt):
    return {"a": cached_adapter(tiny_ckpt, "a", rank=8, alpha=16, seed=1),
            "b": cached_adapter(tiny_ckpt, "b", rank=4, alpha=4, seed=2, targets="mlp")}


def merged_reference(ckpt, adapter):
    """transformers' model with `adapter` merged into its weights by peft (None: the base)."""
    from peft import PeftModel

    if adapter is None:
        return ref.load_reference(str(ckpt))
    model = ref.load_reference.__wrapped__(str(ckpt))  # not the cached one: the merge is in place
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    dec = merged.model.decoder.layers[1].self_attn.q_proj.weight
    enc = merged.model.encoder.language_model.layers[1].self_attn.q_proj.weight
    assert torch.equal(dec, enc), "the merge must reach both modes (tied weights)"
    return merged


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    engine = start_llm(tiny_ckpt, enable_lora=True, max_lora_rank=8, max_loras=2)
    yield engine
    stop_llm(engine)


def _params(seed):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, seed=seed, extra_args={"diffusion_max_steps": STEPS})


def test_two_adapters_and_the_base_in_one_batch_equal_merged_transformers(llm, tiny_ckpt):
    from vllm.lora.request import LoRARequest

    from dgemma_vllm.engine.stats import runner_stats

    ads = adapters(tiny_ckpt)
    which = [None, "a", "b", "a", None, "b"]
    reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(ads.items())}
    before = runner_stats(llm)["fused_commits"]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        [_params(700 + i) for i in range(len(PROMPTS))],
                        lora_request=[reqs.get(w) for w in which], use_tqdm=False)
    assert runner_stats(llm)["fused_commits"] > before  # commits fused with the next canvas
    models = {w: merged_reference(tiny_ckpt, ads.get(w)) for w in (None, "a", "b")}
    got = [list(o.outputs[0].token_ids) for o in outs]
    for i, (p, w) in enumerate(zip(PROMPTS, which)):
        want = ref.expected_tokens(models[w], p, 700 + i, MAX_TOKENS, EOS_IDS,
                                   max_denoising_steps=STEPS)
        assert got[i] == want, f"request {i} (adapter {w})"
    # the check can fail: each adapter changes the output, and the base is not an adapter's
    for i, (p, w) in enumerate(zip(PROMPTS, which)):
        other = "a" if w != "a" else None
        assert got[i] != ref.expected_tokens(models[other], p, 700 + i, MAX_TOKENS, EOS_IDS,
                                             max_denoising_steps=STEPS)


def _broken(src, dst, edit):
    """A copy of adapter `src` with its tensors / config changed by `edit(tensors, config)`."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    config = json.loads((dst / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _rename(tensors, old, new):
    for k in [k for k in tensors if old in k]:
        tensors[k.replace(old, new)] = tensors.pop(k)


def test_bad_adapters_end_only_their_requests(llm, tiny_ckpt, tmp_path):
    """An adapter with a rank above --max-lora-rank, a missing lora_B, a module the model has
    no adapter for (a router; a misspelt name), an encoder copy unlike its decoder twin, or a
    path with no adapter: its request ends with an error, the batch's other requests are
    served (the base one equal to the reference), and the engine serves on."""
    from safetensors.torch import load_file
    from vllm.lora.request import LoRARequest

    good = adapters(tiny_ckpt)["a"]
    q = "base_model.model.model.decoder.layers.0.self_attn.q_proj"
    enc = "base_model.model.model.encoder.language_model.layers.0.self_attn.q_proj"

    def bigger_rank(t, c):
        c["r"] = 16
        for k in [k for k in t if "lora_A" in k]:
            t[k] = torch.cat([t[k], t[k]])
        for k in [k for k in t if "lora_B" in k]:
            t[k] = torch.cat([t[k], t[k]], dim=1)

    def encoder_differs(t, c):
        t[f"{enc}.lora_A.weight"] = t[f"{q}.lora_A.weight"].clone()
        t[f"{enc}.lora_B.weight"] = t[f"{q}.lora_B.weight"] * 2

    broken = {
        "rank16": bigger_rank,
        "no_lora_B": lambda t, c: t.pop(f"{q}.lora_B.weight"),
        "router": lambda t, c: _rename(t, "layers.0.self_attn.q_proj", "layers.0.router.proj"),
        "misspelt": lambda t, c: _rename(t, "self_attn.q_proj", "self_attn.q_projection"),
        "encoder_differs": encoder_differs,
    }
    paths = {n: _broken(good, tmp_path / n, f) for n, f in broken.items()}
    paths["missing"] = tmp_path / "does_not_exist"
    names = list(paths)
    for i, name in enumerate(names):
        outs = llm.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}],
                            [_params(900 + i), _params(901 + i)],
                            lora_request=[LoRARequest(name, 100 + i, str(paths[name])), None],
                            use_tqdm=False)
        assert outs[0].outputs[0].finish_reason == "error", name
        assert outs[0].outputs[0].token_ids == [] or len(outs[0].outputs[0].token_ids) < MAX_TOKENS
        want = ref.expected_tokens(merged_reference(tiny_ckpt, None), PROMPTS[1], 901 + i,
                                   MAX_TOKENS, EOS_IDS, max_denoising_steps=STEPS)
        assert list(outs[1].outputs[0].token_ids) == want, name
    # an adapter whose encoder copies equal the decoder's (PEFT wrapping both) is served as is
    same = _broken(good, tmp_path / "encoder_same", lambda t, c: t.update({
        f"{enc}.lora_A.weight": t[f"{q}.lora_A.weight"].clone(),
        f"{enc}.lora_B.weight": t[f"{q}.lora_B.weight"].clone()}))
    assert any(k.startswith(enc) for k in load_file(str(same / "adapter_model.safetensors")))
    out = llm.generate([{"prompt_token_ids": PROMPTS[2]}], [_params(950)],
                       lora_request=LoRARequest("same", 200, str(same)), use_tqdm=False)
    want = ref.expected_tokens(merged_reference(tiny_ckpt, good), PROMPTS[2], 950, MAX_TOKENS,
                               EOS_IDS, max_denoising_steps=STEPS)
    assert list(out[0].outputs[0].token_ids) == want


# ---------------------------------------------------------------- engine-free rules (model/lora.py)
def _w(rank, n_in, n_out, fill=1.0):
    return SimpleNamespace(rank=rank, lora_alpha=rank, scaling=1.0,
                           lora_a=torch.full((rank, n_in), fill), lora_b=torch.full((n_out, rank), fill))


DIMS = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.k_proj": (64, 32),
        "model.layers.0.self_attn.v_proj": (64, 32), "model.layers.1.self_attn.k_proj": (64, 64),
        "model.layers.1.self_attn.v_proj": (64, 64)}


def _copy(w, name):
    return SimpleNamespace(**{**vars(w), "lora_a": w.lora_a.clone(), "lora_b": w.lora_b.clone(),
                              "name": name})


def test_k_eq_v_layers_get_their_k_adapter_on_v():
    loras = {"model.layers.1.self_attn.k_proj": _w(2, 64, 64),
             "model.layers.0.self_attn.k_proj": _w(2, 64, 32)}
    L.conform(loras, DIMS, {1}, "x", _copy)
    v = loras["model.layers.1.self_attn.v_proj"]
    assert torch.equal(v.lora_b, loras["model.layers.1.self_attn.k_proj"].lora_b)
    assert "model.layers.0.self_attn.v_proj" not in loras  # a layer with its own v_proj
    with pytest.raises(L.AdapterError, match="whose values are its keys"):
        L.conform({"model.layers.1.self_attn.v_proj": _w(2, 64, 64)}, DIMS, {1}, "x", _copy)


def test_adapter_shapes_and_names_are_checked():
    with pytest.raises(L.AdapterError, match=r"needs \(2, 64\) and \(32, 2\)"):
        L.conform({"model.layers.0.self_attn.k_proj": _w(2, 64, 64)}, DIMS, set(), "x", _copy)
    with pytest.raises(L.AdapterError, match="experts"):
        L.conform({"model.layers.0.experts": _w(2, 64, 64)}, DIMS, set(), "x", _copy)
    enc = "model.encoder.language_model.layers.0.self_attn.q_proj"
    same = {"model.layers.0.self_attn.q_proj": _w(2, 64, 64), enc: _w(2, 64, 64)}
    assert list(L.conform(same, DIMS, set(), "x", _copy)) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(L.AdapterError, match="decoder twin"):
        L.conform({"model.layers.0.self_attn.q_proj": _w(2, 64, 64), enc: _w(2, 64, 64, 2.0)},
                  DIMS, set(), "x", _copy)


def test_pipeline_stage_checks_the_whole_adapter_and_keeps_its_own_layers():
    """A stage holding layers 0 (sliding) and 1 (full) of four (S, F, S, F): layers 2 and 3 get
    the dimensions of 0 and 1, so a bad module of another stage's layer fails on this stage too;
    the adapter then keeps this stage's modules only (k_proj copied onto v_proj of layer 1)."""
    full = L.all_layer_dims(DIMS, ["sliding_attention", "full_attention"] * 2)
    assert full["model.layers.2.self_attn.k_proj"] == (64, 32)
    assert full["model.layers.3.self_attn.k_proj"] == (64, 64)
    loras = {"model.layers.1.self_attn.k_proj": _w(2, 64, 64),
             "model.layers.3.self_attn.k_proj": _w(2, 64, 64),
             "model.layers.2.self_attn.q_proj": _w(2, 64, 64)}
    L.conform(loras, full, {1, 3}, "x", _copy, present=set(DIMS))
    assert sorted(loras) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(L.AdapterError, match=r"layers.2.self_attn.k_proj.*needs \(2, 64\)"):
        L.conform({"model.layers.2.self_attn.k_proj": _w(2, 64, 64)}, full, {1, 3}, "x", _copy,
                  present=set(DIMS))


def test_target_modules_default_and_refusal():
    assert "experts" not in L.check_target_modules(None)
    assert L.check_target_modules(["q_proj", "o_proj"]) == ["q_proj", "o_proj"]
    with pytest.raises(ValueError, match="'experts'"):
        L.check_target_modules(["q_proj", "experts"])


def test_grouped_cpu_lora_ops_equal_vllms_and_skip_rows_without_an_adapter():
    """dgemma_vllm/model/lora_ops.py against vLLM's CPU ops: equal on rows with an adapter,
    zero delta on rows with index -1 (where vLLM's pick the last slot's adapter)."""
    from dgemma_vllm.engine import vllm_api as V
    from dgemma_vllm.model import lora_ops as G

    shrink, expand, expand_slice = V.vllm_cpu_lora_ops()
    g = torch.Generator().manual_seed(0)
    slots, rank, n_in, n_out, rows = 3, 4, 24, 40, 11
    idx = torch.tensor([0, 2, -1, 1, 1, -1, 0, 2, 2, -1, 0])
    has = (idx >= 0).unsqueeze(1)
    x = torch.randn(rows, n_in, generator=g)
    a = torch.randn(slots, 1, rank, n_in, generator=g)
    b = torch.randn(slots, 1, n_out, rank, generator=g)
    for ids in (idx, torch.full((rows,), 2)):
        keep = (ids >= 0).unsqueeze(1)
        y_v, y_g = torch.zeros(rows, rank), torch.zeros(rows, rank)
        shrink(x, a, y_v, ids, 0.5)
        G.bgmv_shrink(x, a, y_g, ids, 0.5)
        torch.testing.assert_close(y_g, torch.where(keep, y_v, 0.0), rtol=1e-5, atol=1e-5)
        base = torch.randn(rows, n_out + 8, generator=g)
        o_v, o_g = base.clone(), base.clone()
        expand(y_g, b, o_v, ids, True)
        G.bgmv_expand(y_g, b, o_g, ids, True)
        torch.testing.assert_close(o_g, torch.where(keep, o_v, base), rtol=1e-5, atol=1e-5)
        o_v, o_g = base.clone(), base.clone()
        expand_slice(y_g, b, o_v, ids, 4, n_out, False)
        G.bgmv_expand_slice(y_g, b, o_g, ids, 4, n_out, False)
        torch.testing.assert_close(o_g[:, 4:4 + n_out][keep.squeeze(1)],
                                   o_v[:, 4:4 + n_out][keep.squeeze(1)], rtol=1e-5, atol=1e-5)
        assert not o_g[:, 4:4 + n_out][~keep.squeeze(1)].any()
    # vLLM's own ops give a row without an adapter the last slot's delta (the bug worked around)
    y_v = torch.zeros(rows, rank)
    shrink(x, a, y_v, idx, 1.0)
    assert y_v[~has.squeeze(1)].abs().sum() > 0
