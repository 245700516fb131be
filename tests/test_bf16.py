"""bf16, the dtype `vllm serve` picks for the release (``dtype auto`` on a bf16 checkpoint).

One offline engine with ``dtype="auto"`` on the bf16 `small` checkpoint (5 sliding : 1 full
layers, prompts past the sliding window, so the exact canvas window reads vLLM's bf16 KV cache
back: on CPUs with AMX that is the ``amx`` layout) with the head tiled (``dgemma_head_tile``
256 of a 1024 vocabulary, so the compiled tile runs in bf16), and a capture directory:

- canvas logits (on a checkpoint whose q/k norm weights are scaled down, see QK_NORM_SCALE):
  every captured canvas forward against transformers on the same bf16 weights
  computed in fp32 (the oracle), relative error (max abs difference / max abs logit) at most
  ``BF16_TOL``, and no worse than ``HF_FACTOR`` times transformers' own bf16 computation of the
  same forward against the same oracle; both errors are printed;
- seeded tokens: agreement with the fp32 oracle's ``generate`` and with transformers' own bf16
  ``generate`` is printed (not asserted token for token: bf16 rounding flips near-tied draws);
  every request has its exact length.

Then `dgemma-vllm serve --dtype auto` on the bf16 `tiny` checkpoint with a fault injected into one
request's canvas bookkeeping (``DGEMMA_INJECT_FAULT``): that request is answered with a 500, the
concurrent ones (seeded and unseeded, streamed and not) are served in full, and the engine keeps
serving afterwards.
"""

from __future__ import annotations

import concurrent.futures as cf
import os

import pytest
import torch

from conftest import checkpoint
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS, get_geometry
from test_lora import adapters as lora_adapters
from test_lora import merged_reference
from test_parity import _reference_step_logits, make_requests, run_captured

# Per canvas row, the largest |logit difference| over the vocabulary relative to the forward's
# largest |logit|. Its median must be within BF16_TOL, and its median, p90 and p99 within
# HF_FACTOR of transformers' own bf16 computation of the same forwards (p99 and the maximum are
# MoE routing flips: a near-tied expert choice that bf16 rounding turns, transformers' too).
BF16_TOL = 2e-2
HF_FACTOR = 1.5
GEOMETRY = "small"
# the bf16 checkpoint's q/k norm weights scaled by 0.1 (factory Geometry.qk_norm_scale): with the
# default ~1, Gemma 4's unscaled attention is near one-hot on random weights and transformers'
# own bf16 logits differ from its fp32 ones by ~50% (chaos, not rounding), so no tolerance could
# tell a bug from the model; scaled, transformers' bf16 error is ~1%
QK_NORM_SCALE = 0.1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = checkpoint(GEOMETRY, qk_norm_scale=QK_NORM_SCALE)
    reqs = make_requests(GEOMETRY, n=6, seed=3)
    capture = tmp_path_factory.mktemp("capture_bf16")
    got, req_ids, caps = run_captured(path, reqs, capture, dtype="auto",
                                      hf_overrides={"dgemma_head_tile": 256})
    assert run_captured.last_dtype == torch.bfloat16
    yield dict(path=path, reqs=reqs, got=got, req_ids=req_ids, caps=caps)


