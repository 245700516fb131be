"""Gemma 4's tool-call grammar (dgemma_vllm/refine/tool_calls.py), engine-free.

Every walk the grammar allows, decoded with the factory tokenizer, is read back by vLLM's own
Gemma 4 tool parser as calls of offered tools whose arguments satisfy the tool's JSON schema
(checked with `jsonschema`); what that parser would misread or a schema would forbid is refused.
The served path (required / named / auto through the openai client) is in test_server.py.
"""

from __future__ import annotations

import json
import random

import pytest

from dgemma_vllm.checkpoints.factory import EOS_IDS
from dgemma_vllm.refine.grammar import allowed_ids
from dgemma_vllm.refine.tool_calls import ToolGrammarError, tool_call_tag

TOOLS = {
    "search": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"},
        "lang": {"enum": ["en", "fr"]}, "safe": {"type": "boolean"}},
        "required": ["query"]},
    "move": {"type": "object", "properties": {
        "to": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
               "required": ["x", "y"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "speed": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "meta": {"type": "object"}}},
    "now": None,
}
VOCAB = 512


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def compiled(tok):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
    comp = xgr.GrammarCompiler(info, cache_enabled=False)
    tag = tool_call_tag(list(TOOLS.items()), vocab=tok.get_vocab())
    return comp.compile_structural_tag(json.dumps(tag))


def _matcher(compiled):
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled, override_stop_tokens=list(EOS_IDS))


def _walk(compiled, tok, rng, limit=400):
    """A random walk of the grammar that favours closing tokens (a free walk rarely ends)."""
    m = _matcher(compiled)
    closers = {tok.convert_tokens_to_ids(t) for t in ('<|"|>', "<tool_call|>", "}", "]", ",", ":")}
    out = []
    while not m.is_terminated() and len(out) < limit:
        ids = allowed_ids(m, VOCAB).nonzero().flatten().tolist()
        assert ids, "the grammar allows nothing"
        pref = [t for t in ids if t in closers or t in EOS_IDS]
        t = rng.choice(pref) if pref and rng.random() < 0.3 else rng.choice(ids)
        assert m.accept_token(t), t
        out.append(t)
    return out, m.is_terminated()


def _parse(tok, text):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.gemma4_engine_tool_parser import Gemma4EngineToolParser

    tools = [{"type": "function", "function": {"name": n, "parameters": p or {}}}
             for n, p in TOOLS.items()]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], model="m",
                                tools=tools, tool_choice="required")
    return Gemma4EngineToolParser(tok).extract_tool_calls(text, req)


def test_every_walk_of_the_grammar_is_read_back_as_valid_calls(compiled, tok):
    import jsonschema

    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        ids, done = _walk(compiled, tok, rng)
        assert done, tok.decode(ids, skip_special_tokens=False)[-300:]
        text = tok.decode([t for t in ids if t not in EOS_IDS], skip_special_tokens=False)
        got = _parse(tok, text)
        assert got.tools_called and got.tool_calls, text
        assert not (got.content or "").strip(), text
        for c in got.tool_calls:
            assert c.function.name in TOOLS
            seen.add(c.function.name)
            jsonschema.validate(json.loads(c.function.arguments),
                                TOOLS[c.function.name] or {"type": "object"})
    assert seen == set(TOOLS)  # the walks covered every tool


def _accepts(compiled, tok, text_parts):
    """Whether the grammar accepts the sequence (str: text tokens, int: one token id)."""
    m = _matcher(compiled)
    for part in text_parts:
        ids = [part] if isinstance(part, int) else tok.encode(part, add_special_tokens=False)
        if not all(m.accept_token(t) for t in ids):
            return False
    return True


def test_the_grammar_refuses_what_the_parser_would_misread(compiled, tok):
    v = tok.get_vocab()
    start, end, q = v["<|tool_call>"], v["<tool_call|>"], v['<|"|>']
    ok = [start, "call:search{query:", q, "cats < 3", q, ",limit:7}", end]
    assert _accepts(compiled, tok, ok)
    for bad in ([start, "call:delete{}", end],  # a tool not offered
                [start, "call:search{limit:7}", end],  # a required key missing
                [start, "call:search{query:", q, "x", q, ",limit:", q, "7", q, "}", end],  # type
                ["Sure! ", start, "call:now{}", end],  # text before the call
                [start, "call:search{query:", q, "a<b", q, "}", end],  # '<' could open a marker
                [start, "call:search{query:", q, "a", q, ",query:", q, "b", q, "}", end],
                [start, "call:move{tags:[]}", end],  # minItems 1
                [start, "call:search{query:", q, "a", q, ",lang:", q, "de", q, "}", end]):
        assert not _accepts(compiled, tok, bad), bad


def test_markers_are_single_tokens_not_spelled_in_characters(compiled, tok):
    """The call markers and the quote are tokens of the grammar: the same text spelled in
    characters is refused (the model writes them as the tokens it was trained on; the factory's
    markers are Hugging Face special tokens, as the release's, and decode to their text)."""
    v = tok.get_vocab()
    chars = lambda s: [tok.convert_tokens_to_ids(c) for c in s]  # noqa: E731
    assert all(isinstance(i, int) and i < VOCAB for i in chars("<|tool_call>"))
    assert not _accepts(compiled, tok, chars("<|tool_call>") + ["call:now{}", v["<tool_call|>"]])
    assert not _accepts(compiled, tok, [v["<|tool_call>"], "call:search{query:"] + chars('<|"|>'))


@pytest.mark.parametrize("schema, word", [
    ({"type": "object", "properties": {"x": {"$ref": "#/defs/x"}}}, "$ref"),
    ({"type": "object", "properties": {"x": {"allOf": [{"type": "string"}]}}}, "allOf"),
    ({"type": "object", "properties": {"a:b": {"type": "string"}}}, "a:b"),
    ({"type": "object", "properties": {"x": {"type": "date"}}}, "date"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required"),
])
def test_unsupported_schemas_are_refused_naming_the_problem(schema, word):
    with pytest.raises(ToolGrammarError, match=word.replace("$", r"\$")):
        tool_call_tag([("f", schema)])
    with pytest.raises(ToolGrammarError, match="no tool"):
        tool_call_tag([])
