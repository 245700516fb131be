"""Issue 8, item 2: the commit of canvas k and the first denoising step of canvas k+1 run in one
forward, and the commit that ends a request runs in the canvas's last denoising step (or as
one row where that step was the fused one) (``dgemma_fuse_commit``, on by default); neither
changes a token.

One batch of seeded requests, all submitted together (so fused, plain-commit, denoising and
prefill rows share engine steps), runs on an engine with fusion off and on the default engine;
every request's tokens must be equal, the fused engine must have fused commits and run fewer
forwards, and requests the reference can express must equal the ``transformers`` reference.
The batch covers: several canvases with the last one cut by max_tokens, an exact multiple of the
canvas, EOS allowed, a per-request canvas length, a last canvas shortened by max_model_len,
adaptive stopping, greedy sampling, one denoising step per canvas (the fused step itself is the
canvas's last), and a request with several denoising steps per engine step disabled by fusion
rows (step groups only run on pure denoising batches). The runners' counters show, for the same
batch, that committed rows never reach the vocabulary head and that the self-conditioning MLP
runs once per forward for all canvases in it (items 2 and 3).
"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import hook_config, start_llm, stop_llm

MAX_LEN = 1024


def _requests():
    from vllm import SamplingParams

    # stopping off in practice (mean entropies of random weights are far above 1e-9), in a form
    # the reference accepts too (its confidence threshold must be > 0)
    off = {"diffusion_stability_threshold": 0, "diffusion_confidence_threshold": 1e-9}
    spec = [  # (prompt length, SamplingParams kwargs, extra_args)
        (5, dict(max_tokens=40, ignore_eos=True), {"diffusion_max_steps": 3, **off}),
        (9, dict(max_tokens=64, ignore_eos=True), {"diffusion_max_steps": 2, **off}),
        (12, dict(max_tokens=80), {"diffusion_max_steps": 4}),
        (7, dict(max_tokens=50, ignore_eos=True), {"diffusion_max_steps": 3, "diffusion_canvas_length": 8, **off}),
        (MAX_LEN - 40, dict(max_tokens=100, ignore_eos=True), {"diffusion_max_steps": 2, **off}),
        (20, dict(max_tokens=72, ignore_eos=True), {"diffusion_max_steps": 8}),
        (6, dict(max_tokens=48, ignore_eos=True, temperature=0.0), {"diffusion_max_steps": 3, **off}),
        (15, dict(max_tokens=48, ignore_eos=True), {"diffusion_max_steps": 1}),
    ]
    prompts, params = [], []
    for i, (n, kw, extra) in enumerate(spec):
        prompts.append({"prompt_token_ids": [(31 * i + 7 * j) % 480 + 10 for j in range(n)]})
        params.append(SamplingParams(seed=500 + i, extra_args=extra, **kw))
    return prompts, params


def _run(path, **overrides):
    from dgemma_vllm.engine.stats import request_stats, runner_stats

    llm = start_llm(path, max_model_len=MAX_LEN, hf_overrides=overrides or None)
    try:
        prompts, params = _requests()
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = runner_stats(llm)
        per_request = request_stats(llm)
        stats["requests"] = [per_request[o.request_id.rsplit("-", 1)[0]] for o in outs]
        return [list(o.outputs[0].token_ids) for o in outs], stats
    finally:
        stop_llm(llm)


@pytest.fixture(scope="module")
def runs(tiny_ckpt):
    unfused = _run(tiny_ckpt, dgemma_fuse_commit=False)
    fused = _run(tiny_ckpt)
    return unfused, fused


def test_fused_tokens_equal_unfused(runs):
    (plain, plain_stats), (fused, fused_stats) = runs
    prompts, params = _requests()
    for i, (a, b) in enumerate(zip(plain, fused)):
        assert a == b, f"request {i}: fused and unfused tokens differ"
    # the batch really exercised both paths
    assert plain_stats["fused_commits"] == 0 and plain_stats["last_commits"] == 0
    assert plain_stats["final_commits"] == 0, plain_stats
    assert fused_stats["fused_commits"] >= 10, fused_stats
    # every request ends so: its last canvas returned by its last denoising step, except where
    # one step per canvas makes the fused forward that starts a canvas also its last (one row)
    one_step = sum(sp.extra_args["diffusion_max_steps"] == 1 for sp in params)
    assert fused_stats["final_commits"] == len(prompts) - one_step, fused_stats
    assert fused_stats["last_commits"] == one_step, fused_stats
    assert fused_stats["engine_steps"] < plain_stats["engine_steps"], (plain_stats, fused_stats)
    # no request is constrained: every engine step sampled inside execute_model (one RPC per step,
    # worker.py), and the tokens above are the ones test_parity proves against the reference
    for st in (plain_stats, fused_stats):
        assert st["one_rpc_steps"] == st["engine_steps"] > 0, st
    # lengths as asked (ignore_eos requests): the max_model_len-capped one stops at the end
    for (p, sp, toks) in zip(prompts, params, fused):
        if sp.ignore_eos:
            room = MAX_LEN - len(p["prompt_token_ids"])
            assert len(toks) == min(sp.max_tokens, room)


def _canvas_lengths(prompt_len, n_tokens, canvas):
    """The canvases a request of `n_tokens` output tokens ran, as the served model defines them:
    `canvas` positions, shortened by the room left under max_model_len."""
    lens, done = [], 0
    while done < n_tokens:
        lens.append(min(canvas, MAX_LEN - prompt_len - done))
        done += lens[-1]
    return lens


def test_commit_rows_skip_the_head_and_one_self_conditioning_call_per_forward(runs, tiny_ckpt):
    """Item 2: the vocabulary head runs on denoising canvas rows only, never on committed rows
    (counted: rows vLLM's logits step hands the runner's head, against the canvases and steps
    each request ran, worked out here from its length and settings). Item 3: one
    self-conditioning MLP call per forward that holds canvases, whatever their number."""
    import json

    served = json.loads((tiny_ckpt / "config.json").read_text())["canvas_length"]
    prompts, params = _requests()
    for fused, (toks_all, stats) in zip((False, True), runs):
        head_rows = commit_rows = steps = 0
        for p, sp, toks, req in zip(prompts, params, toks_all, stats["requests"]):
            extra = sp.extra_args
            lens = _canvas_lengths(len(p["prompt_token_ids"]), len(toks),
                                   extra.get("diffusion_canvas_length", served))
            k = extra["diffusion_max_steps"]
            assert req["canvases"] == len(lens), (p, req, lens)
            if k == 1 or extra.get("diffusion_stability_threshold") == 0:  # no early stop
                assert req["denoising_steps"] == k * len(lens), (req, lens)
                head_rows += k * sum(lens)
            else:  # adaptive stopping: steps per canvas vary, the canvases are all alike
                assert len(set(lens)) == 1, lens
                head_rows += req["denoising_steps"] * lens[0]
            steps += req["denoising_steps"]
            # committed rows: every canvas in full, except the last one of a fused engine (it
            # ends the request, its K/V are never read): none, its last step returns it, or one
            # row where its only step was the fused forward that started it
            commit_rows += sum(lens) if not fused else sum(lens[:-1]) + (k == 1)
        assert stats["head_rows"] == head_rows, (fused, stats, head_rows)
        assert stats["commit_rows"] == commit_rows, (fused, stats, commit_rows)
        assert stats["self_conditioning_calls"] == stats["canvas_forwards"], stats
        assert stats["canvas_forwards"] < steps / 2, (stats, steps)  # forwards shared by canvases


def test_fused_tokens_equal_reference(runs, tiny_ckpt):
    """Requests the reference expresses (served canvas length, room under max_model_len) equal
    ``transformers``' generate with the same seed: fusion is exact, not just self-consistent."""
    from dgemma_vllm import reference as ref
    from dgemma_vllm.checkpoints.factory import EOS_IDS

    model = ref.load_reference(str(tiny_ckpt))
    (_, _), (fused, _) = runs
    prompts, params = _requests()
    checked = 0
    for p, sp, toks in zip(prompts, params, fused):
        extra = sp.extra_args
        if "diffusion_canvas_length" in extra or len(p["prompt_token_ids"]) + sp.max_tokens > MAX_LEN:
            continue
        if extra.get("diffusion_stability_threshold") != 0 or sp.temperature != 1.0:
            continue  # stopping thresholds / temperature: covered by tests/test_parity.py
        eos = () if sp.ignore_eos else EOS_IDS
        want = ref.expected_tokens(model, p["prompt_token_ids"], sp.seed, sp.max_tokens, eos,
                                   max_denoising_steps=extra["diffusion_max_steps"],
                                   stability_threshold=0, confidence_threshold=1e-9)
        assert toks == want
        checked += 1
    assert checked >= 2


