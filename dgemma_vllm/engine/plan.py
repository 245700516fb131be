"""The runner's per-step decisions as one plain value, built by a pure function.

For every row of vLLM's input batch the runner describes what it knows (``RowView``: the drafts
the scheduler gave it, where its tokens end, the state of its canvas); ``plan_step`` turns the
rows into a ``StepPlan``: each row's mode (prefill chunk, denoising step, commit, fused commit +
next canvas, last commit, or idle), its canvas rows, its causal flag and, for a fused commit, how
many committed rows precede the canvas. No vLLM, no tensors: the runner applies the plan
(``runner.DGemmaRunnerMixin``) and the attention metadata, the head and the returned tokens read
it (tests/test_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREFILL, DENOISE, COMMIT, IDLE = "prefill", "denoise", "commit", "idle"
FUSED = "fused"  # a commit and the first denoising step of the next canvas, in one forward
LAST = "last"  # the commit that ends the request: one row computed, all its tokens returned


@dataclass(frozen=True)
class RowView:
    """What the planner needs to know of one row of the input batch."""

    req_id: str
    drafts: int  # draft positions the scheduler gave the row (0: a prefill chunk)
    canvas: int = 0  # rows of its current canvas (0: none started)
    commit: int = 0  # tokens of its canvas ready to commit (0: none)
    next_canvas: int = 0  # canvas positions a new canvas gets now (request knob, room left)
    after_commit: int = 0  # canvas positions of the canvas after committing its `commit` tokens
    failed: bool = False  # ended with an error earlier in this step


@dataclass(frozen=True)
class RowPlan:
    req_id: str
    mode: str
    n: int  # canvas rows (DENOISE, FUSED), committed rows (COMMIT), 1 (LAST), drafts (IDLE)
    committed: int = 0  # FUSED: committed rows ahead of the canvas rows
    start_canvas: bool = False  # DENOISE: the row starts a new canvas of n positions

    @property
    def causal(self) -> int:
        """The row's attention flag (a FUSED row: its committed half causal, see split)."""
        return 0 if self.mode in (DENOISE, FUSED) else 1

    @property
    def has_canvas(self) -> bool:
        return self.mode in (DENOISE, FUSED)


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[RowPlan, ...] = field(default_factory=tuple)

    @property
    def causal(self) -> list[int]:
        return [r.causal for r in self.rows]

    @property
    def split(self) -> dict[int, int]:
        """Fused rows: row -> committed rows ahead of its canvas (two attention sequences)."""
        return {i: r.committed for i, r in enumerate(self.rows) if r.mode == FUSED}

    @property
    def needs_attention_flags(self) -> bool:
        """Whether the attention metadata needs the per-row flags (any canvas row)."""
        return any(r.has_canvas for r in self.rows)

    @property
    def denoise_only(self) -> bool:
        return bool(self.rows) and all(r.mode == DENOISE for r in self.rows)

    def canvas_entries(self) -> list[tuple[str, int, int, int]]:
        """(req_id, row, offset among the canvas rows handed to the head, rows) per canvas."""
        out, off = [], 0
        for i, r in enumerate(self.rows):
            if r.has_canvas:
                out.append((r.req_id, i, off, r.n))
                off += r.n
        return out


def check_stop_ids(sp) -> set[int]:
    """The ids on which vLLM's ``check_stop`` ends a request: its sampling parameters'
    ``stop_token_ids`` and ``eos_token_id`` (None under ``ignore_eos``)."""
    stops = set(sp.stop_token_ids or ())
    if sp.eos_token_id is not None:
        stops.add(sp.eos_token_id)
    return stops


def ends_request(ids, *, num_output: int, max_tokens: int | None, stops, room: int) -> bool:
    """Whether committing `ids` ends the request, by the rules of vLLM's ``check_stop``
    (v1/core/sched/utils.py): ``max_tokens`` reached (`num_output`: output tokens committed so
    far), EOS or a stop id among them (`stops`; vLLM checks them before ``min_tokens``, which the
    canvas's logit edits enforce), or no room left under max_model_len (`room`: positions left
    before committing). Stop strings and repetition detection are not foreseen: a request they end
    just ran the canvas rows of one more forward. The scheduler (one row for a commit that ends
    its request) and the runner (a last canvas returned by its last denoising step) both decide by
    it; a wrong True would leave committed tokens without their causal K/V."""
    if max_tokens is not None and num_output + len(ids) >= max_tokens:
        return True
    if not set(stops).isdisjoint(ids):
        return True
    return room - len(ids) <= 0


def plan_row(v: RowView) -> RowPlan:
    """One row's decision; see the module doc. A row whose drafts are not what its state calls
    for (a partial canvas cut by the token budget, a fused request without room) is IDLE: it
    computes nothing useful and the scheduler rolls its drafts back."""
    if v.drafts == 0:
        return RowPlan(v.req_id, PREFILL, 0)
    if v.failed:
        return RowPlan(v.req_id, IDLE, v.drafts)
    if v.commit and v.drafts > v.commit:
        # commit + the next canvas's first denoising step in one forward (the scheduler asked
        # for both): the committed rows causal, the canvas after them bidirectional
        m = v.drafts - v.commit
        if m != v.after_commit:
            return RowPlan(v.req_id, IDLE, v.drafts)
        return RowPlan(v.req_id, FUSED, m, committed=v.commit)
    if v.commit and v.drafts == 1 and v.commit > 1:
        # the commit that ends the request: one row, causal, at the first committed position
        return RowPlan(v.req_id, LAST, 1)
    want = v.commit or v.canvas or v.next_canvas
    if v.drafts != want:
        return RowPlan(v.req_id, IDLE, v.drafts)
    if v.commit:
        return RowPlan(v.req_id, COMMIT, v.drafts)
    return RowPlan(v.req_id, DENOISE, v.drafts, start_canvas=v.canvas == 0)


def plan_step(views: list[RowView]) -> StepPlan:
    """The step's plan, row by row in the input batch's order."""
    return StepPlan(tuple(plan_row(v) for v in views))
