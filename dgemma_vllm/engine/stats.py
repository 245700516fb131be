"""Per-request refinement statistics, fetched from the workers of an offline ``LLM``."""

from __future__ import annotations


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
    ``canvas_forwards`` (forwards holding canvas rows), ``self_conditioning_calls``, and the
    host seconds summed over engine steps: ``time_forward_s`` (model forwards), ``time_head_s``
    (the canvas head with the per-row updates), ``time_runner_s`` (all the runner's work per step,
    the two above included: input preparation, attention metadata, bookkeeping)."""
    per_worker = llm.collective_rpc("dgemma_runner_stats")
    return per_worker[0] if per_worker else {}
