"""Structured outputs by grammar projection of committed canvases (issue 17, first part).

Engine-free: the projection walk (dgemma_vllm/refine/grammar.py) on xgrammar matchers compiled
with vLLM's own xgrammar backend for the factory tokenizer. Engine: JSON schema, regex, choice,
EBNF grammar and json_object requests on the tiny checkpoint: the committed text always satisfies
the constraint, the request stops when the grammar is complete, too few max_tokens end with
"length" and a valid prefix; unconstrained requests in the same batch are unchanged.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import start_llm, stop_llm

PROMPT = [9, 30, 41, 77, 120, 7, 8]
STEPS = {"diffusion_max_steps": 3}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    engine = start_llm(tiny_ckpt, max_model_len=512)
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def compiler(tiny_ckpt):
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=512)
    return tok, xgr.GrammarCompiler(info)


def test_projection_makes_any_canvas_valid(compiler):
    import xgrammar as xgr

    from dgemma_vllm.refine.grammar import advance, allowed_ids, project

    tok, comp = compiler
    g = comp.compile_regex(r"[a-z]{3,8}-\d{2,4}")
    m = xgr.GrammarMatcher(g, terminate_without_stop_token=False)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 512, generator=gen)
    canvas = logits.argmax(-1).tolist()
    order = logits.argsort(-1, descending=True)
    out, replaced = project(m, canvas, lambda i: order[i, :4].tolist(),
                            lambda i, ok: int(logits[i].masked_fill(~ok, float("-inf")).argmax()), 512)
    assert replaced > 0
    # the committed tokens advance a fresh matcher to completion (the stop id included)
    m2 = xgr.GrammarMatcher(g, terminate_without_stop_token=False)
    advance(m2, out)
    assert m2.is_terminated()
    assert re.fullmatch(r"[a-z]{3,8}-\d{2,4}", tok.decode(out[:_stop_index(m, out)]))
    # each replaced position took the best id the grammar allowed there
    m3 = xgr.GrammarMatcher(g, terminate_without_stop_token=False)
    for i, t in enumerate(out):
        if m3.is_terminated():
            break
        ok = allowed_ids(m3, 512)
        assert ok[t]
        if t != canvas[i]:
            assert t == int(logits[i].masked_fill(~ok, float("-inf")).argmax())
        assert m3.accept_token(t)
    # a canvas that is already valid comes back unchanged
    again, n = project(m, out, lambda i: [], lambda i, ok: 0, 512)
    assert again == out and n == 0


def _stop_index(matcher, tokens):
    m = matcher.fork()
    for i, t in enumerate(tokens):
        if m.is_terminated():
            return i - 1
        m.accept_token(t)
    return len(tokens)


def _so(**kw):
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**kw)


def gen(llm, **kw):
    from vllm import SamplingParams

    kw.setdefault("extra_args", STEPS)
    return llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_parses_and_validates(llm, seed):
    import jsonschema

    o = gen(llm, max_tokens=200, seed=seed, structured_outputs=_so(json=SCHEMA))
    assert o.finish_reason == "stop", (o.text, o.finish_reason)
    # strict=False: xgrammar's TokenizerInfo reads a few of the factory tokenizer's byte tokens
    # as other bytes, so a control character can appear inside a string (vLLM's own engine-core
    # matcher accepted the same tokens: a tokenizer/xgrammar matter, not the projection's)
    data = json.loads(o.text, strict=False)
    jsonschema.validate(data, SCHEMA)


def test_regex_choice_grammar_and_json_object(llm):
    o = gen(llm, max_tokens=60, seed=4, structured_outputs=_so(regex=r"(yes|no), [a-z]{2,6}\."))
    assert o.finish_reason == "stop" and re.fullmatch(r"(yes|no), [a-z]{2,6}\.", o.text), o.text
    o = gen(llm, max_tokens=30, seed=5, structured_outputs=_so(choice=["alpha", "beta", "gamma"]))
    assert o.text in ("alpha", "beta", "gamma") and o.finish_reason == "stop"
    ebnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    o = gen(llm, max_tokens=60, seed=6, structured_outputs=_so(grammar=ebnf))
    assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", o.text) and o.finish_reason == "stop", o.text
    o = gen(llm, max_tokens=120, seed=7, structured_outputs=_so(json_object=True))
    assert isinstance(json.loads(o.text, strict=False), dict) and o.finish_reason == "stop"


def test_too_few_tokens_end_with_length_and_a_valid_prefix(llm):
    o = gen(llm, max_tokens=5, seed=1, structured_outputs=_so(json=SCHEMA))
    assert o.finish_reason == "length" and len(o.token_ids) == 5
    assert o.text.startswith("{")


def test_seeded_constrained_requests_are_reproducible_and_batch_with_plain_ones(llm):
    from vllm import SamplingParams

    from dgemma_vllm.engine.stats import runner_stats

    a = gen(llm, max_tokens=100, seed=11, structured_outputs=_so(json=SCHEMA))
    plain = gen(llm, max_tokens=40, seed=12, ignore_eos=True)
    sps = [SamplingParams(max_tokens=100, seed=11, structured_outputs=_so(json=SCHEMA), extra_args=STEPS),
           SamplingParams(max_tokens=40, seed=12, ignore_eos=True, extra_args=STEPS),
           SamplingParams(max_tokens=60, structured_outputs=_so(regex=r"[a-c]{5,9}"), extra_args=STEPS)]
    before = runner_stats(llm)
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": PROMPT}] * 3, sps, use_tqdm=False)]
    after = runner_stats(llm)
    assert outs[0].text == a.text and list(outs[1].token_ids) == list(plain.token_ids)
    # steps with a constrained request keep vLLM's second RPC (sample_tokens with the grammar
    # bitmask argument); the one-RPC step (worker.py) is for steps without one
    steps = after["engine_steps"] - before["engine_steps"]
    assert 0 <= after["one_rpc_steps"] - before["one_rpc_steps"] < steps, (before, after)
    assert re.fullmatch(r"[a-c]{5,9}", outs[2].text), outs[2].text


def test_malformed_constraints_are_refused_and_the_engine_serves_on(llm):
    from vllm.exceptions import VLLMValidationError

    for so in [_so(json={"type": "objekt"}), _so(regex="(unclosed"), _so(grammar="root ::= ")]:
        with pytest.raises((ValueError, VLLMValidationError)):
            gen(llm, max_tokens=20, seed=0, structured_outputs=so)
    assert len(gen(llm, max_tokens=8, seed=0).token_ids) > 0


def test_guided_steps_project_the_draft_and_feed_back_only_accepted_positions():
    """apply_steps with a guide (diffusion_grammar_every_step): the projected argmax is the
    step's draft; accepted positions whose argmax changed take the projected token, renoised
    ones keep their noise, pinned ones their seed token; the generator stream is untouched."""
    from dgemma_vllm.refine.params import DiffusionParams
    from dgemma_vllm.refine.sampler import CanvasState, apply_steps

    def run(guide):
        st = CanvasState(params=DiffusionParams(max_steps=4, entropy_bound=0.35).validate(),
                         vocab_size=50, generator=torch.Generator().manual_seed(0))
        st.start_canvas(6, seed=torch.tensor([[7, 7, 7, 7, 7, 9]]), pins=torch.tensor([5]))
        st.guide = guide
        den = torch.tensor([10, 11, 12, 13, 14, 15])
        am = torch.tensor([20, 21, 22, 23, 24, 25])
        ent = torch.tensor([0.1, 0.1, 0.1, 5.0, 5.0, 0.1])  # rows 3, 4 renoised (bound 0.35)
        gen = torch.Generator().manual_seed(1)
        apply_steps([st], den, am, ent, gen)
        return st, torch.rand(1, generator=gen)

    plain, r0 = run(None)
    proj = torch.tensor([20, 30, 22, 33, 24, 35])  # changes rows 1 (accepted), 3 (renoised), 5 (pin)
    guided, r1 = run(lambda am: proj.clone())
    assert guided.argmax[0].tolist() == proj.tolist()
    want = plain.canvas[0].clone()
    want[1] = 30  # accepted and changed: fed back; row 3 keeps its noise, row 5 its seed
    assert guided.canvas[0].tolist() == want.tolist() and want[5] == 9
    assert torch.equal(r0, r1)


def test_grammar_every_step_stays_valid_and_is_refused_without_a_constraint(llm):
    from vllm.exceptions import VLLMValidationError

    xargs = {**STEPS, "diffusion_grammar_every_step": True}
    for seed in (2, 3):
        o = gen(llm, max_tokens=100, seed=seed, structured_outputs=_so(json=SCHEMA), extra_args=xargs)
        assert o.finish_reason == "stop"
        data = json.loads(o.text, strict=False)
        assert set(data) == {"name", "age"} and isinstance(data["age"], int)
    o = gen(llm, max_tokens=60, seed=4, structured_outputs=_so(regex=r"[a-c]{5,40}\."), extra_args=xargs)
    assert re.fullmatch(r"[a-c]{5,40}\.", o.text), o.text
    with pytest.raises((ValueError, VLLMValidationError), match="diffusion_grammar_every_step"):
        gen(llm, max_tokens=8, seed=0, extra_args=xargs)


def test_pins_that_contradict_the_constraint_are_refused(llm, tiny_ckpt):
    """Pinned tokens at the start of the first canvas must be a start the grammar allows (400
    otherwise, the engine serves on); allowed ones are kept."""
    from transformers import AutoTokenizer
    from vllm.exceptions import VLLMValidationError

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    a, z = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("z")
    canvas = [a] * 16
    so = _so(regex=r"[a-c]{3,20}\.")
    for pinned_start in ([z], [a, z]):
        seed = list(canvas)
        seed[: len(pinned_start)] = pinned_start
        xargs = {**STEPS, "diffusion_seed_canvas": seed, "diffusion_pinned": list(range(len(pinned_start)))}
        with pytest.raises((ValueError, VLLMValidationError), match="diffusion_pinned"):
            gen(llm, max_tokens=30, seed=0, structured_outputs=so, extra_args=xargs)
    xargs = {**STEPS, "diffusion_seed_canvas": canvas, "diffusion_pinned": [0, 1, 5]}
    o = gen(llm, max_tokens=30, seed=0, structured_outputs=so, extra_args=xargs)
    assert re.fullmatch(r"[a-c]{3,20}\.", o.text) and o.text.startswith("aa"), o.text
