"""Grammar projection of a committed canvas (structured outputs), engine-free.

A canvas is refined in parallel, so no per-position grammar mask exists while it denoises (the
positions before a token are not decided yet). What is committed is made valid instead: the
canvas chosen for commit is walked left to right on a fork of the request's grammar matcher (the
state after every token committed so far); a token the grammar accepts is kept, otherwise the
position takes the best token it allows under the final denoising step's logits (the row's
``top`` ids first, else one row's exact masked argmax). Within the canvas the trajectory, the
draws and the stopping are those of the unconstrained request; only the committed tokens
differ where they had to. When the grammar is complete the walk stops at a stop id the grammar
allows there (vLLM's ``check_stop`` then ends the request with finish_reason "stop"); a canvas
that ends before it leaves a valid prefix to continue from.

The matcher is xgrammar's ``GrammarMatcher`` (vLLM compiles it with its own xgrammar backend,
``engine/runner.py``); this module needs only ``fork``, ``accept_token``, ``is_terminated`` and
``fill_next_token_bitmask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


def allowed_ids(matcher, vocab: int) -> torch.Tensor:
    """The ids `matcher` accepts next, as a ``[vocab]`` bool tensor."""
    import xgrammar as xgr

    bm = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bm)
    bits = bm[0].numpy().view(np.uint32)
    mask = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool).reshape(-1)
    return torch.from_numpy(mask[:vocab].copy())


def project(matcher, canvas: Sequence[int], top: Callable[[int], Sequence[int]],
            exact: Callable[[int, torch.Tensor], int], vocab: int,
            fixed: Sequence[int] = ()) -> tuple[list[int], int]:
    """The committed `canvas` made grammar-valid from `matcher`'s state (not changed: the walk
    runs on a fork). ``top(i)``: position i's best ids, best first; ``exact(i, allowed)``: its
    best id among ``allowed`` (a ``[vocab]`` bool tensor). `fixed` positions (pins) are kept only
    where the grammar allows them. Returns (tokens, replaced positions)."""
    m = matcher.fork()
    out = [int(t) for t in canvas]
    replaced = 0
    fixed = set(fixed)
    for i, tok in enumerate(out):
        if m.is_terminated():  # complete: the tokens after the stop id are cut by check_stop
            break
        if m.accept_token(tok):
            continue
        replaced += 1
        for alt in top(i) if i not in fixed else ():
            if alt != tok and m.accept_token(int(alt)):
                out[i] = int(alt)
                break
        else:
            allowed = allowed_ids(m, vocab)
            if not bool(allowed.any()):
                raise RuntimeError(f"structured output: the grammar allows no token at canvas "
                                   f"position {i}")
            alt = int(exact(i, allowed))
            if not m.accept_token(alt):
                raise RuntimeError(f"structured output: the masked argmax {alt} was refused")
            out[i] = alt
    return out, replaced


def valid_prefix(matcher, tokens: Sequence[int]) -> int:
    """How many leading `tokens` the grammar accepts from `matcher`'s state (on a fork), the
    stop id that completes it not counted (it ends the output, it is not text): a streamed draft
    of a constrained request shows only that prefix, so every draft is a prefix of a valid output
    (a draft is not projected unless diffusion_grammar_every_step: its positions have no final
    logits yet)."""
    m = matcher.fork()
    for i, t in enumerate(tokens):
        if not m.accept_token(int(t)) or m.is_terminated():
            return i
    return len(tokens)


def advance(matcher, tokens: Sequence[int]) -> None:
    """Advance the request's matcher by committed `tokens` (they are valid: projected); tokens
    after termination are the ones check_stop cuts."""
    for t in tokens:
        if matcher.is_terminated():
            return
        if not matcher.accept_token(int(t)):
            raise RuntimeError(f"structured output: committed token {t} refused by the grammar")


@dataclass
class ReasoningGate:
    """With a reasoning parser, a constraint applies only after the reasoning section, as vLLM
    does for autoregressive requests (``StructuredOutputManager._get_constraint_bounds``,
    v1/structured_output/__init__.py:231): from the start once the reasoning has ended (latched),
    otherwise from the first reasoning-end token of a committed canvas: after it when the token
    only closes the reasoning (``<channel|>``), at it when the token is content as well (a
    ``<|tool_call>`` that opens a call). `find_end` is the reasoner's own ``find_reasoning_end``
    (vLLM's parser instance for the request, built with the request's parser arguments)."""

    ended: bool
    find_end: Callable[[Sequence[int]], object]  # -> ReasoningEnd(offset, implicit) | None

    def grammar_start(self, canvas: Sequence[int]) -> int | None:
        """Where the grammar starts in the committed `canvas`; None when it is all reasoning."""
        if self.ended:
            return 0
        end = self.find_end(list(canvas))
        if end is None or end[0] >= len(canvas):
            return None
        offset, implicit = end[0], end[1]
        return offset if implicit else offset + 1


def grammar_start(gate: ReasoningGate | None, canvas: Sequence[int]) -> int | None:
    """Where the grammar starts in `canvas` (0 without a reasoning gate; None: all reasoning)."""
    return 0 if gate is None else gate.grammar_start(canvas)
