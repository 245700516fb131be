"""The runner's step plan (dgemma_vllm/engine/plan.py), without vLLM: a mixed batch of prefill
chunks, new and older canvases, a commit, a fused commit, a last commit, partial canvases and a
failed request, with the causal flags, the fused split and the head's canvas entries that follow."""

from __future__ import annotations

from dgemma_vllm.engine.plan import (COMMIT, DENOISE, FUSED, IDLE, LAST, PREFILL, RowView,
                                     plan_row, plan_step)

C = 16


def test_mixed_batch_plan():
    views = [
        RowView("prefill", drafts=0),
        RowView("new", drafts=C, next_canvas=C),  # its first canvas
        RowView("older", drafts=C, canvas=C),  # a canvas past its first step
        RowView("commit", drafts=C, canvas=C, commit=C),  # fusion off, or no budget for both
        RowView("fused", drafts=C + 12, canvas=C, commit=C, after_commit=12),
        RowView("last", drafts=1, canvas=C, commit=C),  # the commit that ends the request
        RowView("partial", drafts=5, next_canvas=C),  # cut by the token budget
        RowView("failed", drafts=C, canvas=C, failed=True),
        RowView("short", drafts=7, next_canvas=7),  # a shorter canvas (knob or room)
    ]
    plan = plan_step(views)
    modes = [(r.req_id, r.mode, r.n) for r in plan.rows]
    assert modes == [("prefill", PREFILL, 0), ("new", DENOISE, C), ("older", DENOISE, C),
                     ("commit", COMMIT, C), ("fused", FUSED, 12), ("last", LAST, 1),
                     ("partial", IDLE, 5), ("failed", IDLE, C), ("short", DENOISE, 7)]
    assert [r.start_canvas for r in plan.rows][:3] == [False, True, False]
    assert plan.causal == [1, 0, 0, 1, 0, 1, 1, 1, 0]
    assert plan.split == {4: C}
    assert plan.needs_attention_flags and not plan.denoise_only
    assert plan.canvas_entries() == [("new", 1, 0, C), ("older", 2, C, C), ("fused", 4, 2 * C, 12),
                                     ("short", 8, 2 * C + 12, 7)]


def test_fused_request_without_the_room_the_scheduler_assumed_is_idle():
    assert plan_row(RowView("r", drafts=C + 12, canvas=C, commit=C, after_commit=10)).mode == IDLE


def test_plans_of_prefill_only_and_denoise_only_batches():
    p = plan_step([RowView("a", drafts=0), RowView("b", drafts=0)])
    assert not p.needs_attention_flags and p.causal == [1, 1] and p.split == {}
    p = plan_step([RowView("a", drafts=C, canvas=C), RowView("b", drafts=C, next_canvas=C)])
    assert p.denoise_only and p.causal == [0, 0]
    assert not plan_step([]).denoise_only


def test_one_position_canvas_commits_in_one_row():
    r = plan_row(RowView("r", drafts=1, canvas=1, commit=1))
    assert (r.mode, r.n) == (COMMIT, 1)
