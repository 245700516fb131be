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


def test_ends_request_agrees_with_vllms_check_stop():
    """The rule by which the runner returns a last canvas from its last denoising step (no
    commit pass: the tokens' K/V are never written causally) must be vLLM's own: each random
    case is played through vLLM's ``check_stop`` token by token, as its scheduler does
    (``_update_request_with_output``), and must end the request exactly when ``ends_request``
    says so. A rule that forgot ``max_model_len``, a stop id, or counted the prompt as output
    fails here."""
    import random

    from vllm import SamplingParams
    from vllm.v1.core.sched.utils import check_stop
    from vllm.v1.request import Request

    from dgemma_vllm.engine.plan import check_stop_ids, ends_request

    rng = random.Random(7)
    eos, vocab, seen = 2, 40, set()
    for case in range(600):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 12))]
        done = rng.randrange(0, 20)  # output tokens committed before this canvas
        max_len = len(prompt) + done + rng.randrange(1, 24)
        stops = rng.sample(range(3, vocab), rng.randrange(0, 3))
        max_tokens = done + rng.randrange(1, 24)
        sp = SamplingParams(max_tokens=max_tokens, stop_token_ids=stops,
                            min_tokens=rng.choice([0, 0, max_tokens]))
        if rng.random() < 0.7:
            sp._eos_token_id = eos
        pool = [eos] + stops if rng.random() < 0.4 else []
        ids = [rng.choice(pool) if pool and rng.random() < 0.15 else rng.randrange(3, vocab)
               for _ in range(rng.randrange(1, 17))]
        req = Request(f"r{case}", prompt, sp, None)
        earlier = [rng.randrange(3, vocab) for _ in range(done)]
        req.append_output_token_ids(earlier)
        stopped = False
        for tok in ids:
            req.append_output_token_ids(tok)
            if check_stop(req, max_len):
                stopped = True
                break
        got = ends_request(ids, num_output=done, max_tokens=sp.max_tokens, stops=check_stop_ids(sp),
                           room=max_len - len(prompt) - done)
        assert got == stopped, (case, prompt, done, max_len, sp, ids)
        seen.add(stopped)
    assert seen == {True, False}
