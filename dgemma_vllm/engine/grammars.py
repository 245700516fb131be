"""Grammar matchers compiled with vLLM's own xgrammar backend (worker and front end).

The worker compiles a twin of the engine core's grammar for each constrained request (the
projection walks it); the front end compiles one to check pinned canvas tokens against the
constraint before a request is accepted (validation.py). Both go through vLLM's
``XgrammarBackend.compile_grammar``, so spec, options, tokenizer and stop ids cannot drift.
"""

from __future__ import annotations

from . import vllm_api as V


def backend_for(vllm_config):
    """vLLM's xgrammar backend for the served model (its TokenizerInfo takes a second or two on
    a 262k vocabulary: build once per process)."""
    model_config = vllm_config.model_config
    tok = V.cached_tokenizer_from_config(model_config=model_config)
    return V.XgrammarBackend(vllm_config, tokenizer=tok, vocab_size=model_config.get_vocab_size())


def matcher_for(backend, structured_outputs, stop_token_ids=None):
    """A fresh xgrammar matcher for a request's `structured_outputs`.

    xgrammar 0.2.8: after one structural tag with token formats (the tool-call grammars) has been
    compiled, a second one compiled through the same cache gets wrong token masks (a token the
    mask allows is refused by accept_token, and the reverse; seen with two tool sets in turn).
    Such tags are compiled with the cache cleared before and after; the engine core's copy only
    accepts tokens, which stays right."""
    key = V.get_structured_output_key(structured_outputs)
    tag = key[0] == V.StructuredOutputOptions.STRUCTURAL_TAG
    if tag:
        backend.compiler.clear_cache()
    try:
        return backend.compile_grammar(*key, stop_token_ids=stop_token_ids).matcher
    finally:
        if tag:
            backend.compiler.clear_cache()
