"""vLLM's sampling parameters through the engine (issue 18), against transformers' reference.

One tiny engine (fp32) for the module. Each parameter is shown to have its effect and checked
against a reference formulation of the same rule on the same weights:

- logprobs: the log-softmax of the reference's final denoising step's raw logits (recorded by a
  logits processor inside transformers' ``generate``) at each committed position;
- penalties, logit_bias, allowed_token_ids, single-token bad_words, min_tokens: vLLM's own
  functions as a ``logits_processor`` of the reference's ``generate`` give the same seeded tokens;
- top_k / top_p / min_p: vLLM's filter patched into the reference's ``multinomial`` gives the
  same seeded tokens;
- multi-token bad_words: never in the output; n > 1: seeded children are reproducible.
"""

from __future__ import annotations

import pytest
import torch

from conftest import start_llm, stop_llm
from dgemma_vllm import reference as ref
from dgemma_vllm.checkpoints.factory import EOS_IDS

PROMPT = [9, 30, 41, 77, 120, 7, 8]
STEPS = {"diffusion_max_steps": 3}


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    engine = start_llm(tiny_ckpt, max_model_len=256, max_logprobs=20)
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return ref.load_reference(str(tiny_ckpt))


def gen(llm, prompt=PROMPT, **kw):
    from vllm import SamplingParams

    kw.setdefault("extra_args", STEPS)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(**kw), use_tqdm=False)[0]
    return out.outputs


def _cut(toks, n):
    toks = toks[:n]
    for i, t in enumerate(toks):
        if t in EOS_IDS:
            return toks[: i + 1]
    return toks


class _Rules:
    """vLLM's logit rules as a transformers logits processor (before the schedule temperature):
    allowed ids, bad single tokens, min_tokens, logit_bias, then vLLM's apply_penalties."""

    def __init__(self, prompt_len, *, allowed=None, banned=(), min_tokens=0, stop_ids=(),
                 bias=None, presence=0.0, frequency=0.0, repetition=1.0):
        self.__dict__.update(locals())
        self.seen = []  # (sequence length, raw scores) of every step

    def __call__(self, input_ids, scores, cur_step=None):
        from vllm.model_executor.layers.utils import apply_penalties

        self.seen.append((input_ids.shape[1], scores[0].clone()))
        x = scores[0].clone()
        n, v = x.shape
        done = input_ids.shape[1] - self.prompt_len
        if self.allowed is not None:
            keep = torch.zeros(v, dtype=torch.bool)
            keep[list(self.allowed)] = True
            x[:, ~keep] = float("-inf")
        if self.banned:
            x[:, list(self.banned)] = float("-inf")
        rows = self.min_tokens - done
        if rows > 0 and self.stop_ids:
            x[:rows, list(self.stop_ids)] = float("-inf")
        for i, b in (self.bias or {}).items():
            x[:, i] += b
        prompt = input_ids[0, : self.prompt_len].tolist()
        out = input_ids[0, self.prompt_len:].tolist()
        x = apply_penalties(x, torch.tensor([prompt] * n), torch.tensor([out] * n, dtype=torch.long).view(n, len(out)),
                            torch.full((n,), self.presence), torch.full((n,), self.frequency),
                            torch.full((n,), self.repetition))
        return x[None]


def _same(got, want):
    """The plugin's tokens (ignore_eos) against the reference's (which stop at an EOS)."""
    assert got[: len(want)] == want and (len(want) == len(got) or want[-1] in EOS_IDS)


def _reference(model, seed, n, rules=None, steps=3, **kw):
    from transformers import LogitsProcessorList

    rules = rules or _Rules(len(PROMPT))
    toks = ref.generate(model, PROMPT, seed, max_new_tokens=n, max_denoising_steps=steps,
                        logits_processor=LogitsProcessorList([rules]), **kw)
    return _cut(toks, n), rules


