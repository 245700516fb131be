"""Non-autoregressive scheduler: vLLM's V1 scheduler with the canvas carried as draft tokens.

Each engine step batches, across all running requests, prefill chunks (the causal encoder pass
over the prompt) and one canvas forward per request that has finished its prefill: a denoising
step or the commit pass, which the runner chooses. The canvas rides vLLM's speculative-token
path: ``n`` placeholder draft tokens reserve the KV slots right after the committed tokens; a
denoising step returns no token, so the whole draft is rolled back (its K/V never count as
committed); the commit step returns the ``n`` committed tokens, which vLLM appends one by one
through ``check_stop`` (EOS, stop ids, ``max_tokens`` and ``max_model_len`` cut inside the
canvas). Requests join and leave between steps (continuous batching); preemption and abort
free what vLLM allocated, and the runner drops its per-request state on finish.

Commits share forwards (``dgemma_fuse_commit``, default on): the runner reports which requests
commit next, with their tokens. When the request goes on after them, the commit and the next
canvas's first denoising step run in one forward (``n + m`` drafts: ``n`` committed rows, then the
``m``-row canvas, which is rolled back as usual). When the tokens end the request, their K/V
would never be read, so no commit pass runs: the runner returns them from the canvas's last
denoising step itself (``dgemma_final``: vLLM takes them as accepted drafts and ``check_stop``
ends the request inside them). Only a canvas that is ready after the very forward that fused its
start (one denoising step per canvas) still needs a step of its own: one draft is scheduled and
the runner returns the ``n`` tokens from that one row.
"""

from __future__ import annotations

from . import vllm_api as V
from .config import canvas_length_of, canvas_positions, plugin_options
from .metrics import RefinementMetrics
from .plan import check_stop_ids, ends_request

PLACEHOLDER_ID = 0  # any valid id: the runner overwrites canvas ids before the forward


def image_safe_hit(request, hit: int) -> int | None:
    """A prefix-cache hit must not end inside an image: the image's remaining rows attend to all
    of it on sliding layers too (engine/attention.py), and a sliding-window group keeps only the
    window before a hit. Returns the start of the first image the hit ends in (the hit is cut to
    it), or None."""
    cut = None
    for f in request.mm_features or ():
        for start, end in f.mm_position.extract_embeds_range():
            if start < hit <= end:
                cut = start if cut is None else min(cut, start)
    return cut


