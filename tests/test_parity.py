"""Parity with the `transformers` reference on the same random-weight checkpoints (fp32, CPU).

For each geometry one vLLM engine (the plugin loaded through its entry point) runs a batch of
mixed seeded requests with a capture directory set, so that every denoising step leaves behind
what the canvas forward saw and produced (prefix length, canvas ids, self-conditioning logits,
canvas logits). Then:

- tokens: every request equals the reference's ``generate`` for its prompt alone after
  ``torch.manual_seed(seed)``, up to its first EOS or ``max_tokens``;
- logits: every captured canvas forward equals the reference decoder's logits on a cache built
  by the reference encoder from the prompt and the committed canvases, relative error <= 1e-4;
- the comparison can fail: the same check against the reference at shifted positions (a RoPE
  error) or with the canvas mask of the other sliding-window rule exceeds the tolerance.

Requests whose reference run meets an MoE routing near-tie are drawn again with another seed
(same prompt, length and steps; the widest-margin one of six where none is free of ties): where
the k-th and (k+1)-th router probabilities of some token lie within ``ROUTER_TIE`` (relative) of
each other, fp32 rounding alone (vLLM's router GEMM against the reference's) decides which expert
runs, and the two outputs part by design. Which
requests meet one depends on the CPU kind (these tests passed on AVX2 machines; on an AVX-512
EPYC two of the `small` requests had relative gaps of 0 and 1.2e-7 and 0.14 relative logits
error, the closest among the others 1.9e-6; whether the checkpoint's random weights or the
kernels' rounding differ between the two was not isolated).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from conftest import checkpoint, start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS, get_geometry, text_token_ids

REL_TOL = 1e-4
ROUTER_TIE = 2e-6  # ~16 fp32 ulps between the k-th and (k+1)-th router probability


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@dataclass
class Req:
    prompt: list[int]
    seed: int
    max_tokens: int
    steps: int


def make_requests(geometry: str, n: int = 8, seed: int = 0) -> list[Req]:
    g = get_geometry(geometry)
    rnd = random.Random(seed)
    c, w = g.canvas_length, g.sliding_window
    lengths = [3, w - 1, w + 5, 2 * w + 3, 1, w, 3 * w + 1, 7]
    max_tokens = [3 * c, 3 * c - 5, c + 1, 2 * c + 3, 3 * c + 2, c, 2 * c - 1, 3 * c]
    steps = [3, 4, 3, 5, 3, 4, 3, 6]
    reqs = []
    words = text_token_ids(g.vocab_size, 5)  # no special tokens (turn, tool or image markers)
    for i in range(n):
        prompt = [rnd.choice(words) for _ in range(lengths[i % 8])]
        reqs.append(Req(prompt, seed=1000 + 17 * i, max_tokens=max_tokens[i % 8], steps=steps[i % 8]))
    return reqs


def expected_tokens(model, r: Req) -> list[int]:
    return ref.expected_tokens(model, r.prompt, r.seed, r.max_tokens, EOS_IDS,
                               max_denoising_steps=r.steps)


def router_margin(model, fn):
    """(fn(), the smallest relative gap between the k-th and (k+1)-th router probability over
    every token of every MoE router call of the reference while fn runs, among tokens whose k-th
    expert carries more than REL_TOL of their top-k weight)."""
    gaps = []

    def hook(mod, inp, out):
        k = mod.config.top_k_experts
        v = out[0].float().topk(k + 1, dim=-1).values
        rel = (v[:, k - 1] - v[:, k]) / v[:, k - 1]
        # a tie between experts whose share of the token's top-k weight is below the logits
        # tolerance cannot move the logits by more than it
        share = v[:, k - 1] / v[:, :k].sum(-1)
        gaps.append(float(torch.where(share > REL_TOL, rel, math.inf).min()))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if type(m).__name__.endswith("TextRouter")]
    assert handles, "no MoE router found in the reference model"
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, min(gaps, default=math.inf)


def tie_free(model, r: Req, tries: int = 6) -> tuple[Req, list[int]]:
    """`r`, or `r` with the first seed in a fixed sequence whose reference run has no routing
    near-tie (see the module doc); if none of `tries` seeds is free of one (a tie inside the
    prompt's own encoding does not depend on the seed), the seed with the widest margin. With
    the reference's tokens for it."""
    best = None
    for t in range(tries):
        cand = Req(r.prompt, seed=r.seed + 7919 * t, max_tokens=r.max_tokens, steps=r.steps)
        toks, margin = router_margin(model, lambda: expected_tokens(model, cand))
        if margin >= ROUTER_TIE:
            return cand, toks
        if best is None or margin > best[0]:
            best = (margin, cand, toks)
    return best[1], best[2]


def find_eos_request(model, geometry: str) -> Req:
    """A seeded request whose reference output has an EOS strictly inside a canvas."""
    g = get_geometry(geometry)
    c = g.canvas_length
    for s in range(500):
        r = Req([7, 8, 9, 10, 11], seed=s, max_tokens=3 * c, steps=3)
        toks, margin = router_margin(model, lambda: ref.generate(
            model, r.prompt, r.seed, max_new_tokens=r.max_tokens, max_denoising_steps=3))
        pos = [i for i, t in enumerate(toks) if t in EOS_IDS]
        if pos and pos[0] % c not in (c - 1,) and pos[0] < 3 * c and margin >= ROUTER_TIE:
            return r
    raise AssertionError("no seed in 0..499 gives an EOS inside a canvas")


def run_captured(path, reqs: list[Req], capture, **engine):
    """One engine on `path` (a capture directory set) runs `reqs` as one batch: their tokens,
    request ids and each request's captured canvas forwards (request id -> list)."""
    from vllm import SamplingParams

    llm = start_llm(path, capture_dir=str(capture), **engine)
    try:
        params = [SamplingParams(max_tokens=r.max_tokens, seed=r.seed,
                                 extra_args={"diffusion_max_steps": r.steps}) for r in reqs]
        outs = llm.generate([{"prompt_token_ids": r.prompt} for r in reqs], params, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        req_ids = [o.request_id for o in outs]
        config = llm.llm_engine.model_config
    finally:
        stop_llm(llm)
    caps = {rid: [] for rid in req_ids}
    for f in capture.glob("*.pt"):  # vLLM appends a suffix to the user's request id internally
        rid = f.stem.rsplit("-", 1)[0]
        if rid in caps:
            caps[rid] = torch.load(f)
    run_captured.last_dtype = config.dtype
    return got, req_ids, caps


CASES = {
    "tiny": dict(geometry="tiny", ckpt={}, engine={}),
    # vLLM's default: the forward compiled (torch.compile, inductor); the other cases run eagerly
    # (their engines start in half the time). Same tokens and the same 1e-4 logits tolerance.
    # With the others' 0.1 share of memory (0.76 GiB here) vLLM found no room for the KV cache
    # after the compiled start-up (-0.12 GiB; the cause not isolated), hence 0.2.
    "tiny_compiled": dict(geometry="tiny", ckpt={},
                          engine={"enforce_eager": False, "gpu_memory_utilization": 0.2}),
    "small": dict(geometry="small", ckpt={}, engine={}),
    "tiny_alt": dict(geometry="tiny_alt", ckpt={}, engine={}),
}


_REFERENCE: dict = {}


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory):
    case = CASES[request.param]
    geometry = case["geometry"]
    path = checkpoint(geometry, **case["ckpt"])
    key = (geometry, tuple(sorted(case["ckpt"].items())))
    if key not in _REFERENCE:  # the compiled case reuses the eager case's reference runs
        model = ref.load_reference(str(path))
        reqs, want = map(list, zip(*(tie_free(model, r) for r in make_requests(geometry))))
        reqs.append(find_eos_request(model, geometry))
        want.append(expected_tokens(model, reqs[-1]))
        _REFERENCE.clear()  # one reference model held at a time
        _REFERENCE[key] = (model, reqs, want)
    model, reqs, want = _REFERENCE[key]
    capture = tmp_path_factory.mktemp(f"capture_{request.param}")
    got, req_ids, caps = run_captured(path, reqs, capture, **case["engine"])
    yield dict(name=request.param, geometry=geometry, model=model, reqs=reqs, want=want, got=got,
               req_ids=req_ids, caps=caps)


def test_tokens_equal_reference(run):
    mismatches = []
    for r, want, got in zip(run["reqs"], run["want"], run["got"]):
        if got != want:
            mismatches.append((r, got, want))
    assert not mismatches, "\n".join(f"{r}: got {g} want {w}" for r, g, w in mismatches)


def test_lengths_are_exact(run):
    c = get_geometry(run["geometry"]).canvas_length
    for r, got in zip(run["reqs"], run["got"]):
        if any(t in EOS_IDS for t in got):
            assert got[-1] in EOS_IDS and sum(t in EOS_IDS for t in got) == 1
            assert len(got) <= r.max_tokens
        else:
            assert len(got) == r.max_tokens, (r, len(got))
    assert any(r.max_tokens % c for r in run["reqs"])  # cuts inside a canvas are exercised


def test_eos_inside_canvas(run):
    c = get_geometry(run["geometry"]).canvas_length
    got = run["got"][-1]
    assert got[-1] in EOS_IDS and (len(got) - 1) % c != c - 1 and len(got) < 3 * c


def _reference_step_logits(model, r: Req, committed: list[int], steps: list[dict], c: int,
                           *, position_shift: int = 0, symmetric: bool = False):
    """Reference decoder logits for each captured step, on one cache that the reference encoder
    extends with the prompt and then each committed canvas, as `generate` does."""
    cache = ref.new_cache(model)
    ref.encode(model, cache, r.prompt)
    encoded = len(r.prompt)
    out = []
    for st in steps:
        L = st["prefix_len"]
        while encoded < L:
            chunk = committed[encoded - len(r.prompt): encoded - len(r.prompt) + c]
            ref.encode(model, cache, chunk)
            encoded += len(chunk)
        out.append(ref.canvas_logits(model, cache, st["canvas"].tolist(), st["sc_logits"],
                                     prefix_len=L, position_shift=position_shift,
                                     symmetric_window=symmetric))
    return out


def test_canvas_logits_match_reference(run):
    model = run["model"]
    c = get_geometry(run["geometry"]).canvas_length
    worst, n = 0.0, 0
    for r, got, rid in zip(run["reqs"], run["got"], run["req_ids"]):
        steps = run["caps"][rid]
        assert steps, f"no captured steps for {rid}"
        refs = _reference_step_logits(model, r, got, steps, c)
        for st, want in zip(steps, refs):
            e = rel_err(st["logits"], want)
            worst = max(worst, e)
            n += 1
            assert e <= REL_TOL, (r, st["prefix_len"], e)
    # both prefix regimes (shorter and longer than the window) and >= 2 committed canvases
    w = get_geometry(run["geometry"]).sliding_window
    lens = [st["prefix_len"] for rid in run["req_ids"] for st in run["caps"][rid]]
    assert min(lens) < w and max(lens) > w + 2 * c
    print(f"[{run['name']}] {n} canvas forwards, worst relative error {worst:.2e}")


def test_check_detects_wrong_rope_and_wrong_mask(run):
    model = run["model"]
    g = get_geometry(run["geometry"])
    # a step whose prefix is longer than the window, with self-conditioning
    for r, got, rid in zip(run["reqs"], run["got"], run["req_ids"]):
        steps = [s for s in run["caps"][rid] if s["prefix_len"] > g.sliding_window + 2 and s["sc_logits"] is not None]
        if steps:
            break
    st = steps[0]
    good = _reference_step_logits(model, r, got, [st], g.canvas_length)[0]
    shifted = _reference_step_logits(model, r, got, [st], g.canvas_length, position_shift=1)[0]
    other_mask = _reference_step_logits(model, r, got, [st], g.canvas_length, symmetric=True)[0]
    assert rel_err(st["logits"], good) <= REL_TOL
    assert rel_err(st["logits"], shifted) > 100 * REL_TOL
    assert rel_err(st["logits"], other_mask) > 10 * REL_TOL