@pytest.mark.parametrize("steps", [3, 1])
def test_logprobs_are_the_final_steps_raw_log_softmax(llm, model, steps):
    """With one step per canvas, each canvas after the first is ready after the very forward that
    commits the one before it (fused): each canvas's tokens must still carry its own logprobs."""
    o = gen(llm, max_tokens=40, seed=21, logprobs=5, ignore_eos=True,
            extra_args={"diffusion_max_steps": steps})[0]
    want, rules = _reference(model, 21, 40, steps=steps)
    assert list(o.token_ids) == want[:40]
    # the last recorded step of each canvas (the sequence grows by a canvas between them)
    finals = {}
    for length, scores in rules.seen:
        finals[length] = scores
    rows = torch.cat([finals[k] for k in sorted(finals)])  # [canvases * canvas, V]
    lsm = torch.log_softmax(rows.double(), -1)
    assert len(o.logprobs) == len(o.token_ids)
    for j, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
        assert abs(lp[tok].logprob - float(lsm[j, tok])) < 2e-3, j
        assert lp[tok].rank == int((lsm[j] >= lsm[j, tok]).sum())
        top = lsm[j].topk(5)
        alts = {t: v for t, v in lp.items()}
        assert len(alts) in (5, 6)
        assert int(top.indices[0]) in alts
        for t in top.indices[:3].tolist():
            if t in alts:
                assert abs(alts[t].logprob - float(lsm[j, t])) < 2e-3
    if steps != 3:
        return
    # logprobs=0: the token's own only
    o0 = gen(llm, max_tokens=8, seed=21, logprobs=0)[0]
    assert all(len(lp) == 1 for lp in o0.logprobs)


@pytest.mark.parametrize("kw,rules", [
    (dict(presence_penalty=1.5, frequency_penalty=0.8), dict(presence=1.5, frequency=0.8)),
    (dict(repetition_penalty=1.8), dict(repetition=1.8)),
    (dict(logit_bias={33: 6.0, 44: 5.0}), dict(bias={33: 6.0, 44: 5.0})),
    (dict(allowed_token_ids=list(range(51, 90))), dict(allowed=list(range(51, 90)))),  # no EOS id
])
def test_logit_rules_give_the_references_tokens(llm, model, kw, rules):
    plain = list(gen(llm, max_tokens=40, seed=8, ignore_eos=True)[0].token_ids)
    got = list(gen(llm, max_tokens=40, seed=8, ignore_eos=True, **kw)[0].token_ids)
    want, _ = _reference(model, 8, 40, _Rules(len(PROMPT), **rules))
    _same(got, want)
    assert got != plain  # the rule has its effect
    if "allowed_token_ids" in kw:
        assert set(got) <= set(kw["allowed_token_ids"])
    if "logit_bias" in kw:
        assert got.count(33) + got.count(44) > plain.count(33) + plain.count(44)


def test_min_tokens_blocks_stop_ids_until_reached(llm, model):
    # a stop id the unconstrained output commits early
    plain = list(gen(llm, max_tokens=40, seed=8, ignore_eos=True)[0].token_ids)
    stop = plain[3]
    cut = gen(llm, max_tokens=40, seed=8, stop_token_ids=[stop])[0]
    assert len(cut.token_ids) == plain.index(stop) + 1
    o = gen(llm, max_tokens=40, seed=8, stop_token_ids=[stop], min_tokens=20)[0]
    toks = list(o.token_ids)
    assert stop not in toks[:19] and all(t not in EOS_IDS for t in toks[:19])
    assert len(toks) >= 20
    want, _ = _reference(model, 8, 40, _Rules(len(PROMPT), min_tokens=20,
                                                stop_ids=sorted({stop, *EOS_IDS})))
    n = len(toks)
    assert toks == want[:n]


