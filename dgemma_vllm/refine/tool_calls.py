"""Gemma 4's native tool-call syntax as a grammar, for ``tool_choice`` "required" / a named tool.

Gemma 4 writes a call as ``<|tool_call>call:NAME{key:VALUE,...}<tool_call|>``, strings quoted by
the ``<|"|>`` token, numbers, booleans and null bare, objects in braces, arrays in brackets
(vLLM's parser: ``vllm/parser/gemma4.py``). vLLM's Gemma 4 tool parser parses that syntax but
enforces nothing for required / named tool choice (its ``adjust_request`` sets no grammar), and
xgrammar 0.2.8 ships no Gemma 4 structural tag (commented out there because of the ``<|"|>``
string quote). This module writes one: an xgrammar structural tag (a JSON value for vLLM's
``structured_outputs.structural_tag``) whose arguments follow each tool's JSON schema. The call
markers and the quote are matched as single tokens (``{"type": "token"}``, by id), never spelled
in characters, so the model writes them as it was trained to. (xgrammar 0.2.8 refuses ids it
counts special, those that decode to nothing; Gemma 4's markers, Hugging Face special tokens,
decode to their text, as the factory's do.)

Written by hand because no library has it (xgrammar's JSON-schema converter emits JSON syntax).
Plain Python, no vLLM.

What a schema can say, and what it becomes (anything else is refused with ``ToolGrammarError``,
a 400 naming the tool and the keyword):
- ``type`` string / integer / number / boolean / null / object / array, or a list of them;
- ``enum`` and ``const`` (each value written in Gemma's syntax), ``anyOf`` / ``oneOf``;
- objects: ``properties`` in the schema's order, those in ``required`` always written, the others
  optional; no other keys (an object without ``properties`` takes any keys and values, nested up
  to ``FREE_DEPTH`` levels);
- arrays: ``items`` (any value without it), ``minItems`` 0 or more;
- integers up to 18 digits, numbers up to 16 digits before and after the point and a two-digit
  exponent;
- strings: ``enum``; otherwise any text in which ``<`` is followed only by a space, ``=`` or a
  digit (every Gemma 4 marker the parser looks for, the quote included, starts with ``<``: none
  can appear inside a value, as a token or spelled in characters); ``pattern``, ``format`` and
  lengths are not enforced (said in the README).
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
QUOTE = '<|"|>'
FREE_DEPTH = 2  # nesting levels a schema-free object or array value may use

# Bare values, as vLLM's parser reads them back (it stops a bare value at , } or ] and coerces it
# to the schema's type): integers within int64, numbers within a float's range (a longer digit
# string or exponent would overflow to inf, which the coercion refuses and leaves a string).
_INTEGER = r"-?(0|[1-9][0-9]{0,17})"
_NUMBER = r"-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,16})?([eE][+-]?[0-9]{1,2})?"
_TEXT = r"([^<]|<[ =0-9])*"
_KEY = r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}"

_UNSUPPORTED = ("$ref", "allOf", "not", "if", "then", "else", "patternProperties",
                "dependentSchemas", "prefixItems", "contains")


class ToolGrammarError(ValueError):
    """A tool's schema uses something the Gemma 4 call grammar cannot express."""


def _const(s: str) -> dict:
    return {"type": "const_string", "value": s}


def _token(t: str) -> dict:
    return {"type": "token", "token": t}


def _regex(p: str) -> dict:
    return {"type": "regex", "pattern": p}


def _seq(*els: dict) -> dict:
    els = [e for e in els if e is not None]
    return els[0] if len(els) == 1 else {"type": "sequence", "elements": els}


def _or(els: list[dict]) -> dict:
    return els[0] if len(els) == 1 else {"type": "or", "elements": els}


def _opt(e: dict) -> dict:
    return {"type": "optional", "content": e}


def _star(e: dict) -> dict:
    return {"type": "star", "content": e}


def _string_literal(s: str) -> dict:
    return _seq(_token(QUOTE), _const(s), _token(QUOTE)) if s else _seq(_token(QUOTE), _token(QUOTE))


