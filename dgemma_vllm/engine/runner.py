"""Model-runner hooks: the per-request canvas state machine inside vLLM's V1 runner.

Three protected methods of vLLM's ``GPUModelRunner`` (which the CPU runner inherits) are
overridden; everything else (input batch, paged KV, attention metadata, forward) is vLLM's:

- ``_prepare_inputs``: for each request with a scheduled canvas, write the canvas ids where the
  placeholder drafts are (denoising: the current noisy canvas; commit: the argmax canvas), mark
  denoising requests bidirectional, ask for logits on every denoising row and none on commit
  or prefill rows, and hand the model the canvas rows and their self-conditioning.
- ``_build_attention_metadata``: the per-request int32 ``causal`` tensor (1 causal, 0 canvas).
- ``_sample``: receives the canvas rows' hidden states (the model's ``compute_logits`` hands them
  through, so vLLM never builds ``[rows, vocab]`` logits); per denoising request the vocabulary-
  tiled head on this rank's slice + one refinement step (``dgemma_vllm.refine``), and the
  committed tokens of commit requests (every other row returns no token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time

import numpy as np
import torch

from dgemma_vllm.model.dgemma import StepInputs, softcap_of
from dgemma_vllm.model.lora import adapter_dims, all_layer_dims, conform, k_eq_v_layers
from dgemma_vllm.refine.device import to_device
from dgemma_vllm.refine.filters import (LogitEdits, SamplingFilter, ban_sequences, build_edits,
                                        ends_bad_word, split_bad_words)
from dgemma_vllm.refine.grammar import (ReasoningGate, advance, grammar_start, project,
                                        valid_prefix)
from dgemma_vllm.refine.logprobs import token_logprobs, top_ids
from dgemma_vllm.refine.head import (compiled_tile_stats, finish_steps, head_batch, head_logits,
                                     head_step, is_tiled, profile_head)
from dgemma_vllm.refine.params import (from_generation_config, parse_request_knobs,
                                       server_overrides)
from dgemma_vllm.refine.sampler import CanvasState, temperature

from . import vllm_api as V
from .grammars import backend_for, matcher_for
from .plan import (COMMIT, DENOISE, FUSED, IDLE, LAST, PREFILL, RowPlan, RowView, StepPlan,
                   check_stop_ids, ends_request, plan_step)
from .config import (canvas_length_of, canvas_positions, head_budget, head_compile, head_tile,
                     plugin_options, seeded_noise)

logger = logging.getLogger("dgemma_vllm")
GRAMMAR_TOP = 8  # candidate ids per position for the grammar projection (then the exact fallback)



def split_fused(cm, causal: torch.Tensor, split: dict[int, int]):
    """Attention metadata in which each fused request (row -> ``nc`` committed tokens) is two
    sequences over the same block table: its ``nc`` committed rows, causal, with context up to
    them, then its canvas rows, bidirectional, with context up to the canvas end. Every field of
    ``CommonAttentionMetadata`` is handled as ``vllm_api.SPLIT_*_FIELDS`` lists it (the config hook
    turns fusion off at start-up for a vLLM whose metadata has fields beyond those)."""
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu.tolist()
    seq_cpu = V.host_seq_lens(cm)
    idx, new_qsl, new_seq, new_causal = [], [0], [], []
    flags = causal.tolist()
    for r in range(n):
        q0, q1 = qsl[r], qsl[r + 1]
        if r in split:
            nc = split[r]
            idx += [r, r]
            new_qsl += [q0 + nc, q1]
            new_seq += [seq_cpu[r] - (q1 - q0 - nc), seq_cpu[r]]
            new_causal += [1, 0]
        else:
            idx.append(r)
            new_qsl.append(q1)
            new_seq.append(seq_cpu[r])
            new_causal.append(flags[r])
    dev = cm.query_start_loc.device
    qsl_cpu = torch.tensor(new_qsl, dtype=cm.query_start_loc_cpu.dtype)
    seq_t = torch.tensor(new_seq, dtype=cm.seq_lens.dtype)
    ranges = cm.mm_req_doc_ranges
    if ranges is not None:  # request index -> its ranges, for each of its sequences
        ranges = {j: list(ranges[r]) for j, r in enumerate(idx) if r in ranges}
    changes = dict(
        num_reqs=len(idx), query_start_loc=to_device(qsl_cpu, dev), query_start_loc_cpu=qsl_cpu,
        seq_lens=to_device(seq_t, cm.seq_lens.device),
        seq_lens_cpu_upper_bound=None if cm.seq_lens_cpu_upper_bound is None else seq_t.clone(),
        causal=to_device(torch.tensor(new_causal, dtype=torch.int32), dev),
        max_query_len=int(max(b - a for a, b in zip(new_qsl, new_qsl[1:]))),
        max_seq_len=max(cm.max_seq_len, max(new_seq)),
        block_table_tensor=_take_rows(cm.block_table_tensor, idx),
        mm_req_doc_ranges=ranges,
    )
    for name in V.SPLIT_REPEATED_FIELDS:
        v = getattr(cm, name)
        if v is not None:
            changes[name] = _take_rows(v, idx)
    for name in V.SPLIT_DROPPED_FIELDS:
        changes[name] = None
    return dataclasses.replace(cm, **changes)


def sequence_flags(plan: StepPlan) -> list[int]:
    """The causal flag of every attention sequence of a step, on the host, in split_fused's
    order (a fused row is two sequences: its committed rows, causal, then its canvas)."""
    split = plan.split
    return [f for i, c in enumerate(plan.causal) for f in ([1, 0] if i in split else [c])]


def reference_window_metadata(cm, window: int, flags: list[int] | None = None):
    """The reference sliding-window rule for canvas rows through vLLM's Triton attention (GPU):
    every canvas sequence (causal flag 0) becomes a causal sequence with one multimodal-prefix
    range ``[max(0, L - W + 1), L + C - 1]`` (inclusive; L tokens before its C canvas rows). With
    the ranges not clamped to the window, Triton's mask is ``(k <= q and q - k < W) or (q, k in
    a range)`` (v1/attention/ops/triton_attention_helpers.py, compute_kv_seq_mask), so a canvas
    query sees keys ``[max(0, L - W + 1), L + C)`` on sliding layers and ``[0, L + C)`` on full
    layers: the reference's rule (transformers eager/sdpa with its DynamicCache). Every sequence
    is then causal: no per-sequence causal tensor. Other ranges (images) are kept. `flags`: the
    sequences' causal flags on the host (else read from ``cm.causal``, a device read on a GPU)."""
    if flags is None:
        flags = cm.causal.tolist() if isinstance(cm.causal, torch.Tensor) else [1] * cm.num_reqs
    qsl = cm.query_start_loc_cpu.tolist()
    seq = V.host_seq_lens(cm)
    ranges = {k: list(v) for k, v in (cm.mm_req_doc_ranges or {}).items()}
    for i, causal in enumerate(flags):
        if not causal:
            before = seq[i] - (qsl[i + 1] - qsl[i])
            ranges.setdefault(i, []).append((max(0, before - window + 1), seq[i] - 1))
    return dataclasses.replace(cm, causal=True, mm_req_doc_ranges=ranges or cm.mm_req_doc_ranges)


