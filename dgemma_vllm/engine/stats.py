"""Helpers for driving an offline ``LLM`` from benchmarks and tests: refinement statistics
fetched from its workers, and a scoped environment for the engine processes it spawns."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def engine_env(**values: str):
    """Set environment variables for the block (an ``LLM`` built inside it spawns its engine
    processes with them), then restore each to its previous value or absence."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def request_stats(llm) -> dict[str, dict]:
    """``{user request id: {"canvases", "denoising_steps", "committed_hash"}}`` from rank 0's runner.

    vLLM suffixes user request ids internally (``"3" -> "3-1a2b3c4d"``); the suffix is removed."""
    per_worker = llm.collective_rpc("dgemma_request_stats")
    stats = per_worker[0] if per_worker else {}
    return {rid.rsplit("-", 1)[0]: s for rid, s in stats.items()}


def runner_stats(llm) -> dict:
    """Rank 0's runner counters: ``engine_steps`` (forwards that reached sampling) and
    ``inner_steps`` (extra denoising forwards run inside an engine step), ``fused_commits``
    (commits run in one forward with the next canvas's first denoising step), ``last_commits``
    (commits that ended their request, run as one row), ``head_rows`` (rows the vocabulary head
    ran on), ``commit_rows`` (committed-token rows run through the model, no head),
    ``canvas_forwards`` (forwards holding canvas rows), ``one_rpc_steps`` (engine steps sampled
    inside ``execute_model``: one RPC instead of two, worker.py), ``self_conditioning_calls``, and the
    host seconds summed over engine steps: ``time_forward_s`` (model forwards), ``time_head_s``
    (the canvas head with the per-row updates), ``time_runner_s`` (all the runner's work per step,
    the two above included: input preparation, attention metadata, bookkeeping)."""
    per_worker = llm.collective_rpc("dgemma_runner_stats")
    return per_worker[0] if per_worker else {}
