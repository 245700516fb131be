"""Block refinement exactly as the reference (transformers' DiffusionGemma `generate`).

Engine-free: plain torch on one request's canvas. The engine runs the tiled head
(:mod:`dgemma_vllm.refine.head`) and :func:`apply_step` once per denoising step of a request;
:func:`refine_step` is the same step from full canvas logits; this module owns the temperature
schedule, sampling, entropy-bound acceptance, uniform renoising, stable-and-confident stopping
and the choice of the committed (argmax) canvas.

Random draws follow the reference's order on the request's own generator: per canvas one
``randint`` for the initial canvas; per step the ``multinomial`` draw, then the ``randint`` for
renoising. With a CPU generator seeded ``s`` this reproduces ``torch.manual_seed(s)`` followed
by ``model.generate`` for that prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .device import draw_device, to_device

from .params import DiffusionParams


@dataclass
class CanvasState:
    """Refinement state of one request between engine steps."""

    params: DiffusionParams
    vocab_size: int
    generator: torch.Generator | None
    # the head's sampling noise, when not `generator` (``dgemma_seeded_noise="device"``: a
    # generator on the model's device, seeded like `generator`)
    noise_generator: torch.Generator | None = None
    exact_noise: bool = True  # reference-order multinomial draws (seeded requests)
    canvas: torch.Tensor | None = None  # [1, n] current (noisy) canvas
    argmax: torch.Tensor | None = None  # [1, n] argmax canvas of the last step
    history: torch.Tensor | None = None  # [stability, 1, n] previous argmax canvases
    cur_step: int = 0  # steps remaining, N..1 (reference `cur_step`)
    soft: torch.Tensor | None = None  # [n, hidden] self-conditioning for the next step
    seed: torch.Tensor | None = None  # [1, n] seed canvas of a canvas with pinned positions
    pins: torch.Tensor | None = None  # positions that keep their seed token
    commit: torch.Tensor | None = None  # [n] tokens to commit (set when the canvas is done)
    # vLLM sampling parameters (refine/filters.py): logit edits of the current canvas (rebuilt
    # at each canvas start) and the draw filter; None: none
    edits: object | None = None
    filter: object | None = None
    grammar: object | None = None  # the request's grammar matcher (structured outputs)
    reasoning: object | None = None  # its ReasoningGate (refine/grammar.py) under a reasoning parser
    grammar_from: int | None = 0  # where the grammar starts in the pending commit (None: nowhere)
    # set for one step by the engine (structured outputs, diffusion_grammar_every_step): the
    # step's argmax row [n] -> its projection onto the grammar (refine/grammar.py), see apply_steps
    guide: object | None = None
    bad_single: list = field(default_factory=list)
    bad_multi: list = field(default_factory=list)
    # statistics
    canvases: int = 0
    steps: int = 0
    steps_this_canvas: int = 0
    step_log: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if self.canvas is None else self.canvas.shape[1]

    committed_hash: int = 0  # of every committed canvas (tensor-parallel ranks must agree)

    def stats(self) -> dict:
        return {"canvases": self.canvases, "denoising_steps": self.steps,
                "committed_hash": self.committed_hash}

    def start_canvas(self, n: int, seed: torch.Tensor | None = None,
                     pins: torch.Tensor | None = None) -> None:
        """Initial canvas: uniform over the full vocabulary (reference G394-404). A seed canvas
        (the reference's ``decoder_input_ids``) replaces it; the uniform draw still happens, as
        in the reference, so the noise that follows is the same. `pins`: positions that keep
        their seed token through every step and in the committed canvas."""
        self.canvas = torch.randint(0, self.vocab_size, (1, n), generator=self.generator)
        if seed is not None:
            self.canvas = seed.view(1, n).clone()
        self.seed = self.canvas.clone() if pins is not None else None
        self.pins = pins
        self.argmax = self.canvas
        self.history = None
        self.cur_step = self.params.max_steps
        self.soft = None
        self.commit = None
        self.steps_this_canvas = 0

    def finish_commit(self) -> torch.Tensor:
        ids = self.commit
        self.committed_hash = hash((self.committed_hash, tuple(ids.tolist())))
        self.canvases += 1
        self.canvas = self.argmax = self.history = self.soft = self.commit = None
        self.seed = self.pins = None
        return ids


def temperature(params: DiffusionParams, cur_step: int) -> torch.Tensor:
    """Linear schedule, computed as the reference does (fp32 tensor arithmetic, G315)."""
    step = torch.tensor(cur_step, dtype=torch.int32)
    return params.t_min + ((params.t_max - params.t_min) * (step / params.max_steps))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``Categorical(logits=logits).entropy()`` with the same operations (so the same bits),
    without the distribution object's validation and caching overhead."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    return -(torch.clamp(norm, min=torch.finfo(norm.dtype).min) * probs).sum(-1)


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row from a single uniform per row (inverse CDF). Used for
    unseeded requests: ``multinomial`` draws one exponential per vocabulary entry, which on CPU
    costs more than the rest of the sampler. Same distribution, different random stream."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype,
                   device=draw_device(generator))
    u = to_device(u, cdf.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def refine_step(state: CanvasState, raw_logits: torch.Tensor):
    """One denoising step for one request from its full canvas logits (the untiled path; the
    engine uses :func:`dgemma_vllm.refine.head.canvas_head` + :func:`apply_step`). `raw_logits`
    are the softcapped fp32 canvas logits ``[n, vocab]``. Updates `state` and returns
    ``(processed, probs)``: the processed (temperature-scaled) logits ``[n, vocab]`` that
    self-condition the next step, and their softmax when it was computed (else None)."""
    p = state.params
    logits = raw_logits[None].float()  # [1, n, V]
    sched_t = temperature(p, state.cur_step)
    processed = logits / sched_t
    n = logits.shape[1]
    v = logits.shape[2]
    probs = None
    if p.temperature == 0.0:  # greedy: no sampling noise (renoising still draws)
        denoiser = processed.argmax(-1)
    else:
        scaled = processed if p.temperature == 1.0 else logits / (sched_t * p.temperature)
        sample_probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
        if p.temperature == 1.0:
            probs = sample_probs
        if state.exact_noise:
            denoiser = torch.multinomial(sample_probs.view(-1, v), num_samples=1,
                                         generator=state.generator).view(1, n)
        else:
            denoiser = sample_inverse_cdf(sample_probs.view(-1, v), state.generator).view(1, n)
    apply_step(state, denoiser.view(-1), processed.argmax(-1).view(-1), entropy(processed).view(-1))
    return processed[0], (None if probs is None else probs[0])


@torch.no_grad()
def apply_step(state: CanvasState, denoiser: torch.Tensor, new_argmax: torch.Tensor,
               ent: torch.Tensor) -> None:
    """The per-row part of a denoising step, given each row's sampled token, argmax token and
    entropy (``[n]`` each): acceptance, renoising, pins, stopping, and the commit decision."""
    apply_steps([state], denoiser, new_argmax, ent, state.generator)


@torch.no_grad()
def apply_steps(states: list[CanvasState], denoiser: torch.Tensor, new_argmax: torch.Tensor,
                ent: torch.Tensor, generator: torch.Generator) -> None:
    """:func:`apply_step` for several requests at once (rows concatenated in `states` order):
    acceptance, renoising (one draw from the shared `generator` for all rows), stopping and the
    commit decision as tensor operations over each group of equal canvas length; per request only
    the bookkeeping. Pins are applied per request (editing requests are rare)."""
    offsets, o = [], 0
    for st in states:
        offsets.append(o)
        o += st.length
    groups: dict[int, list[int]] = {}
    for i, st in enumerate(states):
        groups.setdefault(st.length, []).append(i)
    noise_all = torch.randint(0, states[0].vocab_size, (o,), generator=generator) if states else None
    for n, idx in groups.items():
        if len(idx) == len(states):  # one canvas length (the common case): rows in order
            pick = lambda t: t.view(-1, n)  # noqa: E731
        else:
            rows = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in idx])
            pick = lambda t, rows=rows: t[rows].view(-1, n)  # noqa: E731
        den = pick(denoiser)
        am = pick(new_argmax).clone()
        en = pick(ent)
        noise = pick(noise_all)
        bound = torch.tensor([states[i].params.entropy_bound for i in idx], dtype=en.dtype)[:, None]
        sorted_ent, order = torch.sort(en, dim=-1, descending=False)
        cum = torch.cumsum(sorted_ent, dim=-1)
        sel = cum - sorted_ent <= bound
        accepted_mask = torch.scatter(torch.zeros_like(sel), dim=-1, index=order, src=sel)
        # every position is rewritten: accepted ones by their draw, the others renoised
        canvas = torch.where(accepted_mask, den, noise)
        for b, i in enumerate(idx):
            st = states[i]
            if st.pins is not None:
                canvas[b, st.pins] = st.seed[0, st.pins]
                am[b, st.pins] = st.seed[0, st.pins]
            if st.guide is not None:
                # grammar guidance: the argmax projected onto the grammar stands for this step's
                # draft (stability, commit), and an accepted position whose argmax the grammar
                # refused takes the projected token, so the next step sees the structure (pinned
                # positions keep their seed token in the canvas)
                proj = st.guide(am[b]).to(am.dtype)
                fix = (proj != am[b]) & accepted_mask[b]
                if st.pins is not None:
                    fix[st.pins] = False
                canvas[b] = torch.where(fix, proj, canvas[b])
                am[b] = proj
        conf = torch.tensor([states[i].params.confidence_threshold for i in idx], dtype=en.dtype)
        confident = (en.mean(-1) < conf).tolist()
        stable = [True] * len(idx)
        by_thr: dict[int, list[int]] = {}
        for b, i in enumerate(idx):
            t = states[i].params.stability_threshold
            if t:
                by_thr.setdefault(t, []).append(b)
        for t, bs in by_thr.items():
            hist = torch.stack([states[idx[b]].history.view(t, n) if states[idx[b]].history is not None
                                else torch.full((t, n), -1, dtype=am.dtype) for b in bs])
            cur = am[bs]
            same = (hist == cur[:, None]).all(-1).all(-1).tolist()
            hist = torch.cat([hist[:, 1:], cur[:, None]], 1)
            for j, b in enumerate(bs):
                stable[b] = same[j]
                states[idx[b]].history = hist[j].view(t, 1, n)
        for b, i in enumerate(idx):
            st = states[i]
            st.canvas = canvas[b:b + 1]
            st.argmax = am[b:b + 1]
            st.steps += 1
            st.steps_this_canvas += 1
            st.cur_step -= 1
            if (stable[b] and confident[b]) or st.cur_step == 0:
                st.commit = am[b].clone()