def assemble_soft(softs, hidden: int, device) -> torch.Tensor | None:
    """The self-conditioning input of one forward: each canvas's soft embeddings ``[n, hidden]``
    (``None`` on a canvas's first step: zeros, exact since MLP(pre_norm(0)) = 0), concatenated in
    batch order, on `device`; None when every canvas is on its first step. The zeros are made
    where the other canvases' embeddings live (on a GPU: the GPU), never on the host."""
    like = next((s for s, _ in softs if s is not None), None)
    if like is None:
        return None
    return torch.cat([s if s is not None else like.new_zeros(n, hidden) for s, n in softs]).to(device)


def _take_rows(v, idx: list[int]):
    """Rows `idx` of a per-request tensor or array (on its own device)."""
    if isinstance(v, np.ndarray):
        return v[idx]
    return v.index_select(0, to_device(torch.tensor(idx, dtype=torch.long), v.device))


class DGemmaRunnerMixin:
    """Mixed into vLLM's CPUModelRunner / GPUModelRunner by ``worker.py``."""

    def _dg_setup(self) -> None:
        mc = self.model_config
        self.dg_canvas = canvas_length_of(mc.hf_config)
        self.dg_vocab = mc.hf_config.text_config.vocab_size
        # sampler defaults: generation_config.json, then server-level --hf-overrides
        self.dg_defaults = from_generation_config(
            mc.model if os.path.isdir(mc.model) else None).with_overrides(server_overrides(mc.hf_config))
        self.dg_states: dict[str, CanvasState] = {}
        self.dg_step: StepPlan | None = None  # this step's plan (engine/plan.py)
        self.dg_attn_plan: StepPlan | None = None  # the same, until the attention metadata took it
        self.dg_steps = 0
        self.dg_debug_steps = bool(os.environ.get("DGEMMA_DEBUG_STEPS"))  # print per-step timing
        # Test hook: record (prefix length, canvas ids, self-conditioning logits, logits) of
        # every denoising step to this directory (torch.save per request).
        self.dg_capture_dir = os.environ.get("DGEMMA_CAPTURE_DIR") or None
        self.dg_exact_unseeded = os.environ.get("DGEMMA_EXACT_NOISE", "0") == "1"
        self.dg_capture: dict[str, list] = {}
        self.dg_finished: dict[str, dict] = {}  # bounded: stats of recently finished requests
        opts = plugin_options(self.vllm_config)
        device_type = torch.device(self.device).type
        self.dg_head_tile = head_tile(opts, device_type)
        self.dg_head_budget = head_budget(device_type)
        self.dg_cpu = device_type == "cpu"
        self.dg_seeded_noise = seeded_noise(opts, device_type)
        # GPU + the reference window: canvas rows as causal sequences with a prefix range (the
        # CPU backend applies the rule itself, engine/attention.py)
        self.dg_ranges_window = (int(mc.hf_config.text_config.sliding_window)
                                 if not self.dg_cpu and opts["canvas_window"] == "reference" else 0)
        self.dg_vocab_slice = None  # built on first use (after the weights are loaded)
        # the head tile's fused elementwise passes, compiled now (engine start), not in a request;
        # not at all where the head never tiles (a vocabulary within one tile, one rank): its
        # unseeded rows take the tile path there too, but the compiled pass measured no faster
        # in an engine (small, 8 steps per engine step: 280 / 1080 against 290 / 1183 tok/s
        # eager at concurrency 1 / 16, benchmarks/results/cpu-small-head-compile-2026-12-03)
        tiled = is_tiled(self.dg_vocab, self.parallel_config.tensor_parallel_size, self.dg_head_tile)
        self.dg_softcap = softcap_of(mc.hf_config)
        self.dg_tile_stats = (compiled_tile_stats(self.dg_softcap, mc.dtype, device=self.device)
                              if tiled and head_compile(opts, device_type) else None)
        self.dg_group = int(opts["steps_per_engine_step"])
        self.dg_inner_steps = 0  # denoising steps run inside an engine step (after its first)
        # where an engine step's time goes (host clock, summed; on a GPU the forward's kernels
        # run asynchronously and land in whatever waits for them, the head's copy to the host):
        # the model forwards, the head with the per-row updates, and everything the runner does
        # from receiving the scheduler output to returning the sampled tokens
        self.dg_time = {"forward": 0.0, "head": 0.0, "runner": 0.0}
        self.dg_lora_failed: dict[int, str] = {}  # this step: LoRA id -> why it did not load
        self.dg_t_enter = None
        self.dg_fused_commits = 0  # commits run in one forward with the next canvas's first step
        self.dg_last_commits = 0  # commits that ended their request, run as one row
        # last canvases returned by their last denoising step (the request ends with them: no
        # commit pass; with dgemma_fuse_commit, as the scheduler's one-row last commit)
        self.dg_final_commits = 0
        self.dg_fuse = bool(opts["fuse_commit"])
        self.dg_final: set[str] = set()  # this step's such requests, for the scheduler's metrics
        self.dg_head_rows = 0  # rows the vocabulary head ran on (canvas rows of denoising steps)
        self.dg_commit_rows = 0  # committed-token rows run through the model (no head)
        self.dg_canvas_forwards = 0  # forwards with canvas rows (one head pass, one SC MLP call)
        self.dg_one_rpc_steps = 0  # engine steps sampled inside execute_model (worker.py)
        self.dg_applied = False
        self.dg_drafts: dict[str, tuple[list[int], int]] = {}
        self.dg_ready: dict[str, list[int]] = {}  # requests whose next step commits (their ids)
        self.dg_fused_ids: dict[str, torch.Tensor] = {}  # committed ids of this step's fused rows
        # logprobs of canvases ready to commit (requests that ask for them), until returned
        self.dg_logprobs: dict = {}
        # the same of this step's fused rows (taken at the commit: the new canvas may be ready
        # to commit after this very forward, and its logprobs then land in dg_logprobs)
        self.dg_fused_lp: dict = {}
        # pipeline stages: output tokens of each request already handed to the other stages
        self.dg_mirrored: dict[str, int] = {}
        # (reasoning_ended, parser kwargs) of new constrained requests under a reasoning parser,
        # from the scheduler (DGemmaScheduler._reasoning_of_new), until their state is built
        self.dg_reasoning_in: dict = {}
        # noise of unseeded requests, drawn for all of them at once; the same on every rank
        self.dg_batch_gen = torch.Generator(device="cpu")
        self.dg_batch_gen.manual_seed(int(self.model_config.seed or 0) + 0x5EED)
        # requests whose bookkeeping raised this step: request id -> message. The scheduler
        # finishes them with an error (HTTP 500 for that request); the engine serves on.
        self.dg_failed: dict[str, str] = {}
        # Test hook: DGEMMA_INJECT_FAULT="<where>:<key>=<value>[,...]" raises in the bookkeeping
        # of the requests with that sampling seed (key seed) or prompt length (key prompt_len),
        # where = prepare | head | commit (tests/test_bf16.py).
        self.dg_faults = []
        for rule in filter(None, os.environ.get("DGEMMA_INJECT_FAULT", "").split(",")):
            where, _, cond = rule.partition(":")
            key, _, value = cond.partition("=")
            self.dg_faults.append((where, key, value))

    def dg_runner_stats(self) -> dict:
        return {"engine_steps": self.dg_steps, "inner_steps": self.dg_inner_steps,
                "fused_commits": self.dg_fused_commits, "last_commits": self.dg_last_commits,
                "final_commits": self.dg_final_commits,
                "head_rows": self.dg_head_rows, "commit_rows": self.dg_commit_rows,
                "canvas_forwards": self.dg_canvas_forwards, "one_rpc_steps": self.dg_one_rpc_steps,
                # per-request state held now (0 when no request is running: no leak)
                "live_states": len(self.dg_states), "pending_commits": len(self.dg_ready),
                "fused_ids": len(self.dg_fused_ids), "failed": len(self.dg_failed),
                "self_conditioning_calls": self._dg_model().sc_calls,
                **{f"time_{k}_s": v for k, v in self.dg_time.items()}}

    def dg_request_stats(self) -> dict[str, dict]:
        """Per-request refinement statistics (live and recently finished requests)."""
        live = {rid: st.stats() for rid, st in self.dg_states.items()}
        return {**self.dg_finished, **live}

    # ------------------------------------------------------------------ state
    def _dg_state(self, req_id: str) -> CanvasState:
        st = self.dg_states.get(req_id)
        if st is None:
            sp = self.requests[req_id].sampling_params
            params = self.dg_defaults
            params = dataclasses.replace(params, temperature=float(sp.temperature)).validate()
            params = params.with_overrides(sp.extra_args)
            gen = torch.Generator(device="cpu")
            if sp.seed is not None:
                gen.manual_seed(int(sp.seed))
            else:
                # Every tensor-parallel rank must draw the same noise: derive the seed from the
                # request id (unique per request: vLLM appends a random suffix) and the engine seed.
                digest = hashlib.sha256(f"{self.model_config.seed}:{req_id}".encode()).digest()
                gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            # Seeded requests draw the reference's noise in the reference's order; unseeded ones
            # use the cheaper one-uniform-per-position sampler (same distribution).
            noise_gen = None
            if sp.seed is not None and self.dg_seeded_noise == "device":
                noise_gen = torch.Generator(device=self.device)
                noise_gen.manual_seed(int(sp.seed))
            st = CanvasState(params=params, vocab_size=self.dg_vocab, generator=gen,
                             noise_generator=noise_gen,
                             exact_noise=sp.seed is not None or self.dg_exact_unseeded)
            st.knobs = parse_request_knobs(sp.extra_args, self.dg_canvas, self.dg_vocab)
            st.filter = SamplingFilter.of(sp, self.dg_vocab) if sp.temperature > 0 else None
            st.bad_single, st.bad_multi = split_bad_words(sp.bad_words_token_ids or ())
            if sp.structured_outputs is not None:
                st.grammar = self._dg_matcher(sp)
                st.reasoning = self._dg_reasoning_gate(req_id)
            self.dg_states[req_id] = st
        return st

    def _dg_fail(self, req_id: str, where: str, exc: BaseException,
                 message: str | None = None) -> None:
        """One request's canvas bookkeeping raised: drop its state and report it, so that the
        scheduler ends that request with an error while the others go on (`message`: what it
        is ended with, instead of an internal error in `where`)."""
        logger.error("dgemma_vllm: request %s failed in %s and is ended with an error: %r",
                     req_id, where, exc, exc_info=exc)
        self.dg_failed[req_id] = message or f"dgemma_vllm: internal error in {where}: {exc!r}"
        st = self.dg_states.pop(req_id, None)
        if st is not None:
            self.dg_finished[req_id] = st.stats()
        self.dg_drafts.pop(req_id, None)
        self.dg_ready.pop(req_id, None)
        self.dg_fused_ids.pop(req_id, None)
        self.dg_logprobs.pop(req_id, None)
        self.dg_fused_lp.pop(req_id, None)

    def _dg_inject(self, where: str, req_id: str) -> None:
        req = self.requests.get(req_id) if self.dg_faults else None
        for at, key, value in self.dg_faults if req is not None else ():
            got = req.sampling_params.seed if key == "seed" else len(req.prompt_token_ids or ())
            if at == where and str(got) == value:
                raise RuntimeError(f"injected fault ({where}, {key}={value})")

    def _update_states(self, scheduler_output):
        self.dg_t_enter = time.perf_counter()
        self.dg_reasoning_in.update(getattr(scheduler_output, "dg_reasoning", None) or {})
        for req_id in scheduler_output.finished_req_ids:
            self.dg_reasoning_in.pop(req_id, None)
            st = self.dg_states.pop(req_id, None)
            self.dg_logprobs.pop(req_id, None)
            self.dg_fused_lp.pop(req_id, None)
            self.dg_mirrored.pop(req_id, None)
            if st is not None:
                self.dg_finished[req_id] = st.stats()
                while len(self.dg_finished) > 4096:
                    self.dg_finished.pop(next(iter(self.dg_finished)))
        out = super()._update_states(scheduler_output)
        V.drop_request_generators(self.input_batch)  # unused; vLLM's rewind of them fails on CPU
        return out

    # ------------------------------------------------------------------ LoRA
    def load_lora_model(self, model, vllm_config, device):
        """vLLM's (its LRU adapter cache and Punica wrapper), with every adapter checked and
        completed for DiffusionGemma when it loads (model/lora.py: which modules, K = V layers,
        encoder copies, shapes)."""
        if self.dg_cpu:  # vLLM's CPU ops: a per-row copy of the adapters, and -1 picks the last one
            V.use_grouped_cpu_lora_ops()
        with self._dg_unwrapped(model).vision_hidden():
            model = super().load_lora_model(model, vllm_config, device)
        V.wrap_lora_loading(self.lora_manager, self._dg_conform_adapter)
        return model

    def _dg_conform_adapter(self, lora, lora_request) -> None:
        mgr = V.lora_adapter_manager(self.lora_manager)
        dims = adapter_dims(mgr.modules, mgr.packed_modules)
        text = self.model_config.hf_config.text_config
        conform(lora.loras, all_layer_dims(dims, text.layer_types), k_eq_v_layers(text),
                lora_request.lora_name,
                lambda w, name: V.LoRALayerWeights(name, w.rank, w.lora_alpha, w.lora_a.clone(),
                                                   w.lora_b.clone(), scaling=w.scaling),
                present=set(dims))

    def _dg_load_adapters(self) -> None:
        """Load the batch's adapters not loaded yet, one by one, before vLLM activates them: an
        adapter that fails to load (bad path, rank above --max-lora-rank, missing or misnamed
        tensors) ends its requests with an error naming it; the others go on (vLLM would raise
        inside the step and end the engine)."""
        self.dg_lora_failed = {}
        loaded = self.lora_manager.list_adapters()
        for lora_id, req in V.lora_requests_of(self.input_batch).items():
            if lora_id in loaded:
                continue
            try:
                self.lora_manager.add_adapter(req)
            except Exception as exc:  # noqa: BLE001 - this adapter's requests only
                self.dg_lora_failed[lora_id] = (f"LoRA adapter {req.lora_name!r} could not be "
                                                f"loaded: {exc}")
        for row, req_id in enumerate(self.input_batch.req_ids[: self.input_batch.num_reqs]):
            why = self.dg_lora_failed.get(V.lora_id_of_row(self.input_batch, row))
            if why is not None and req_id not in self.dg_failed:
                self._dg_fail(req_id, "LoRA loading", RuntimeError(why), f"dgemma_vllm: {why}")

    def set_active_loras(self, input_batch, num_scheduled_tokens, num_sampled_tokens=None,
                         *args, **kwargs):
        """vLLM's, with the rows of requests whose adapter failed to load run without one
        (their output is dropped: they end with an error)."""
        if not self.dg_lora_failed:
            return super().set_active_loras(input_batch, num_scheduled_tokens, num_sampled_tokens,
                                            *args, **kwargs)
        if num_sampled_tokens is None:
            num_sampled_tokens = np.ones_like(num_scheduled_tokens, dtype=np.int32)
        prompt, token, reqs = input_batch.make_lora_inputs(num_scheduled_tokens, num_sampled_tokens)
        bad = self.dg_lora_failed
        prompt = tuple(0 if i in bad else i for i in prompt)
        token = tuple(0 if i in bad else i for i in token)
        reqs = {r for r in reqs if r.lora_int_id not in bad}
        return self._set_active_loras(prompt, token, reqs, *args, **kwargs)

    # ------------------------------------------------------------------ inputs
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        num_reqs = self.input_batch.num_reqs
        spec = scheduler_output.scheduled_spec_decode_tokens
        self.dg_fused_ids = {}
        if self.lora_config:
            self._dg_load_adapters()
        stages, _, owner = V.pp_ranks()
        softs, written = [], {}  # (soft embeddings or None on a first step, n) per canvas; row -> ids
        if owner:  # the stage that holds the canvas states (the last; the only one without PP)
            plan, written = self._dg_plan(num_reqs, spec)
            softs = [(self.dg_states[req_id].soft, n) for req_id, _, _, n in plan.canvas_entries()]
        else:
            plan = plan_step([RowView(self.input_batch.req_ids[row], 0) for row in range(num_reqs)])
        soft = assemble_soft(softs, self.model_config.hf_config.text_config.hidden_size,
                             self.device)  # None on the other stages (no canvas states there)
        if stages > 1 and spec:  # every stage knows from the scheduler output whether to meet
            plan, soft = self._dg_pp_exchange(plan, written, soft, owner)
        logits_indices, spec_md, max_n = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        qsl = self.query_start_loc.np[: num_reqs + 1]
        rows = []
        for _, row, _, n in plan.canvas_entries():
            first = qsl[row] + plan.rows[row].committed  # a fused canvas follows its committed rows
            rows.append(np.arange(first, first + n))
        device = logits_indices.device
        if rows:
            canvas_rows = to_device(torch.from_numpy(np.concatenate(rows)), device)
        else:
            canvas_rows = torch.zeros(0, dtype=torch.int64, device=device)
        self._dg_model().set_step(StepInputs(canvas_rows=canvas_rows, soft_embeds=soft))
        self.dg_step = plan if owner else None  # read by _build_attention_metadata, _model_forward, _sample
        self.dg_attn_plan = plan if plan.needs_attention_flags else None  # consumed once
        self.dg_canvas_rows = canvas_rows
        self.dg_applied = False
        self.dg_t0 = time.perf_counter()
        return canvas_rows, None, max_n

    def sync_and_gather_intermediate_tensors(self, num_tokens, intermediate_tensors, sync_self):
        """vLLM's, with its persistent buffer made on first use as its dummy run makes it (the
        CPU runner makes no dummy run before the first step, and asserts the buffer)."""
        if self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)
        return super().sync_and_gather_intermediate_tensors(num_tokens, intermediate_tensors,
                                                            sync_self)

    def _dg_plan(self, num_reqs: int, spec) -> tuple[StepPlan, dict[int, torch.Tensor]]:
        """The step's plan (a pure function of what each row's state says, engine/plan.py),
        carried out: canvases committed and started, and the ids written where the scheduler's
        placeholder drafts are (returned too: row -> ids)."""
        plan = plan_step([self._dg_view(row, spec) for row in range(num_reqs)])
        applied, written = [], {}
        for row, rp in enumerate(plan.rows):
            if rp.mode not in (PREFILL, IDLE):
                try:
                    written[row] = self._dg_apply(row, rp)
                except Exception as exc:  # noqa: BLE001 - one request's fault must not end the engine
                    self._dg_fail(rp.req_id, "step planning", exc)
                    rp = RowPlan(rp.req_id, IDLE, len(spec.get(rp.req_id) or ()))
            applied.append(rp)
        return StepPlan(tuple(applied)), written

    def _dg_pp_exchange(self, plan, written, soft, owner):
        """Pipeline stages: the last stage (the owner of the canvas states) hands every other
        stage the step's plan (attention flags, canvas rows), the ids it wrote where the drafts
        are (the first stage embeds them), the self-conditioning input (the first stage adds it)
        and each row's committed tokens the others have not seen: they reach no other stage
        through vLLM (they are written where drafts were, never scheduled as tokens), and vLLM
        rebuilds a row from its request's output tokens when it re-enters the batch. The other
        stages mirror them and write the ids at the owner's position. Returns (plan, soft)."""
        ib = self.input_batch
        if owner:
            rows = []
            for row, ids in written.items():
                req_id = ib.req_ids[row]
                out = self.requests[req_id].output_token_ids
                seen = self.dg_mirrored.get(req_id, 0)
                self.dg_mirrored[req_id] = len(out)
                rows.append((row, int(ids.numel()), int(ib.num_tokens_no_spec[row]),
                             list(out[seen:])))
            payload = {"plan": plan, "rows": rows,
                       "ids": torch.cat([written[r[0]] for r in rows]).to(torch.int64)
                       if rows else torch.zeros(0, dtype=torch.int64)}
            if soft is not None:
                payload["soft"] = soft
            V.pp_broadcast_from_last(payload)
            return plan, soft
        got = V.pp_broadcast_from_last(None)
        ids = got["ids"].numpy()
        at = 0
        for row, n, start, tail in got["rows"]:
            out = self.requests[ib.req_ids[row]].output_token_ids
            if tail:
                old = len(out)
                out.extend(tail)
                p = int(ib.num_prompt_tokens[row])
                ib.token_ids_cpu[row, p + old:p + len(out)] = tail
                ib.is_token_ids[row, p + old:p + len(out)] = True
            ib.token_ids_cpu[row, start:start + n] = ids[at:at + n]
            ib.is_token_ids[row, start:start + n] = True
            ib.num_tokens_no_spec[row] = start
            at += n
        return got["plan"], got.get("soft")

    def _dg_view(self, row: int, spec) -> RowView:
        """What the plan needs to know of one row (its request's canvas state, the room left)."""
        req_id = self.input_batch.req_ids[row]
        drafts = len(spec.get(req_id) or ())
        if not drafts:
            return RowView(req_id, 0)
        if req_id in self.dg_failed:  # ended with an error already: compute nothing
            return RowView(req_id, drafts, failed=True)
        try:
            self._dg_inject("prepare", req_id)
            st = self._dg_state(req_id)
            start = int(self.input_batch.num_tokens_no_spec[row])
            extra = self.requests[req_id].sampling_params.extra_args
            commit = 0 if st.commit is None else int(st.commit.numel())
            room = self.max_model_len - start
            return RowView(
                req_id, drafts, canvas=st.length, commit=commit,
                next_canvas=canvas_positions(extra, self.dg_canvas, room) if st.canvas is None else 0,
                after_commit=canvas_positions(extra, self.dg_canvas, room - commit) if commit else 0)
        except Exception as exc:  # noqa: BLE001 - this request only
            self._dg_fail(req_id, "step planning", exc)
            return RowView(req_id, drafts, failed=True)

    def _dg_apply(self, row: int, rp: RowPlan) -> None:
        """Carry out one row's plan: commit and start canvases, write the canvas ids where the
        scheduler's placeholder drafts are (and return them)."""
        st = self.dg_states[rp.req_id]
        start = int(self.input_batch.num_tokens_no_spec[row])
        if rp.mode == FUSED:
            committed = self._dg_finish_commit(st)
            self.dg_fused_ids[rp.req_id] = committed
            if rp.req_id in self.dg_logprobs:
                self.dg_fused_lp[rp.req_id] = self.dg_logprobs.pop(rp.req_id)
            self.dg_fused_commits += 1
            self.dg_commit_rows += rp.committed
            st.start_canvas(rp.n)
            st.edits = self._dg_edits(rp.req_id, committed.tolist())
            ids = torch.cat([committed, st.canvas[0]])
        elif rp.mode == LAST:  # one row at the first committed position; _sample returns them all
            self.dg_last_commits += 1
            self.dg_commit_rows += 1
            ids = st.commit[:1]
        elif rp.mode == COMMIT:
            ids = st.commit
            self.dg_commit_rows += rp.n
        else:  # DENOISE
            if rp.start_canvas:
                k, n = st.knobs, rp.n
                first = st.canvases == 0
                seed = torch.tensor(k.seed_canvas[:n]) if (first and k.seed_canvas) else None
                pins = torch.tensor([i for i in k.pinned if i < n]) if (first and k.pinned) else None
                st.start_canvas(n, seed=seed, pins=pins)
                st.edits = self._dg_edits(rp.req_id)
            ids = st.canvas[0]
        self.input_batch.token_ids_cpu[row, start:start + ids.numel()] = ids.numpy()
        return ids

    def _dg_edits(self, req_id: str, committing: list[int] = ()):
        """The logit edits of a request's next canvas (refine/filters.py) from its sampling
        parameters, its prompt and the tokens committed before the canvas (`committing`: those
        committed in this very forward)."""
        req = self.requests[req_id]
        sp = req.sampling_params
        st = self.dg_states[req_id]
        output = [t for t in req.output_token_ids if t >= 0] + list(committing)
        return build_edits(
            vocab=self.dg_vocab, prompt=req.prompt_token_ids or (), output=output,
            presence=sp.presence_penalty, frequency=sp.frequency_penalty,
            repetition=sp.repetition_penalty,
            logit_bias={int(k): float(v) for k, v in (sp.logit_bias or {}).items()},
            allowed=sp.allowed_token_ids, banned=st.bad_single,
            stop_ids=sorted(sp.all_stop_token_ids), min_tokens=sp.min_tokens)

    def _dg_matcher(self, sp):
        """The request's grammar matcher, compiled here with vLLM's own xgrammar backend (the
        same grammar the engine core compiled: same spec, options, tokenizer, stop ids)."""
        if getattr(self, "dg_xgrammar", None) is None:
            self.dg_xgrammar = backend_for(self.vllm_config)
        return matcher_for(self.dg_xgrammar, sp.structured_outputs, sp.all_stop_token_ids)

    def _dg_reasoning_gate(self, req_id: str) -> ReasoningGate | None:
        """The request's reasoning gate under a reasoning parser (None: constrained from the
        start): vLLM's reasoner class for ``--reasoning-parser``, built here with the request's
        parser arguments; its ``is_reasoning_end`` over the prompt decides the start state where
        the front end left it open, as the engine core's structured-output manager does."""
        if req_id not in self.dg_reasoning_in:
            return None
        ended, kwargs = self.dg_reasoning_in.pop(req_id)
        so_cfg = self.vllm_config.structured_outputs_config
        reasoner = V.reasoning_parser_class(so_cfg.reasoning_parser)(
            tokenizer=V.cached_tokenizer_from_config(model_config=self.model_config),
            **(kwargs or {}))
        if ended is None:
            ended = bool(reasoner.is_reasoning_end(list(self.requests[req_id].prompt_token_ids or ())))
        return ReasoningGate(ended=bool(ended), find_end=reasoner.find_reasoning_end)

    def _dg_finish_commit(self, st: CanvasState) -> torch.Tensor:
        """The state's commit, taken; its grammar (if any) advanced by the committed tokens from
        where the grammar starts in them (after the reasoning section)."""
        ids = st.finish_commit()
        if st.grammar is not None and st.grammar_from is not None:
            advance(st.grammar, ids.tolist()[st.grammar_from:])
            if st.reasoning is not None:
                st.reasoning.ended = True  # latched, as vLLM's reasoning_ended
        return ids

    def _dg_on_commit(self, req_id: str, st: CanvasState, rows: torch.Tensor) -> None:
        """A canvas is ready to commit after this step (`rows`: its hidden states): project out
        multi-token bad words, and for a request that asks for logprobs compute them (the final
        step's raw logits at each committed position)."""
        req = self.requests[req_id]
        sp = req.sampling_params
        vs = self._dg_vocab()
        pins = st.pins.tolist() if st.pins is not None else ()
        if st.bad_multi:
            history = [t for t in req.output_token_ids if t >= 0]
            history = (list(req.prompt_token_ids or ()) + history)
            canvas = st.commit.tolist()
            if any(ends_bad_word(history + canvas[: i + 1], st.bad_multi) for i in range(len(canvas))):
                width = min(len(st.bad_multi) + 1, vs.vocab)
                best = top_ids(rows, vs, softcap=self.dg_softcap, edits=st.edits, row0=0, n=width,
                               tile=self.dg_head_tile).tolist()
                st.commit = torch.tensor(ban_sequences(history, canvas, st.bad_multi,
                                                       lambda i: best[i], fixed=pins))
        if st.grammar is not None:  # structured outputs: the commit projected onto the grammar
            canvas = st.commit.tolist()
            ids, st.grammar_from = self._dg_project(st, canvas, rows, vs, pins)
            st.commit = torch.tensor(ids, dtype=st.commit.dtype)
        if sp.logprobs is not None:
            n_top = int(sp.logprobs) if sp.logprobs >= 0 else 0
            self.dg_logprobs[req_id] = token_logprobs(
                rows, vs, st.commit, softcap=self.dg_softcap, n_top=n_top,
                tile=self.dg_head_tile)

    def _dg_project(self, st: CanvasState, canvas: list[int], rows: torch.Tensor, vs,
                    pins=()) -> tuple[list[int], int | None]:
        """`canvas` projected onto the request's grammar from where it starts in it (after a
        reasoning section), under the logits of `rows` (the canvas rows' hidden states): each
        row's GRAMMAR_TOP best ids, computed only once a token is refused, then that row's exact
        masked argmax. Returns (tokens, grammar start or None: all reasoning)."""
        start = grammar_start(st.reasoning, canvas)
        if start is None:
            return canvas, None
        kw = dict(softcap=self.dg_softcap, row0=0, tile=self.dg_head_tile)
        best = []

        def top(i):
            if not best:  # one tiled pass for all rows (a collective under TP: every rank
                best.append(top_ids(rows, vs, edits=st.edits, n=GRAMMAR_TOP, **kw).tolist())
            return best[0][start + i]  # gets here at the same position, same inputs)

        def exact(i, allowed):
            e = LogitEdits(allowed=allowed).freeze()
            return int(top_ids(rows[start + i:start + i + 1], vs, edits=e, n=1, **kw)[0, 0])

        ids, _ = project(st.grammar, canvas[start:], top, exact, self.model_config.get_vocab_size(),
                         fixed=[p - start for p in pins if p >= start])
        return canvas[:start] + ids, start

    @staticmethod
    def _dg_unwrapped(m):
        return getattr(m, "module", m) if not hasattr(m, "set_step") else m

    def _dg_model(self):
        return self._dg_unwrapped(self.model)

    def _build_attention_metadata(self, *args, **kwargs):
        plan, self.dg_attn_plan = self.dg_attn_plan, None
        if plan is None:
            return super()._build_attention_metadata(*args, **kwargs)
        causal = torch.tensor(plan.causal, dtype=torch.int32)
        split = plan.split
        seq_flags = sequence_flags(plan)
        ranges_window = self.dg_ranges_window
        patched = []
        for groups in self.attn_groups:
            for g in groups:
                orig = g.build_metadata

                def build(cm, *a, _orig=orig, **kw):
                    if cm.num_reqs == causal.shape[0]:
                        cm = split_fused(cm, causal, split) if split else dataclasses.replace(
                            cm, causal=to_device(causal, cm.query_start_loc.device))
                        if ranges_window:
                            cm = reference_window_metadata(cm, ranges_window, seq_flags)
                    return _orig(cm, *a, **kw)

                g.build_metadata = build
                patched.append(g)
        try:
            return super()._build_attention_metadata(*args, **kwargs)
        finally:
            for g in patched:
                del g.build_metadata  # back to the class method

    # ------------------------------------------------------------------ sampling
    def _dg_vocab(self):
        """This rank's vocabulary slice for the head, built on first use (after weight loading)."""
        if self.dg_vocab_slice is None:
            vs = self._dg_model().vocab_slice()
            if self.dg_cpu:  # the tiles' GEMMs pre-packed, as vLLM's linears
                vs.tile_matmul = V.cpu_head_tile_matmul(vs.weight)
                vs.soft_matmul = V.cpu_head_soft_matmul(vs.soft_weight)
            vs.tile_stats = self.dg_tile_stats
            self.dg_vocab_slice = vs
        return self.dg_vocab_slice

    def _dummy_sampler_run(self, hidden_states):
        """vLLM's (its sampler on dummy rows, inside its memory profiling on a GPU), then the
        plugin's head once at its largest chunk, so that the head's temporaries are counted in
        the memory vLLM leaves for the KV cache. Not on the CPU (no such profiling there)."""
        out = super()._dummy_sampler_run(hidden_states)
        if not self.dg_cpu:
            model = self._dg_model()
            profile_head(self._dg_vocab(), hidden_states.shape[-1], dtype=hidden_states.dtype,
                         softcap=self.dg_softcap, emb_dtype=model.model.embed_tokens.weight.dtype,
                         tile=self.dg_head_tile, budget=self.dg_head_budget)
        return out

    def _dg_denoise_all(self, plan: StepPlan, hidden):
        """One denoising step for every canvas of `plan` from the canvas rows' hidden states:
        seeded requests one by one (their own generators, the reference's draw order), unseeded
        ones together in one head pass and one batched update."""
        entries = plan.canvas_entries()
        model = self._dg_model()
        vs = self._dg_vocab()
        kw = dict(softcap=self.dg_softcap, emb_dtype=model.model.embed_tokens.weight.dtype,
                  normalizer=model.model.normalizer, tile=self.dg_head_tile)
        batch, pending = [], []  # pending: (request ids, PendingStep)
        self.dg_canvas_forwards += bool(entries)
        self.dg_head_rows += hidden.shape[0]  # all rows vLLM's logits step handed over
        for req_id, row, off, n in entries:
            st = self.dg_states.get(req_id)
            if st is None:  # failed earlier in this step
                continue
            rows = hidden[off:off + n]
            if not st.exact_noise and not self.dg_capture_dir:
                batch.append((req_id, st, rows))
                continue
            try:
                self._dg_inject("head", req_id)
                if self.dg_capture_dir:
                    sched_t = temperature(st.params, st.cur_step)
                    full = head_logits(rows, vs.weight[: vs.size], self.dg_softcap)
                    self._dg_record(req_id, row, st, full, plan.rows[row].committed)
                pending.append(([req_id], head_step(st, rows, vs, **kw)))
                if self.dg_capture_dir:
                    st._sc_logits = full / sched_t
            except Exception as exc:  # noqa: BLE001 - this request only
                self._dg_fail(req_id, "denoising step", exc)
        if batch:
            try:
                pending.append(self._dg_head_batch(batch, vs, kw))
            except Exception:  # noqa: BLE001 - find the request(s) at fault, one by one
                for item in batch:
                    try:
                        pending.append(self._dg_head_batch([item], vs, kw))
                    except Exception as exc:  # noqa: BLE001
                        self._dg_fail(item[0], "denoising step", exc)
        # every head's rows reach the host in one copy, then each request's update
        owners = {id(p): ids for ids, p in pending}

        def failed(p, exc):
            for req_id in owners[id(p)]:
                self._dg_fail(req_id, "denoising step", exc)

        guided = []
        for req_id, _, off, n in entries:  # diffusion_grammar_every_step: mode B
            st = self.dg_states.get(req_id)
            if st is not None and st.grammar is not None and st.knobs.grammar_every_step:
                rows = hidden[off:off + n]
                pins = st.pins.tolist() if st.pins is not None else ()
                st.guide = (lambda am, st=st, rows=rows, pins=pins: torch.tensor(
                    self._dg_project(st, am.tolist(), rows, vs, pins)[0]))
                guided.append(st)
        finish_steps([p for _, p in pending], kw["normalizer"], on_error=failed)
        for st in guided:
            st.guide = None
        for req_id, _, off, n in entries:
            st = self.dg_states.get(req_id)
            if st is None or st.commit is None or not (st.bad_multi or st.grammar is not None
                                                        or self._dg_wants_lp(req_id)):
                continue
            try:
                self._dg_on_commit(req_id, st, hidden[off:off + n])
            except Exception as exc:  # noqa: BLE001 - this request only
                self._dg_fail(req_id, "commit", exc)
        for req_id, _, _, _ in entries:
            st = self.dg_states.get(req_id)
            if st is not None and st.knobs.stream_drafts and st.commit is None:
                draft = st.argmax[0].tolist()
                if st.grammar is not None:  # only the prefix the grammar accepts
                    start = grammar_start(st.reasoning, draft)
                    if start is not None:
                        draft = draft[:start + valid_prefix(st.grammar, draft[start:])]
                self.dg_drafts[req_id] = (draft, st.steps_this_canvas)

    def _dg_ends_here(self, row: int, req_id: str) -> bool:
        """Whether the canvas of `row` (a denoising step) is ready and its tokens end the request
        (engine/plan.py ``ends_request``, the scheduler's rule for a one-row last commit): then
        this step returns them (with ``dgemma_fuse_commit``; off, every canvas has its commit
        pass)."""
        st = self.dg_states[req_id]
        if not self.dg_fuse or st.commit is None:
            return False
        sp = self.requests[req_id].sampling_params
        ib = self.input_batch
        done = int(ib.num_tokens_no_spec[row])  # committed tokens: prompt + output
        return ends_request(st.commit.tolist(), num_output=done - int(ib.num_prompt_tokens[row]),
                            max_tokens=sp.max_tokens, stops=check_stop_ids(sp),
                            room=self.max_model_len - done)

    def _dg_wants_lp(self, req_id: str) -> bool:
        return self.requests[req_id].sampling_params.logprobs is not None

    def _dg_head_batch(self, batch, vs, kw):
        """Unseeded requests' head in one pass: `batch` holds (req_id, state, rows)."""
        for req_id, _, _ in batch:
            self._dg_inject("head", req_id)
        states = [st for _, st, _ in batch]
        rows = torch.cat([r for _, _, r in batch]) if len(batch) > 1 else batch[0][2]
        return [r for r, _, _ in batch], head_batch(states, rows, vs, generator=self.dg_batch_gen,
                                                    budget=self.dg_head_budget, **kw)

    def sample_tokens(self, grammar_output):
        """vLLM's; the argmax drafts of requests that stream them ride on the output
        (``dgemma_drafts``: request id -> (token ids, step)), the tokens of canvases ready to
        commit (``dgemma_ready``: request id -> ids) and the requests whose bookkeeping failed
        (``dgemma_failed``: request id -> message), all read by the plugin's scheduler."""
        out = super().sample_tokens(grammar_output)
        if self.dg_t_enter is not None:
            self.dg_time["runner"] += time.perf_counter() - self.dg_t_enter
            self.dg_t_enter = None
        drafts, self.dg_drafts = self.dg_drafts, {}
        ready, self.dg_ready = self.dg_ready, {}
        final, self.dg_final = self.dg_final, set()
        failed, self.dg_failed = self.dg_failed, {}
        if isinstance(out, V.ModelRunnerOutput) and out is not V.EMPTY_MODEL_RUNNER_OUTPUT:
            if drafts:
                out.dgemma_drafts = drafts
            if ready:
                out.dgemma_ready = ready
            if final:
                out.dgemma_final = final
            if failed:
                out.dgemma_failed = failed
        elif failed:  # nothing to carry them this step: report them with the next output
            self.dg_failed.update(failed)
        return out

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None,
                       inputs_embeds=None, **model_kwargs):
        """vLLM's forward; with ``dgemma_steps_per_engine_step`` k > 1 and a batch of denoising
        canvases only, up to k - 1 further denoising steps run here, inside the same forward
        context (same positions, attention metadata and KV slots; the canvas slots are rewritten
        each time and rolled back by the scheduler as usual). The group ends early when a canvas
        is ready to commit: the commit needs the scheduler."""
        t = time.perf_counter()
        out = super()._model_forward(input_ids=input_ids, positions=positions,
                                     intermediate_tensors=intermediate_tensors,
                                     inputs_embeds=inputs_embeds, **model_kwargs)
        self.dg_time["forward"] += time.perf_counter() - t
        plan = self.dg_step
        if self.dg_group <= 1 or plan is None or not plan.denoise_only or (
                input_ids is None and inputs_embeds is None):
            return out
        rows = self.dg_canvas_rows
        for _ in range(self.dg_group - 1):
            t = time.perf_counter()
            self._dg_denoise_all(plan, out[rows])
            self.dg_time["head"] += time.perf_counter() - t
            if any(r.req_id not in self.dg_states for r in plan.rows):
                self.dg_applied = True  # a request failed: let _sample report it
                return out
            states = [self.dg_states[r.req_id] for r in plan.rows]
            if any(st.commit is not None for st in states):
                self.dg_applied = True  # this forward's step is done; _sample returns no token
                return out
            ids = torch.cat([st.canvas[0] for st in states])
            if input_ids is not None:
                input_ids[rows] = to_device(ids.to(input_ids.dtype), input_ids.device)
            else:  # a multimodal model embeds before the forward (vLLM's runner): embed here
                model = self._dg_model()
                inputs_embeds[rows] = model.model.embed_input_ids(
                    to_device(ids, inputs_embeds.device)).to(inputs_embeds.dtype)
            self._dg_model().set_step(StepInputs(canvas_rows=rows,
                                                 soft_embeds=torch.cat([st.soft for st in states])))
            t = time.perf_counter()
            out = super()._model_forward(input_ids=input_ids, positions=positions,
                                         intermediate_tensors=intermediate_tensors,
                                         inputs_embeds=inputs_embeds, **model_kwargs)
            self.dg_time["forward"] += time.perf_counter() - t
            self.dg_inner_steps += 1
        return out

    def _sample(self, logits, spec_decode_metadata):
        # `logits` are the canvas rows' hidden states: the model's compute_logits hands them
        # through unchanged and the head runs here, tiled, on this rank's vocabulary.
        plan, self.dg_step = self.dg_step, None
        if plan is None:  # dummy / profile run
            return super()._sample(logits, spec_decode_metadata)
        applied, self.dg_applied = self.dg_applied, False
        num_reqs = len(plan.rows)
        out: list[list[int]] = [[] for _ in range(num_reqs)]
        emitted = {}  # row -> Logprobs of its committed tokens
        t_head = time.perf_counter()
        if not applied:
            self._dg_denoise_all(plan, logits)
        t_head = time.perf_counter() - t_head
        self.dg_time["head"] += t_head
        for row, rp in enumerate(plan.rows):
            req_id, mode = rp.req_id, rp.mode
            if mode in (PREFILL, IDLE) or req_id in self.dg_failed:
                continue
            try:
                if mode in (COMMIT, LAST):
                    self._dg_inject("commit", req_id)
                    out[row] = self._dg_finish_commit(self.dg_states[req_id]).tolist()
                elif mode == FUSED:  # committed in _prepare_inputs, before the new canvas started
                    out[row] = self.dg_fused_ids.pop(req_id).tolist()
                    if req_id in self.dg_fused_lp:
                        emitted[row] = self.dg_fused_lp.pop(req_id)
                elif mode == DENOISE and self._dg_ends_here(row, req_id):
                    # the request's last canvas: its tokens now, no commit pass (their K/V,
                    # the canvas's, are never read; the scheduler rolls nothing back)
                    self._dg_inject("commit", req_id)
                    out[row] = self._dg_finish_commit(self.dg_states[req_id]).tolist()
                    self.dg_final.add(req_id)
                    self.dg_final_commits += 1
                if out[row] and mode != FUSED and req_id in self.dg_logprobs:
                    emitted[row] = self.dg_logprobs.pop(req_id)
                if out[row] and self.dg_capture_dir and req_id in self.dg_capture:
                    self._dg_flush_capture(req_id)
                st = self.dg_states[req_id]
                if mode in (DENOISE, FUSED) and st.commit is not None:
                    # ready to commit: the scheduler decides whether the next step fuses it
                    self.dg_ready[req_id] = st.commit.tolist()
            except Exception as exc:  # noqa: BLE001 - this request only
                out[row] = []
                self._dg_fail(req_id, "commit", exc)
        self.dg_steps += 1
        if self.dg_debug_steps:
            print(f"[dgemma] step {self.dg_steps} {time.perf_counter() - self.dg_t0:.4f}s "
                  f"(head {t_head:.4f}s) plan={[(r.mode, r.n) for r in plan.rows]}", flush=True)
        width = max(2, max((len(t) for t in out), default=0))
        sampled = torch.full((num_reqs, width), -1, dtype=torch.int32)
        for row, toks in enumerate(out):
            if toks:
                sampled[row, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
        lp = self._dg_logprobs_tensors(out, emitted, width) if emitted else None
        return V.SamplerOutput(sampled_token_ids=to_device(sampled, self.device), logprobs_tensors=lp)

    def _dg_logprobs_tensors(self, out, emitted, width):
        """vLLM's logprobs rows for this step's committed tokens: ``[num_reqs * width, k + 1]``
        (the committed token, then the k most likely ids; k the largest asked for), aligned with
        the sampled-token rows; rows of other requests are never read."""
        k = max(lp.top_ids.shape[1] for lp in emitted.values())
        rows = len(out) * width
        ids = torch.zeros(rows, k + 1, dtype=torch.int32)
        vals = torch.zeros(rows, k + 1, dtype=torch.float32)
        ranks = torch.zeros(rows, dtype=torch.int32)
        for row, lp in emitted.items():
            n = len(out[row])
            a = row * width
            ids[a:a + n, 0] = torch.tensor(out[row], dtype=torch.int32)
            vals[a:a + n, 0] = lp.token[:n].cpu()
            ranks[a:a + n] = lp.rank[:n].cpu().int()
            j = lp.top_ids.shape[1]
            ids[a:a + n, 1:1 + j] = lp.top_ids[:n].cpu().int()
            vals[a:a + n, 1:1 + j] = lp.top[:n].cpu()
        return V.LogprobsTensors(ids, vals, ranks)

    # ------------------------------------------------------------------ capture (tests)
    def _dg_record(self, req_id, row, st, lg, committed: int = 0):
        sc = getattr(st, "_sc_logits", None) if st.steps_this_canvas > 0 else None
        self.dg_capture.setdefault(req_id, []).append({
            "prefix_len": int(self.input_batch.num_tokens_no_spec[row]) + committed,
            "canvas": st.canvas[0].clone(),
            "sc_logits": None if sc is None else sc.clone(),
            "logits": lg.detach().float().cpu().clone(),
        })

    def _dg_flush_capture(self, req_id):
        os.makedirs(self.dg_capture_dir, exist_ok=True)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in req_id)
        torch.save(self.dg_capture[req_id], os.path.join(self.dg_capture_dir, f"{safe}.pt"))