def _literal(v: Any, where: str) -> dict:
    """One enum / const value in Gemma's syntax."""
    if isinstance(v, str):
        if QUOTE in v:
            raise ToolGrammarError(f"{where}: an enum value contains the string quote {QUOTE}")
        return _string_literal(v)
    if isinstance(v, bool) or v is None:
        return _const(json.dumps(v))
    if isinstance(v, (int, float)):
        return _const(json.dumps(v))
    raise ToolGrammarError(f"{where}: enum/const values must be strings, numbers, booleans or "
                           f"null, got {type(v).__name__}")


def _free_object(depth: int) -> dict:
    """An object with any keys, its values nested up to `depth` more levels."""
    pair = _seq(_regex(_KEY), _const(":"), _free(depth - 1))
    return _seq(_const("{"), _opt(_seq(pair, _star(_seq(_const(","), pair)))), _const("}"))


def _free(depth: int) -> dict:
    """Any value (a schema that says nothing), objects and arrays nested up to `depth` levels."""
    scalars = [_seq(_token(QUOTE), _regex(_TEXT), _token(QUOTE)), _regex(_NUMBER),
               _const("true"), _const("false"), _const("null")]
    if depth <= 0:
        return _or(scalars)
    inner = _free(depth - 1)
    arr = _seq(_const("["), _opt(_seq(inner, _star(_seq(_const(","), inner)))), _const("]"))
    return _or(scalars + [_free_object(depth), arr])


def _key_value(key: str, schema: dict, where: str, depth: int) -> dict:
    if not key or any(c in key for c in ':{}[],<"') or key != key.strip():
        raise ToolGrammarError(f"{where}: property name {key!r} cannot be written in Gemma 4's "
                               f"call syntax (no : {{ }} [ ] , < \" or outer spaces)")
    return _seq(_const(key + ":"), value_format(schema, f"{where}.{key}", depth))


def _object(schema: dict, where: str, depth: int) -> dict:
    props = schema.get("properties") or {}
    if not isinstance(props, dict):
        raise ToolGrammarError(f"{where}: 'properties' must be an object")
    required = schema.get("required") or []
    unknown = [k for k in required if k not in props]
    if unknown:
        raise ToolGrammarError(f"{where}: required properties {unknown} are not in 'properties'")
    if not props:
        return _free_object(FREE_DEPTH)
    kv = {k: _key_value(k, s if isinstance(s, dict) else {}, where, depth + 1)
          for k, s in props.items()}
    req = [k for k in props if k in required]
    opt = [k for k in props if k not in required]
    comma = _const(",")
    if req:  # the required keys in order, then each optional one may follow
        body = [kv[req[0]]] + [_seq(comma, kv[k]) for k in req[1:]]
        body += [_opt(_seq(comma, kv[k])) for k in opt]
        inner = _seq(*body)
    else:  # nothing required: any subsequence of the optional keys (in order), also none
        firsts = [_seq(kv[k], *[_opt(_seq(comma, kv[j])) for j in opt[i + 1:]])
                  for i, k in enumerate(opt)]
        inner = _opt(_or(firsts))
    return _seq(_const("{"), inner, _const("}"))


def _array(schema: dict, where: str, depth: int) -> dict:
    items = schema.get("items")
    item = value_format(items, f"{where}[]", depth + 1) if isinstance(items, dict) and items \
        else _free(FREE_DEPTH - 1)
    more = _star(_seq(_const(","), item))
    n_min = int(schema.get("minItems", 0) or 0)
    if n_min > 8:
        raise ToolGrammarError(f"{where}: minItems {n_min} above 8 is not supported")
    head = [item] + [_seq(_const(","), item) for _ in range(max(n_min - 1, 0))]
    body = _seq(*head, more) if n_min >= 1 else _opt(_seq(item, more))
    return _seq(_const("["), body, _const("]"))