class DGemmaScheduler(V.Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Steps may return no token at all (denoising), so nothing counts as "sampled" by
        # default: unreturned draft tokens are then rolled back in update_from_output.
        self.num_sampled_tokens_per_step = 0
        self.canvas_length = canvas_length_of(self.vllm_config.model_config.hf_config)
        self.dg_metrics = RefinementMetrics()
        self.dg_fuse = bool(plugin_options(self.vllm_config)["fuse_commit"])
        # requests whose next canvas forward commits, with the tokens it commits (the runner's)
        self.dg_ready: dict[str, list[int]] = {}
        # a reasoning parser gates constraints (vLLM: unless enable_in_reasoning)
        so_cfg = self.vllm_config.structured_outputs_config
        self.dg_reasoner = bool(so_cfg.reasoning_parser) and not so_cfg.enable_in_reasoning
        if self.vllm_config.model_config.is_mm_prefix_lm:
            V.limit_prefix_hits(self.kv_cache_manager, image_safe_hit)

    def canvas_len_for(self, request) -> int:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        return canvas_positions(extra, self.canvas_length, self.max_model_len - request.num_tokens)

    def schedule(self, *args, **kwargs):
        budget = self.max_num_scheduled_tokens
        for req in self.running:
            if req.is_finished():
                continue
            pending = req.num_tokens - req.num_computed_tokens
            if pending < 0:  # its canvas step is still in flight (pipeline stages: a batch queue)
                req.spec_token_ids = []
                continue
            if pending > 0:  # still prefilling (or recomputing after preemption)
                budget -= pending
                req.spec_token_ids = []
                continue
            ready = self.dg_ready.get(req.request_id)
            if ready is None:
                n = self.canvas_len_for(req)
            else:  # the commit, fused with the next canvas's first step where that is exact
                n = len(ready)
                if self.dg_fuse:
                    m = self._next_canvas(req, ready)
                    if m == 0:
                        n = 1  # the request ends with these tokens: their K/V are never read
                    elif n + m <= budget:
                        n += m
            if n == 0 or n > budget:
                req.spec_token_ids = []
                continue
            req.spec_token_ids = [PLACEHOLDER_ID] * n
            budget -= n
        out = super().schedule(*args, **kwargs)
        if self.dg_reasoner:
            out.dg_reasoning = self._reasoning_of_new(out)
        return out

    def _reasoning_of_new(self, out) -> dict:
        """For each new constrained request: (reasoning_ended, reasoning_parser_kwargs) as the
        front end gave them to vLLM's structured-output state, which the worker does not get
        (NewRequestData has neither); the runner builds the same reasoner from them."""
        info = {}
        for new in out.scheduled_new_reqs:
            req = self.requests.get(new.req_id)
            so = getattr(req, "structured_output_request", None) if req is not None else None
            if so is not None:
                info[new.req_id] = (so.reasoning_ended, so.reasoning_parser_kwargs)
        return info

    def _next_canvas(self, req, ids: list[int]) -> int:
        """Positions of the canvas that follows committing `ids`, or 0 when the request ends
        there, by the rules of vLLM's ``check_stop`` (max_tokens reached, EOS or a stop id among
        them, no room under max_model_len): then the runner returns the tokens from a one-row
        step. Stop strings and repetition checks are not foreseen here; a request they end
        wastes the fused canvas rows of that one step."""
        sp = req.sampling_params
        room = self.max_model_len - req.num_tokens
        if ends_request(ids, num_output=req.num_output_tokens, max_tokens=req.max_tokens,
                        stops=check_stop_ids(sp), room=room):
            return 0
        return canvas_positions(sp.extra_args, self.canvas_length, room - len(ids))

    def update_from_output(self, scheduler_output, model_runner_output):
        idx = model_runner_output.req_id_to_index
        sampled = model_runner_output.sampled_token_ids
        canvases, fused = {}, set()
        for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            i = idx.get(req_id)
            if drafts and i is not None:
                got = len(sampled[i]) if sampled else 0
                canvases[req_id] = got
                if got:
                    self.dg_ready.pop(req_id, None)
                    if got < len(drafts):
                        fused.add(req_id)
        self.dg_ready.update(getattr(model_runner_output, "dgemma_ready", None) or {})
        if self.log_stats:
            self.dg_metrics.record_step(canvases, fused,
                                        getattr(model_runner_output, "dgemma_final", None) or ())
        out = super().update_from_output(scheduler_output, model_runner_output)
        if scheduler_output.finished_req_ids:  # finished or aborted (ready ones: aborted)
            for req_id in [r for r in self.dg_ready if r not in self.requests]:
                del self.dg_ready[req_id]
            if self.log_stats:
                self.dg_metrics.forget(self.requests)
        drafts = getattr(model_runner_output, "dgemma_drafts", None)
        if drafts:
            self._emit_drafts(drafts, out)
        failed = dict(getattr(model_runner_output, "dgemma_failed", None) or {})
        for req_id in getattr(model_runner_output, "dgemma_final", None) or ():
            req = self.requests.get(req_id)
            if req is not None and not req.is_finished():  # ends_request and check_stop disagree:
                failed[req_id] = ("dgemma_vllm: internal error: the last canvas's tokens did "
                                  "not end the request")  # its committed K/V were never written
        if failed:
            self._fail(failed, out)
        return out

    def _fail(self, failed: dict[str, str], outputs: dict) -> None:
        """End the requests whose canvas bookkeeping raised in the runner with an error (vLLM's
        FINISHED_ERROR: the OpenAI server answers that request with a 500), as vLLM's own
        scheduler ends requests whose KV load failed (v1/core/sched/scheduler.py:2306-2326);
        every other request goes on."""
        ids = [r for r in failed if r in self.requests and not self.requests[r].is_finished()]
        if not ids:
            return
        for req_id in ids:
            self.dg_ready.pop(req_id, None)
        for request in self.finish_requests(ids, V.RequestStatus.FINISHED_ERROR) or ():
            outputs.setdefault(request.client_index, V.EngineCoreOutputs()).outputs.append(
                V.EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                   finish_reason=request.get_finished_reason(),
                                   events=request.take_events(),
                                   trace_headers=request.trace_headers))

    def _emit_drafts(self, drafts: dict, outputs: dict) -> None:
        """One token-less output per streaming request that asked for drafts: the argmax canvas
        after a denoising step, in ``kv_transfer_params["dgemma_draft"]`` (see drafts.py)."""
        for req_id, (ids, step) in drafts.items():
            req = self.requests.get(req_id)
            if req is None or req.is_finished() or req.sampling_params is None:
                continue
            if req.sampling_params.output_kind == V.RequestOutputKind.FINAL_ONLY:
                continue
            stats = req.take_prefill_stats()
            if stats is not None:
                stats.finalize(self.kv_cache_manager.estimate_cached_tokens(req))
            draft = {"token_ids": ids, "step": step, "num_committed": req.num_output_tokens}
            eco = outputs.setdefault(req.client_index, V.EngineCoreOutputs())
            eco.outputs.append(V.EngineCoreOutput(
                request_id=req_id, new_token_ids=[], events=req.take_events(), prefill_stats=stats,
                kv_transfer_params={"dgemma_draft": draft}, trace_headers=req.trace_headers))

    def get_grammar_bitmask(self, scheduler_output):
        """No token bitmask: a canvas's positions are refined in parallel, so there is no
        per-position grammar state while it denoises (vLLM's masks of the placeholder drafts would
        be wrong and its runner would apply them to the canvas hidden states). The runner projects
        each committed canvas onto the grammar instead (refine/grammar.py); vLLM's own grammar
        still compiles, gates and advances with the committed tokens, so a disagreement ends the
        request with an error instead of going unnoticed."""
        return None

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        carrier = V.stats_carrier(stats)
        if carrier is not None:
            carrier.update(self.dg_metrics.drain())
        return stats

    def make_spec_decoding_stats(self, spec_decoding_stats, *args, **kwargs):
        # Canvas tokens ride the draft path but are not speculative drafts: keep them out of
        # vLLM's speculative-decoding metrics (which also assume a speculative config).
        return spec_decoding_stats