def test_single_token_bad_words_never_appear(llm, model, tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    plain = list(gen(llm, max_tokens=40, seed=8, ignore_eos=True)[0].token_ids)
    words = [w for w in {tok.decode([t]).strip() for t in plain} if w]
    singles = [w for w in words if len(tok.encode(w, add_special_tokens=False)) == 1
               and len(tok.encode(" " + w, add_special_tokens=False)) == 1][:3]
    assert singles
    ids = {tok.encode(w, add_special_tokens=False)[0] for w in singles} | {
        tok.encode(" " + w, add_special_tokens=False)[0] for w in singles}
    got = list(gen(llm, max_tokens=40, seed=8, ignore_eos=True, bad_words=singles)[0].token_ids)
    assert not set(got) & ids and got != plain
    want, _ = _reference(model, 8, 40, _Rules(len(PROMPT), banned=sorted(ids)))
    _same(got, want)


def test_multi_token_bad_words_never_appear(llm):
    from vllm import SamplingParams

    plain = list(gen(llm, max_tokens=48, seed=9, ignore_eos=True)[0].token_ids)
    pairs = [(plain[i], plain[i + 1]) for i in (2, 17, 30)]  # in the first, second, third canvas
    sp = SamplingParams(max_tokens=48, seed=9, ignore_eos=True, extra_args=STEPS)
    sp._bad_words_token_ids = [list(p) for p in pairs]  # token sequences (as vLLM tokenizes words)
    out = llm.generate([{"prompt_token_ids": PROMPT}], sp, use_tqdm=False)[0].outputs[0]
    got = list(out.token_ids)
    seq = PROMPT + got
    for a, b in pairs:
        assert not any(seq[i] == a and seq[i + 1] == b for i in range(len(seq) - 1)), (a, b)
    assert got[:3] == plain[:3]  # the canvas is the same up to the first bad word's end
    assert len(got) == 48


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.6), dict(min_p=0.8),
                                dict(top_k=20, top_p=0.8, min_p=0.02)])
def test_draw_filters_give_the_references_tokens(llm, model, monkeypatch, kw):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig)

    # every position accepts its draw (a large entropy bound): the draws make the canvas
    xa = {**STEPS, "diffusion_entropy_bound": 1e4}
    plain = list(gen(llm, max_tokens=40, seed=4, ignore_eos=True, extra_args=xa)[0].token_ids)
    got = list(gen(llm, max_tokens=40, seed=4, ignore_eos=True, extra_args=xa, **kw)[0].token_ids)
    real = torch.multinomial

    def filtered(probs, num_samples, *a, **k):  # vLLM's rule on the reference's draw
        x = torch.log(probs)
        r = x.shape[0]
        if kw.get("min_p"):
            p = torch.softmax(x, -1)
            x = x.masked_fill(p < p.amax(-1, keepdim=True) * kw["min_p"], float("-inf"))
        x = apply_top_k_top_p_pytorch(
            x, torch.full((r,), kw["top_k"]) if kw.get("top_k") else None,
            torch.full((r,), kw["top_p"]) if kw.get("top_p") else None)
        return real(torch.softmax(x, -1), num_samples, *a, **k)

    monkeypatch.setattr(torch, "multinomial", filtered)
    want, _ = _reference(model, 4, 40, sampler_config=EntropyBoundSamplerConfig(entropy_bound=1e4))
    monkeypatch.setattr(torch, "multinomial", real)
    _same(got, want)
    assert got != plain


def test_n_greater_than_one_is_seeded_and_reproducible(llm):
    a = [list(c.token_ids) for c in gen(llm, max_tokens=20, seed=5, n=3, ignore_eos=True)]
    b = [list(c.token_ids) for c in gen(llm, max_tokens=20, seed=5, n=3, ignore_eos=True)]
    assert a == b and len(a) == 3 and len({tuple(x) for x in a}) == 3
    # child i is the request with seed + i (vLLM's parallel sampling)
    for i in range(3):
        assert a[i] == list(gen(llm, max_tokens=20, seed=5 + i, ignore_eos=True)[0].token_ids)
    # unseeded: three different samples
    c = [tuple(x.token_ids) for x in gen(llm, max_tokens=20, n=3, ignore_eos=True)]
    assert len(set(c)) == 3


def test_unseeded_batch_mixing_filters_and_plain_requests(llm):
    from vllm import SamplingParams

    sps = [SamplingParams(max_tokens=24, ignore_eos=True, extra_args=STEPS, **kw)
           for kw in ({}, {"top_k": 1}, {"top_p": 0.5, "logprobs": 2}, {"repetition_penalty": 2.0},
                      {"allowed_token_ids": [50, 51, 52]})]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * len(sps), sps, use_tqdm=False)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == 24 for t in toks)
    assert set(toks[4]) <= {50, 51, 52}
    assert len(outs[2].outputs[0].logprobs) == 24