def test_split_fused_attention_metadata_field_by_field():
    """The metadata of a fused request is two sequences over its block-table row: committed rows
    (causal, context up to them) then canvas rows (bidirectional, context up to the canvas end).
    Every field of vLLM's CommonAttentionMetadata is filled and checked: rebuilt ones (incl. the
    multimodal prefix-LM ranges of `use_bidirectional_attention: "vision"`), token-level ones
    untouched, per-request ones repeated for the second sequence, derived caches dropped."""
    import numpy as np
    import torch

    from dgemma_vllm.engine import vllm_api as V
    from dgemma_vllm.engine.runner import split_fused

    # request 0: prefill of 5 (an image span in its prompt); request 1: 6 committed + 4 canvas
    # after 30 tokens (text: no ranges); request 2: a 4-row canvas after 50 tokens (an image)
    qsl = torch.tensor([0, 5, 15, 19], dtype=torch.int32)
    seq = torch.tensor([5, 40, 54], dtype=torch.int32)
    bt = torch.arange(3 * 4, dtype=torch.int32).view(3, 4)
    values = dict(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=3,
        num_actual_tokens=19, max_query_len=10, max_seq_len=54, block_table_tensor=bt,
        slot_mapping=torch.arange(19), causal=True, logits_indices_padded=torch.arange(4),
        num_logits_indices=4, max_logits_per_req=2,
        encoder_seq_lens=torch.tensor([7, 8, 9]), encoder_seq_lens_cpu=np.array([7, 8, 9]),
        positions=torch.arange(19) + 100, is_prefilling=torch.tensor([True, False, False]),
        seq_lens_cpu_upper_bound=seq.clone(), req_idx=np.array([0, 1, 2]),
        mm_req_doc_ranges={0: [(1, 3)], 2: [(10, 20), (30, 35)]},
        rswa_prefix_lens=torch.tensor([5, 30, 12]),
        replayssm_decode_base_cpu=torch.tensor([0, 3, 4]),
        _num_computed_tokens_cache=torch.zeros(3), _token_to_req_indices_cache=torch.zeros(19))
    names = {f.name for f in dataclasses.fields(V.CommonAttentionMetadata)}
    assert names - set(V.SPLIT_REFUSED_FIELDS) == set(values), "a field of this vLLM is untested"
    assert V.unknown_attention_metadata_fields() == []
    cm = V.CommonAttentionMetadata(**values)
    causal = torch.tensor([1, 0, 0], dtype=torch.int32)  # the runner's flags: fused rows say 0
    out = split_fused(cm, causal, {1: 6})
    # rebuilt
    assert out.num_reqs == 4
    assert out.query_start_loc_cpu.tolist() == [0, 5, 11, 15, 19]
    assert out.query_start_loc.tolist() == [0, 5, 11, 15, 19]
    assert out.seq_lens.tolist() == [5, 36, 40, 54]
    assert out.seq_lens_cpu_upper_bound.tolist() == [5, 36, 40, 54]
    assert out.causal.tolist() == [1, 1, 0, 0]
    assert out.max_query_len == 6 and out.max_seq_len == 54
    assert torch.equal(out.block_table_tensor, bt[[0, 1, 1, 2]])
    assert out.mm_req_doc_ranges == {0: [(1, 3)], 3: [(10, 20), (30, 35)]}
    # token level and per batch: untouched
    for name in V.SPLIT_TOKEN_LEVEL_FIELDS:
        v = getattr(out, name)
        assert (torch.equal(v, values[name]) if isinstance(v, torch.Tensor) else v == values[name]), name
    # per request: repeated for the second sequence of request 1
    for name in V.SPLIT_REPEATED_FIELDS:
        got, want = getattr(out, name), values[name]
        assert list(got.tolist()) == [want.tolist()[i] for i in (0, 1, 1, 2)], name
    for name in V.SPLIT_DROPPED_FIELDS:
        assert getattr(out, name) is None, name
    # a text batch of a release checkpoint (empty ranges) and a non-prefix-LM model (None)
    for ranges in ({}, None):
        o = split_fused(dataclasses.replace(cm, mm_req_doc_ranges=ranges), causal, {1: 6})
        assert o.mm_req_doc_ranges == ranges
    # without the CPU upper bound the lengths come from seq_lens
    o = split_fused(dataclasses.replace(cm, seq_lens_cpu_upper_bound=None), causal, {1: 6})
    assert o.seq_lens.tolist() == [5, 36, 40, 54] and o.seq_lens_cpu_upper_bound is None


def test_config_hook_turns_fusion_off_for_unknown_metadata_fields(monkeypatch):
    from dgemma_vllm.engine import vllm_api as V
    from dgemma_vllm.engine.config import DGemmaConfigHook

    cfg = hook_config()
    DGemmaConfigHook.verify_and_update_config(cfg)
    assert cfg.model_config.hf_config.dgemma_fuse_commit is True
    assert cfg.scheduler_config.scheduler_cls.endswith("DGemmaScheduler")
    monkeypatch.setattr(V, "unknown_attention_metadata_fields", lambda: ["new_field"])
    cfg = hook_config()
    DGemmaConfigHook.verify_and_update_config(cfg)
    assert cfg.model_config.hf_config.dgemma_fuse_commit is False


@pytest.mark.parametrize("name", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_config_hook_refuses_context_parallelism(name):
    from dgemma_vllm.engine.config import DGemmaConfigHook

    with pytest.raises(ValueError, match=name):
        DGemmaConfigHook.verify_and_update_config(hook_config(**{name: 2}))