def _row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per canvas row: max |difference| over the vocabulary / max |logit| of the forward."""
    return (got.float() - want.float()).abs().max(-1).values / want.float().abs().max()


def test_bf16_canvas_logits_within_tolerance_and_no_worse_than_transformers_bf16(run):
    oracle = ref.load_reference(str(run["path"]), "float32")
    hf16 = ref.load_reference(str(run["path"]), "bfloat16")
    c = get_geometry(GEOMETRY).canvas_length
    w = get_geometry(GEOMETRY).sliding_window
    ours, theirs, past_window = [], [], 0
    for r, got, rid in zip(run["reqs"], run["got"], run["req_ids"]):
        steps = run["caps"].get(rid)
        assert steps, f"no captured steps for {rid}"
        want = _reference_step_logits(oracle, r, got, steps, c)
        hf = _reference_step_logits(hf16, r, got, steps, c)
        for st, w32, w16 in zip(steps, want, hf):
            ours.append(_row_errors(st["logits"], w32))
            theirs.append(_row_errors(w16, w32))
            past_window += st["prefix_len"] > w
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    q = torch.tensor([0.5, 0.9, 0.99])
    qo, qt = torch.quantile(ours, q), torch.quantile(theirs, q)
    print(f"[bf16 {GEOMETRY}] {len(ours)} canvas rows ({past_window} forwards past the window), "
          "relative error (row max / max |logit|) against transformers fp32 on the same bf16 "
          f"weights, median / p90 / p99 / max: plugin {' / '.join(f'{v:.2e}' for v in qo)} / "
          f"{ours.max():.2e}; transformers bf16 {' / '.join(f'{v:.2e}' for v in qt)} / "
          f"{theirs.max():.2e}")
    assert past_window > 0
    assert qo[0] <= BF16_TOL, qo
    for k in range(len(q)):
        assert qo[k] <= HF_FACTOR * qt[k] + 1e-3, (q[k], qo[k], qt[k])


def test_bf16_check_can_fail(run):
    """The same statistic against the oracle with the other sliding-window rule, on the forwards
    past the window (where the plugin reads vLLM's bf16 KV cache back in the layout it probed),
    is far above the tolerance. (A RoPE shift is not: with the q/k norms scaled down, attention is
    near uniform and positions move the logits by less than bf16 does; the fp32 parity tests
    catch that one.)"""
    oracle = ref.load_reference(str(run["path"]), "float32")
    g = get_geometry(GEOMETRY)
    errs = {"good": [], "symmetric": []}
    for r, got, rid in zip(run["reqs"], run["got"], run["req_ids"]):
        steps = [s for s in run["caps"][rid] if s["prefix_len"] > g.sliding_window + 2]
        if not steps:
            continue
        for name, kw in (("good", {}), ("symmetric", {"symmetric": True})):
            want = _reference_step_logits(oracle, r, got, steps, g.canvas_length, **kw)
            errs[name] += [_row_errors(st["logits"], w32) for st, w32 in zip(steps, want)]
    med = {k: float(torch.cat(v).median()) for k, v in errs.items()}
    print(f"[bf16 {GEOMETRY}] median row error past the window: {med}")
    assert med["good"] <= BF16_TOL
    assert med["symmetric"] > 5 * BF16_TOL, med


def test_bf16_lengths_exact_and_token_agreement_reported(run):
    oracle = ref.load_reference(str(run["path"]), "float32")
    hf16 = ref.load_reference(str(run["path"]), "bfloat16")
    same32 = same16 = total = 0
    for r, got in zip(run["reqs"], run["got"]):
        if any(t in EOS_IDS for t in got):
            assert got[-1] in EOS_IDS and len(got) <= r.max_tokens
        else:
            assert len(got) == r.max_tokens
        w32 = ref.expected_tokens(oracle, r.prompt, r.seed, r.max_tokens, EOS_IDS,
                                  max_denoising_steps=r.steps)
        w16 = ref.expected_tokens(hf16, r.prompt, r.seed, r.max_tokens, EOS_IDS,
                                  max_denoising_steps=r.steps)
        k = min(len(got), len(w32), len(w16))
        same32 += sum(a == b for a, b in zip(got[:k], w32[:k]))
        same16 += sum(a == b for a, b in zip(got[:k], w16[:k]))
        total += k
    print(f"[bf16 {GEOMETRY}] seeded tokens equal to the fp32 oracle: {same32}/{total}; to "
          f"transformers bf16: {same16}/{total}")
    assert total > 0


# ----------------------------------------------------------------------------- the server in bf16
FAULT_SEED = 4242
FAULT_LEN = 7  # prompt length of the faulty unseeded request


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    from dgemma_vllm.cli import serve_subprocess

    log = tmp_path_factory.mktemp("server_bf16") / "server.log"
    args = ["--served-model-name", "tiny", "--dtype", "auto", "--max-model-len", "512",
            "--gpu-memory-utilization", "0.1", "--seed", "0",
            "--hf-overrides", '{"dgemma_head_tile": 128}',
            "--enable-lora", "--max-lora-rank", "8",  # a bf16 adapter (test_bf16_lora_*)
            "--lora-modules", f"ad-a={lora_adapters(checkpoint('tiny'))['a']}"]
    old = os.environ.get("DGEMMA_INJECT_FAULT")
    # a seeded request (its own head pass) and an unseeded one (in the batched head pass)
    os.environ["DGEMMA_INJECT_FAULT"] = f"head:seed={FAULT_SEED},head:prompt_len={FAULT_LEN}"
    try:
        with serve_subprocess(checkpoint("tiny"), args, log, timeout=240) as base:
            yield base, log
    finally:
        if old is None:
            os.environ.pop("DGEMMA_INJECT_FAULT", None)
        else:
            os.environ["DGEMMA_INJECT_FAULT"] = old


def _complete(base, **body):
    import requests

    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 40,
            "ignore_eos": True, "vllm_xargs": {"diffusion_max_steps": 4}, **body}
    if body.get("stream"):
        with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120) as r:
            lines = [ln for ln in r.iter_lines() if ln]
            return r.status_code, lines
    r = requests.post(f"{base}/v1/completions", json=body, timeout=120)
    return r.status_code, r.json()


def test_bf16_server_serves_and_one_faulty_request_does_not_end_the_engine(faulty_server):
    import requests

    base, log = faulty_server
    assert "dtype=torch.bfloat16" in log.read_text()
    faulty = [dict(seed=FAULT_SEED), dict(prompt=[2] + [30 + i for i in range(FAULT_LEN - 1)])]
    jobs = faulty + [dict(seed=s) for s in (1, 2)] + [{}, {}, dict(stream=True)]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(lambda kw: _complete(base, **kw), jobs))
    for status, body in results[:2]:
        assert status == 500, (status, body)
    for (status, body), kw in zip(results[2:], jobs[2:]):
        assert status == 200, (kw, status, body)
        if kw.get("stream"):
            assert body[-1] == b"data: [DONE]"
        else:
            assert body["usage"]["completion_tokens"] == 40
    text = log.read_text()
    assert f"injected fault (head, seed={FAULT_SEED})" in text
    assert f"injected fault (head, prompt_len={FAULT_LEN})" in text
    # the engine serves on: a chat request and a seeded completion afterwards
    r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "max_tokens": 20, "ignore_eos": True, "vllm_xargs": {"diffusion_max_steps": 3}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    status, body = _complete(base, seed=1)
    assert status == 200 and body["usage"]["completion_tokens"] == 40
    assert requests.get(f"{base}/health", timeout=10).status_code == 200


def test_bf16_lora_request_applies_its_adapter(faulty_server):
    """A LoRA request in bf16 (adapter weights cast to bf16 with the model): exact lengths, and
    its seeded tokens agree with transformers fp32 with the adapter merged (peft) more than with
    the base model; the agreement is printed (bf16 rounding flips near-tied draws)."""
    import requests

    base, _ = faulty_server
    ckpt = checkpoint("tiny")
    merged = merged_reference(ckpt, lora_adapters(ckpt)["a"])
    plain = ref.load_reference(str(ckpt), "float32")
    agree_merged = agree_plain = n = 0
    for i in range(3):
        prompt = [2] + [40 + 7 * i + j for j in range(5 + 4 * i)]
        r = requests.post(f"{base}/v1/completions", timeout=120, json={
            "model": "ad-a", "prompt": prompt, "max_tokens": 40, "seed": 60 + i, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True,
            "vllm_xargs": {"diffusion_max_steps": 3}})
        assert r.status_code == 200, r.text
        got = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
        assert len(got) == 40
        w_merged = ref.generate(merged, prompt, 60 + i, max_new_tokens=40, max_denoising_steps=3)
        w_plain = ref.generate(plain, prompt, 60 + i, max_new_tokens=40, max_denoising_steps=3)
        agree_merged += sum(a == b for a, b in zip(got, w_merged))
        agree_plain += sum(a == b for a, b in zip(got, w_plain))
        n += 40
    print(f"[bf16 LoRA] seeded tokens equal to transformers fp32 with the adapter merged: "
          f"{agree_merged}/{n}, to the base model: {agree_plain}/{n}")
    assert agree_merged > agree_plain and agree_merged > n // 4


def test_bf16_image_request(faulty_server):
    """Chat requests with an image (data: URL) in bf16: exact lengths, and the pixels reach the
    model (the same seed and prompt ids with noise or flat grey of the same size give other
    tokens). Agreement with transformers fp32 given the same image is printed, not asserted: on
    the tiny checkpoint bf16 rounding alone flips about half of the draws (transformers' own
    bf16 too; see QK_NORM_SCALE), so it cannot tell an image's effect from rounding."""
    import requests
    from PIL import Image

    from test_images import IMAGES, reference_tokens
    from test_server import data_url

    base, _ = faulty_server
    ckpt = checkpoint("tiny")
    oracle = ref.load_reference(str(ckpt), "float32")
    images = {"noise": IMAGES["a"], "grey": Image.new("RGB", IMAGES["a"].size, (128, 128, 128))}
    got, agree = {}, {}
    for name, img in images.items():
        r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "max_tokens": 32, "seed": 70, "ignore_eos": True,
            "return_token_ids": True, "vllm_xargs": {"diffusion_max_steps": 3},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(img)}},
                {"type": "text", "text": "What is in the picture?"}]}]})
        assert r.status_code == 200, r.text
        body = r.json()
        got[name], ids = body["choices"][0]["token_ids"], body["prompt_token_ids"]
        assert len(got[name]) == 32
        want = reference_tokens(oracle, ckpt, ids, [img], 70, 32, 3)
        agree[name] = sum(a == b for a, b in zip(got[name], want))
    assert got["noise"] != got["grey"]
    print(f"[bf16 image] seeded tokens equal to transformers fp32 with the same image: "
          f"{agree['noise']}/32 (noise), {agree['grey']}/32 (grey)")
