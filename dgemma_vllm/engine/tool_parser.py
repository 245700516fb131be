"""``--tool-call-parser gemma4`` with required / named tool choice enforced by grammar.

vLLM's own Gemma 4 tool parser parses the model's native call syntax and leaves required / named
tool choice unenforced (its ``adjust_request`` sets no grammar, so the model may answer in prose).
This subclass keeps its parsing (streamed and not) and, for a chat request whose tool_choice is
"required" or names a function, sets ``structured_outputs.structural_tag`` to the grammar of
``refine/tool_calls.py``: one or more calls (one with ``parallel_tool_calls=false``) of an
offered tool, in Gemma 4's syntax, arguments following the tool's schema. The plugin's
constrained refinement then makes every committed canvas satisfy it. "auto" and "none" are
vLLM's (no grammar). Registered over vLLM's ``gemma4`` in the API server process (plugin.py), so
the flags DiffusionGemma users pass (``--enable-auto-tool-choice --tool-call-parser gemma4``)
select it.
"""

from __future__ import annotations

import json

from ..refine.tool_calls import ToolGrammarError, tool_call_tag
from . import vllm_api as V

(_Manager, _Gemma4, _Named, _ChatRequest, _SOParams, _ValidationError) = V.tool_parser_classes()


def forced_tools(request) -> list[tuple[str, dict | None]] | None:
    """The tools a call must name: every offered one for "required", the named one for a named
    choice; None when the request forces no call."""
    tools = request.tools or []
    offered = [(t.function.name, t.function.parameters) for t in tools
               if getattr(t, "function", None) is not None]
    tc = request.tool_choice
    if tc == "required":
        return offered
    if isinstance(tc, _Named):
        named = [(n, p) for n, p in offered if n == tc.function.name]
        if not named:
            raise _ValidationError(f"tool_choice names function {tc.function.name!r}, which is "
                                   f"not among the request's tools", parameter="tool_choice")
        return named
    return None


class DGemmaGemma4ToolParser(_Gemma4):
    def adjust_request(self, request):
        if not isinstance(request, _ChatRequest) or not request.tools:
            return super().adjust_request(request)
        tools = forced_tools(request)
        if tools is None:
            return super().adjust_request(request)
        try:
            tag = tool_call_tag(tools, parallel=request.tool_choice == "required"
                                and request.parallel_tool_calls is not False, vocab=self.vocab)
        except ToolGrammarError as e:
            raise _ValidationError(f"tools: {e}", parameter="tools") from e
        request.structured_outputs = _SOParams(structural_tag=json.dumps(tag))
        request.response_format = None
        request.skip_special_tokens = False  # the call markers are special tokens
        return request


def install() -> None:
    _Manager.register_module("gemma4", force=True, module=DGemmaGemma4ToolParser)
