"""Diffusion sampler parameters: checkpoint defaults, server overrides, per-request knobs.

Precedence (lowest to highest): the reference's built-in defaults, the checkpoint's
``generation_config.json``, server-level overrides, ``SamplingParams.extra_args`` of a request.
Every value is validated with an error that names the parameter and the allowed range.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

# The reference's built-in defaults (generation_diffusion_gemma.py, G226-234).
REFERENCE_DEFAULTS = dict(
    max_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
    stability_threshold=1, confidence_threshold=0.005,
)

# Per-request knob name (SamplingParams.extra_args / vllm_xargs) -> field.
EXTRA_ARGS = {
    "diffusion_max_steps": "max_steps",
    "diffusion_entropy_bound": "entropy_bound",
    "diffusion_t_min": "t_min",
    "diffusion_t_max": "t_max",
    "diffusion_stability_threshold": "stability_threshold",
    "diffusion_confidence_threshold": "confidence_threshold",
}

MAX_STEPS_LIMIT = 4096


@dataclass(frozen=True)
class DiffusionParams:
    max_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    temperature: float = 1.0  # SamplingParams.temperature: scales the schedule (0 = greedy)

    def validate(self) -> "DiffusionParams":
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_steps) or not 1 <= self.max_steps <= MAX_STEPS_LIMIT:
            raise ValueError(f"diffusion_max_steps must be an integer in [1, {MAX_STEPS_LIMIT}], "
                             f"got {self.max_steps!r}")
        if not is_num(self.entropy_bound) or self.entropy_bound <= 0:
            raise ValueError(f"diffusion_entropy_bound must be a number > 0, got {self.entropy_bound!r}")
        for name in ("t_min", "t_max"):
            v = getattr(self, name)
            if not is_num(v) or v <= 0:
                raise ValueError(f"diffusion_{name} must be a number > 0, got {v!r}")
        if self.t_min > self.t_max:
            raise ValueError(f"diffusion_t_min ({self.t_min}) must be <= diffusion_t_max ({self.t_max})")
        if not is_int(self.stability_threshold) or not 0 <= self.stability_threshold <= 64:
            raise ValueError("diffusion_stability_threshold must be an integer in [0, 64], "
                             f"got {self.stability_threshold!r}")
        if not is_num(self.confidence_threshold) or self.confidence_threshold < 0:
            raise ValueError("diffusion_confidence_threshold must be a number >= 0, "
                             f"got {self.confidence_threshold!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        return self

    def with_overrides(self, overrides: dict | None, *, source: str = "extra_args") -> "DiffusionParams":
        if not overrides:
            return self
        changes = {}
        for key, value in overrides.items():
            if key in EXTRA_ARGS:
                changes[EXTRA_ARGS[key]] = value
        return replace(self, **changes).validate() if changes else self


def from_generation_config(model_dir: str | None) -> DiffusionParams:
    """Defaults from the checkpoint's generation_config.json (reference defaults where absent)."""
    values = dict(REFERENCE_DEFAULTS)
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.isfile(path):
        with open(path) as f:
            g = json.load(f)
        if g.get("max_denoising_steps") is not None:
            values["max_steps"] = int(g["max_denoising_steps"])
        sc = g.get("sampler_config") or {}
        if sc.get("entropy_bound") is not None:
            values["entropy_bound"] = float(sc["entropy_bound"])
        for k in ("t_min", "t_max", "stability_threshold", "confidence_threshold"):
            if g.get(k) is not None:
                values[k] = g[k]
    return DiffusionParams(**values).validate()


def server_overrides(hf_config) -> dict:
    """Server-level defaults set at start-up with ``--hf-overrides`` using the per-request knob
    names, e.g. ``--hf-overrides '{"diffusion_max_steps": 16, "diffusion_t_min": 0.3}'``."""
    return {k: getattr(hf_config, k) for k in EXTRA_ARGS if getattr(hf_config, k, None) is not None}


# ----------------------------------------------------------------------------- request knobs
@dataclass(frozen=True)
class RequestKnobs:
    """Per-request canvas controls (``extra_args``): a shorter canvas, a starting canvas for the
    first block (editing / infill), and positions of that canvas that keep their seed token."""

    canvas_length: int | None = None
    seed_canvas: tuple[int, ...] | None = None
    pinned: tuple[int, ...] | None = None
    stream_drafts: bool = False
    grammar_every_step: bool = False  # structured outputs: project every step's argmax (mode B)


def parse_request_knobs(extra: dict | None, served_canvas: int, vocab_size: int) -> RequestKnobs:
    extra = extra or {}

    def int_list(name, value):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of integers, got {type(value).__name__}")
        bad = [x for x in value if not isinstance(x, int) or isinstance(x, bool)]
        if bad:
            raise ValueError(f"{name} must be a list of integers, got element {bad[0]!r} "
                             f"({type(bad[0]).__name__})")
        return tuple(value)

    n = extra.get("diffusion_canvas_length")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= served_canvas:
            raise ValueError(f"diffusion_canvas_length must be an integer in [1, {served_canvas}] "
                             f"(the served canvas), got {n!r}")
    length = n or served_canvas
    seed = extra.get("diffusion_seed_canvas")
    if seed is not None:
        seed = int_list("diffusion_seed_canvas", seed)
        if len(seed) != length:
            raise ValueError(f"diffusion_seed_canvas must hold exactly {length} token ids (the canvas "
                             f"length), got {len(seed)}")
        bad = [x for x in seed if not 0 <= x < vocab_size]
        if bad:
            raise ValueError(f"diffusion_seed_canvas ids must be in [0, {vocab_size}), got {bad[:5]}")
    pins = extra.get("diffusion_pinned")
    if pins is not None:
        pins = int_list("diffusion_pinned", pins)
        if seed is None:
            raise ValueError("diffusion_pinned needs diffusion_seed_canvas (pinned positions keep "
                             "their seed token)")
        bad = [x for x in pins if not 0 <= x < length]
        if bad or len(set(pins)) != len(pins):
            raise ValueError(f"diffusion_pinned must be distinct positions in [0, {length}), got "
                             f"{list(pins)[:8]}")
    def flag(name):
        v = extra.get(name, False)
        # JSON true arrives as 1 through the OpenAI server's vllm_xargs schema (str|int|float|list)
        if v not in (True, False) or not isinstance(v, (bool, int)):
            raise ValueError(f"{name} must be true or false (or 1 / 0), got {v!r}")
        return bool(v)

    return RequestKnobs(canvas_length=n, seed_canvas=seed, pinned=pins,
                        stream_drafts=flag("diffusion_stream_drafts"),
                        grammar_every_step=flag("diffusion_grammar_every_step"))
