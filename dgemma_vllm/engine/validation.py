"""Admission-time validation of SamplingParams for DiffusionGemma requests.

vLLM calls ``validate_params`` of every configured custom logits processor for each request in
the front-end process, before anything reaches the engine; a ``VLLMValidationError`` becomes an
HTTP 400 on the OpenAI server and a ``ValueError`` offline. The plugin registers
:class:`DGemmaParamsValidator` through its config hook for exactly that: whatever the plugin
does not honour is refused with a message that names the parameter, never silently ignored.
(Its ``apply`` is never on the hot path: the plugin's runner does its own sampling.)
"""

from __future__ import annotations

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import LogitsProcessor

from dgemma_vllm.refine.params import EXTRA_ARGS, DiffusionParams, parse_request_knobs

# Knobs of upstream DiffusionGemma users that this version of the plugin does not implement yet.
NOT_YET: tuple[str, ...] = ()
CANVAS_KNOBS = ("diffusion_canvas_length", "diffusion_seed_canvas", "diffusion_pinned",
                "diffusion_stream_drafts", "diffusion_grammar_every_step")

# Served geometry, recorded by the config hook in this (front-end) process.
SERVED = {"canvas_length": 256, "vocab_size": 262144, "defaults": {}}


def _reject(parameter: str, message: str, value=None):
    raise VLLMValidationError(f"{parameter}: {message}", parameter=parameter, value=value)


def validate_prompt(prompt_input) -> None:
    """A prompt that holds the image token but carries no image (the reference refuses it too:
    its image rows would have no features) is refused, naming the token."""
    image = SERVED.get("image_token_id")
    if image is None or prompt_input.get("type") in ("multimodal", "embeds"):
        return
    if image in (prompt_input.get("prompt_token_ids") or ()):
        _reject("prompt", f"holds the image token <|image|> (id {image}) but the request carries "
                "no image: send the image with it (multi_modal_data, or an image part of a chat "
                "message), or leave the token out", None)


def validate_sampling_params(sp) -> None:
    # Everything else vLLM validates itself (ranges, vocabulary ids, max_logprobs) before this.
    unsupported = [
        ("prompt_logprobs", sp.prompt_logprobs is not None,
         "not defined for block diffusion: DiffusionGemma scores tokens only as canvas positions "
         "of a denoising step, and the causal encoder pass over the prompt predicts no next "
         "token (use logprobs for the generated tokens)"),
    ]
    so = sp.structured_outputs
    if so is not None:
        backend = getattr(so, "_backend", None)
        if backend not in (None, "xgrammar"):
            _reject("structured_outputs", f"needs the xgrammar backend (got {backend!r}; "
                    "--structured-outputs-config.backend xgrammar or auto)", backend)
        if SERVED.get("reasoning_unsupported"):
            _reject("structured_outputs", "is not supported with --reasoning-parser "
                    f"{SERVED['reasoning_unsupported']} by dgemma_vllm (supported: reasoning "
                    "parsers built on vLLM's parser engine, such as gemma4; or "
                    "--structured-outputs-config.enable_in_reasoning true)", None)
    for name, bad, why in unsupported:
        if bad:
            _reject(name, why, getattr(sp, name, None))
    t = sp.temperature
    if not isinstance(t, (int, float)) or t < 0:
        _reject("temperature", "must be a number >= 0 (1.0 = reference schedule, 0 = greedy)", t)
    extra = sp.extra_args or {}
    for key in extra:
        if key in NOT_YET:
            _reject(key, "is not supported by this version of dgemma_vllm", extra[key])
        if key.startswith("diffusion_") and key not in EXTRA_ARGS and key not in CANVAS_KNOBS:
            _reject(key, f"unknown diffusion knob; known: {sorted([*EXTRA_ARGS, *CANVAS_KNOBS])}",
                    extra[key])
    try:
        DiffusionParams().with_overrides({**SERVED["defaults"], **extra})
        knobs = parse_request_knobs(extra, SERVED["canvas_length"], SERVED["vocab_size"])
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise VLLMValidationError(str(e), parameter=name) from None
    if knobs.stream_drafts and sp.n != 1:
        _reject("diffusion_stream_drafts", f"needs n = 1 (got n = {sp.n})", True)
    if so is not None and knobs.pinned:
        _check_pins(sp, knobs)
    if knobs.grammar_every_step and so is None:
        _reject("diffusion_grammar_every_step", "needs a constraint (structured_outputs, "
                "response_format or a forced tool choice)", True)


_FRONTEND_GRAMMAR = {}


def _check_pins(sp, knobs) -> None:
    """Pinned tokens that contradict the constraint are a 400 where that is known before the
    request runs: the pins that form the start of the first canvas (positions 0, 1, ... each
    pinned), which the grammar must accept from its start. A pin after an unpinned position
    depends on what the canvas holds before it; the projection at commit keeps it where the
    grammar allows it and replaces it otherwise (README). Under a reasoning parser the grammar
    starts after the reasoning, so nothing is known here."""
    cfg = SERVED.get("vllm_config")
    if cfg is None or SERVED.get("reasoning_gate"):
        return
    pinned = set(knobs.pinned)
    k = 0
    while k in pinned:
        k += 1
    if k == 0:
        return
    from .grammars import backend_for, matcher_for

    if "backend" not in _FRONTEND_GRAMMAR:
        _FRONTEND_GRAMMAR["backend"] = backend_for(cfg)
    m = matcher_for(_FRONTEND_GRAMMAR["backend"], sp.structured_outputs)
    for i, t in enumerate(knobs.seed_canvas[:k]):
        if m.is_terminated() or not m.accept_token(int(t)):
            _reject("diffusion_pinned", f"the token {t} pinned at canvas position {i} contradicts "
                    "the request's constraint (structured_outputs / response_format / tools): "
                    "the grammar does not allow the pinned start of the canvas", list(knobs.pinned))


class DGemmaParamsValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