def value_format(schema: Any, where: str = "arguments", depth: int = 0) -> dict:
    """The structural-tag format of one value described by the JSON `schema`."""
    if schema is True or schema == {} or schema is None:
        return _free(FREE_DEPTH)
    if not isinstance(schema, dict):
        raise ToolGrammarError(f"{where}: a schema must be an object")
    if depth > 16:
        raise ToolGrammarError(f"{where}: nested deeper than 16 levels")
    for k in _UNSUPPORTED:
        if k in schema:
            raise ToolGrammarError(f"{where}: JSON schema keyword {k!r} is not supported for "
                                   f"Gemma 4 tool calls by dgemma_vllm")
    if "const" in schema:
        return _literal(schema["const"], where)
    if "enum" in schema:
        vals = schema["enum"]
        if not isinstance(vals, list) or not vals:
            raise ToolGrammarError(f"{where}: 'enum' must be a non-empty list")
        return _or([_literal(v, where) for v in vals])
    for k in ("anyOf", "oneOf"):
        if k in schema:
            subs = schema[k]
            if not isinstance(subs, list) or not subs:
                raise ToolGrammarError(f"{where}: {k!r} must be a non-empty list")
            return _or([value_format(s, where, depth) for s in subs])
    t = schema.get("type")
    if isinstance(t, list):
        return _or([value_format({**schema, "type": x}, where, depth) for x in t])
    if t is None:
        if "properties" in schema:
            t = "object"
        elif "items" in schema:
            t = "array"
        else:
            return _free(FREE_DEPTH)
    if t == "string":
        return _seq(_token(QUOTE), _regex(_TEXT), _token(QUOTE))
    if t == "integer":
        return _regex(_INTEGER)
    if t == "number":
        return _regex(_NUMBER)
    if t == "boolean":
        return _or([_const("true"), _const("false")])
    if t == "null":
        return _const("null")
    if t == "object":
        return _object(schema, where, depth)
    if t == "array":
        return _array(schema, where, depth)
    raise ToolGrammarError(f"{where}: unknown JSON schema type {t!r}")


def call_format(name: str, parameters: dict | None) -> dict:
    """One call of tool `name`: ``<|tool_call>call:NAME{...}<tool_call|>``."""
    if not name or any(c in name for c in "{}(<: "):
        raise ToolGrammarError(f"tool name {name!r} cannot be written in Gemma 4's call syntax")
    params = parameters or {"type": "object", "properties": {}}
    if (params.get("type", "object") == "object" and "properties" in params
            and not params["properties"] and not params.get("required")):
        args = _const("{}")  # declared without parameters
    else:
        args = value_format(params, f"tool {name!r}")
    return _seq(_token(TOOL_CALL_START), _const(f"call:{name}"), args, _token(TOOL_CALL_END))


def resolve_tokens(node: Any, vocab: dict[str, int]) -> Any:
    """`node` with each token format's marker string replaced by its id in `vocab` (vLLM
    validates a structural tag without a tokenizer, and xgrammar resolves token strings only
    with one); a marker the vocabulary lacks as one token becomes its text."""
    if isinstance(node, list):
        return [resolve_tokens(x, vocab) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "token" and isinstance(node.get("token"), str):
        tid = vocab.get(node["token"])
        return {"type": "token", "token": tid} if tid is not None else _const(node["token"])
    return {k: resolve_tokens(v, vocab) for k, v in node.items()}


def tool_call_tag(tools: list[tuple[str, dict | None]], parallel: bool = True,
                  vocab: dict[str, int] | None = None) -> dict:
    """The structural tag for tool_choice "required" (`tools`: every offered tool) or a named
    tool (`tools`: that one): at least one call of an offered tool, several in a row when
    `parallel`, and nothing else (the grammar is complete after the last call; the model ends
    its turn with a stop id). With `vocab`, the markers are token ids (``resolve_tokens``)."""
    if not tools:
        raise ToolGrammarError("tool_choice requires a call but no tool is offered")
    one = _or([call_format(n, p) for n, p in tools])
    fmt = {"type": "plus", "content": one} if parallel else one
    tag = {"type": "structural_tag", "format": fmt}
    return resolve_tokens(tag, vocab) if vocab is not None else tag
