"""The per-architecture config hook: makes vLLM's V1 engine serve DiffusionGemma through the
plugin's scheduler, worker and runner, with no extra command-line flags.

Plugin options travel on the HF config (so every process sees them) and are set with vLLM's
``--hf-overrides`` (``LLM(hf_overrides=...)``):

- ``dgemma_canvas_window``: ``"reference"`` (default; transformers eager/sdpa semantics for
  sliding layers in canvas mode) or ``"symmetric"`` (``|q-k| <= W-1``, as flash attention).
- ``dgemma_head_tile``: vocabulary columns per tile of the canvas head (default 4096 on CPU,
  32768 on GPU; see ``dgemma_vllm/refine/head.py``): the head's temporaries are bounded by it,
  whatever the number of requests.
- ``dgemma_head_compile``: fuse each head tile's elementwise passes after the softcap (max, exp,
  sums, cumsum) with ``torch.compile`` for unseeded requests (default true on CPU, false on GPU, where
  it has not been measured); compiled once at engine start, the eager passes if that fails.
  Seeded requests always take the eager passes (the reference's bits).
- ``dgemma_steps_per_engine_step``: denoising steps run inside one engine step when the batch holds
  only denoising canvases (default 1; 1-16). Requests cannot join or leave inside such a group;
  it saves vLLM's per-step scheduling and process hand-off. Token-exact with 1.
- ``dgemma_seeded_noise``: ``"host"`` or ``"device"``: where seeded requests draw the head's
  sampling noise (``seeded_noise``; default host on CPU, device on GPU).
- ``dgemma_fuse_commit``: run a canvas's commit pass and the next canvas's first denoising step in
  one forward (default true): the committed rows causal, the new canvas after them bidirectional,
  reading their K/V; a request's last canvas is returned by its last denoising step, with no
  commit pass. Token-exact with false (one forward per canvas fewer).
"""

from __future__ import annotations

import logging

from . import vllm_api as V

logger = logging.getLogger("dgemma_vllm")

ARCH = "DiffusionGemmaForBlockDiffusion"
# dgemma_head_tile / dgemma_head_compile None: by device (HEAD_TILE_DEFAULTS / head_compile)
OPTION_DEFAULTS = {"dgemma_canvas_window": "reference", "dgemma_head_tile": None,
                   "dgemma_steps_per_engine_step": 1, "dgemma_fuse_commit": True,
                   "dgemma_head_compile": None, "dgemma_seeded_noise": None}
SEEDED_NOISE = ("host", "device")


# Measured (benchmarks/RESULTS.md): on CPU [rows, 4096] fp32 temporaries stay in cache and a
# medium-geometry canvas forward is 1.41x faster than with one 32768-column tile; GPUs prefer
# few large tiles.
HEAD_TILE_DEFAULTS = {"cpu": 4096, "gpu": 32768}
# Elements of one [rows, columns] temporary of the batched (unseeded) head pass, whose rows are
# taken in chunks of budget // tile. On CPU 1 << 20 (256 rows of a 4096-column tile, 4 MiB in
# fp32): larger chunks spill the few temporaries of a tile out of the last-level cache when many
# canvases are batched (measured 1.18x on the head at 16 medium canvases). Seeded requests keep
# the head's default: their exact noise is drawn for whole vocabulary rows, budget // vocab rows
# at a time, and 32-row chunks made them 1.35x slower.
HEAD_BUDGET_DEFAULTS = {"cpu": 1 << 20, "gpu": 1 << 22}


def head_budget(device_type: str) -> int:
    return HEAD_BUDGET_DEFAULTS["cpu" if device_type == "cpu" else "gpu"]


def head_tile(options: dict, device_type: str) -> int:
    tile = options["head_tile"]
    return int(tile) if tile is not None else HEAD_TILE_DEFAULTS["cpu" if device_type == "cpu" else "gpu"]


def head_compile(options: dict, device_type: str) -> bool:
    """Measured on CPU only (benchmarks/RESULTS.md, 2026-11-29): on by default there."""
    c = options["head_compile"]
    return bool(c) if c is not None else device_type == "cpu"


def seeded_noise(options: dict, device_type: str) -> str:
    """Where seeded requests draw the head's sampling noise: ``host`` (the request's CPU generator
    in the reference's order: token-exact with transformers on the CPU; on a GPU every denoising
    step then draws rows x vocabulary numbers on the host and copies them over) or ``device`` (a
    generator on the model's device seeded with the request's seed: reproducible per seed and
    device, not equal to the CPU reference's draws). Default: host on CPU, device elsewhere."""
    v = options["seeded_noise"]
    return v if v is not None else ("host" if device_type == "cpu" else "device")


def plugin_options(vllm_config) -> dict:
    hf = vllm_config.model_config.hf_config
    return {k.removeprefix("dgemma_"): getattr(hf, k, v) for k, v in OPTION_DEFAULTS.items()}


def validate_options(hf) -> None:
    """Start-up check of the plugin options on the HF config (error names option and range)."""
    window = getattr(hf, "dgemma_canvas_window", OPTION_DEFAULTS["dgemma_canvas_window"])
    if window not in ("reference", "symmetric"):
        raise ValueError(f"dgemma_canvas_window must be 'reference' or 'symmetric', got {window!r}")
    noise = getattr(hf, "dgemma_seeded_noise", None)
    if noise is not None and noise not in SEEDED_NOISE:
        raise ValueError(f"dgemma_seeded_noise must be 'host' or 'device', got {noise!r}")
    for name in ("dgemma_fuse_commit", "dgemma_head_compile"):
        v = getattr(hf, name, OPTION_DEFAULTS[name])
        if not isinstance(v, bool) and not (v is None and name == "dgemma_head_compile"):
            raise ValueError(f"{name} must be true or false, got {v!r}")
    for name, hi in (("dgemma_head_tile", 1 << 24), ("dgemma_steps_per_engine_step", 16)):
        v = getattr(hf, name, OPTION_DEFAULTS[name])
        if v is None and name == "dgemma_head_tile":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
            raise ValueError(f"{name} must be an integer in [1, {hi}], got {v!r}")


def canvas_length_of(hf_config) -> int:
    return int(getattr(hf_config, "dgemma_canvas_length", None) or 256)


def canvas_positions(extra_args: dict | None, served_canvas: int, room: int) -> int:
    """Canvas positions a request gets: its `diffusion_canvas_length` (else the served canvas),
    cut to the `room` left under max_model_len at the very end of the context. The scheduler
    reserves exactly this many slots and the runner builds a canvas of this length."""
    n = (extra_args or {}).get("diffusion_canvas_length") or served_canvas
    return max(0, min(n, room))


def _fa4_supported() -> bool:
    try:
        from vllm.v1.attention.backends.fa_utils import is_fa_version_supported

        return bool(is_fa_version_supported(4))
    except Exception:  # noqa: BLE001 - no FlashAttention build at all
        return False


def compile_checks(vllm_config, cpu: bool) -> None:
    """The model forward compiles as vLLM compiles its own models unless ``--enforce-eager``
    (model/dgemma.py, ``DecoderStack``): torch.compile (inductor) on the CPU; on a GPU piecewise
    CUDA graphs, split at the attention op. Two exceptions, decided here at start-up:

    - LoRA adapters run eagerly (``enforce_eager`` is set, with a log line): the adapters' per-row
      mapping (Punica's token indices, rebuilt by the runner every step) has not been proven under
      the plugin's compiled stack on either platform;
    - full CUDA graphs (``cudagraph_mode`` FULL, FULL_DECODE_ONLY or FULL_AND_PIECEWISE, the
      latter vLLM's default) would capture the attention call with the metadata of the capture
      batch, while the plugin rewrites that metadata every step (per-request causal flags, the
      canvas window's prefix ranges, the fused-commit split): the default becomes PIECEWISE and an
      explicit full mode is refused."""
    mc = vllm_config.model_config
    if mc.enforce_eager:
        return
    if getattr(vllm_config, "lora_config", None) is not None:
        logger.info("dgemma_vllm: LoRA adapters run the model eagerly (enforce_eager=True)")
        mc.enforce_eager = True
        return
    if cpu:
        return
    from vllm.config import CUDAGraphMode

    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if mode is None:
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode not in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        raise ValueError(
            f"dgemma_vllm: cudagraph_mode={mode.name} captures the attention call, whose metadata "
            "the plugin rewrites every step; use PIECEWISE (the plugin's default), NONE, or "
            "--enforce-eager")


def gpu_config_checks(vllm_config) -> None:
    """What the plugin's GPU path can serve, decided at start-up (the plugin's hook replaces
    vLLM's own DiffusionGemma hook, so its FlashInfer refusal and FA4 choice are made here):

    - the canvas window: ``reference`` (the default) runs through Triton's multimodal-prefix
      ranges (runner.reference_window_metadata); FlashAttention would apply the symmetric window,
      so ``reference`` with FLASH_ATTN is refused rather than silently served as ``symmetric``;
    - attention backend: Triton (the default here) or FlashAttention 4 (per-request causal
      flags; FA2/FA3 raise at the first canvas); FlashInfer takes one causal flag per batch and
      anything else is untested with the canvas: refused;
    - model runner V2 (forced by VLLM_USE_V2_MODEL_RUNNER=1, watermarking or HiSparse) and
      dual-batch overlap (its micro-batches drop the per-request causal flags): refused."""
    hf = vllm_config.model_config.hf_config
    window = getattr(hf, "dgemma_canvas_window", OPTION_DEFAULTS["dgemma_canvas_window"])
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as B

    att = vllm_config.attention_config
    backend = getattr(att, "backend", None)
    if backend is None:
        att.backend = B.TRITON_ATTN
    elif backend == B.FLASH_ATTN:
        if window == "reference":
            raise ValueError(
                "dgemma_vllm: dgemma_canvas_window='reference' (the default: transformers' "
                "sliding-window rule for canvas rows) runs on GPU through TRITON_ATTN's prefix "
                "ranges only; with FLASH_ATTN pass --hf-overrides "
                "'{\"dgemma_canvas_window\": \"symmetric\"}' (flash attention's rule, as upstream "
                "vLLM) or use TRITON_ATTN (the default)")
        version = getattr(att, "flash_attn_version", None)
        if version is None and _fa4_supported():
            att.flash_attn_version = 4
        elif version != 4:
            raise ValueError(
                "dgemma_vllm: --attention-backend FLASH_ATTN needs FlashAttention 4 (per-request "
                f"causal flags for canvas rows); flash_attn_version={version} "
                f"(FA4 available: {_fa4_supported()}). Use TRITON_ATTN (the default)")
        if getattr(hf, "dgemma_fuse_commit", True):
            # FA's builder can reuse group 0's metadata with the unsplit block table for other
            # KV-cache groups (update_block_table): the fused split is not safe there
            logger.warning("dgemma_vllm: dgemma_fuse_commit is turned off with FLASH_ATTN")
            hf.dgemma_fuse_commit = False
    elif backend != B.TRITON_ATTN:
        raise ValueError(
            f"dgemma_vllm: --attention-backend {getattr(backend, 'name', backend)} cannot run the "
            "canvas (one causal flag per batch, or untested with per-request flags); use "
            "TRITON_ATTN (the default) or FLASH_ATTN with FlashAttention 4")
    try:
        v2 = bool(vllm_config.use_v2_model_runner)
    except (AttributeError, ValueError):
        v2 = False
    if v2:
        raise ValueError(
            "dgemma_vllm drives vLLM's V1 model runner; model runner V2 is selected "
            "(VLLM_USE_V2_MODEL_RUNNER=1, watermarking or HiSparse): unset it / turn those off")
    if getattr(vllm_config.parallel_config, "enable_dbo", False):
        raise ValueError("dgemma_vllm does not support dual-batch overlap (--enable-dbo): its "
                         "micro-batches drop the canvas rows' per-request causal flags")


def pipeline_checks(par, hf) -> None:
    """Pipeline stages: the canvas state and head live on the last stage, which hands the plan,
    the canvas ids and the self-conditioning input to the others every step (runner
    ``_dg_pp_exchange``). Denoising steps grouped inside one engine step re-run the forward from
    the last stage's runner, which a pipeline cannot: refused."""
    pp = int(getattr(par, "pipeline_parallel_size", 1) or 1)
    steps = getattr(hf, "dgemma_steps_per_engine_step", OPTION_DEFAULTS["dgemma_steps_per_engine_step"])
    if pp > 1 and steps != 1:
        raise ValueError(f"dgemma_vllm: dgemma_steps_per_engine_step={steps} needs "
                         f"pipeline_parallel_size=1 (got {pp}): grouped denoising steps re-run the "
                         "forward from the last stage; use 1 with pipeline parallelism")


class DGemmaConfigHook(V.VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        hf = model_config.hf_config
        # vLLM treats any config with `canvas_length` as its own diffusion path (V2 runner only);
        # keep the value under our own name and hide it from that check.
        if getattr(hf, "canvas_length", None) is not None:
            hf.dgemma_canvas_length = int(hf.canvas_length)
            hf.canvas_length = None
        elif getattr(hf, "dgemma_canvas_length", None) is None:
            hf.dgemma_canvas_length = 256
        # Admission-time validation of SamplingParams (see validation.py).
        validator = "dgemma_vllm.engine.validation:DGemmaParamsValidator"
        procs = list(model_config.logits_processors or [])
        others = [p for p in procs if p != validator]
        if others:
            raise ValueError("dgemma_vllm does its own sampling and cannot apply custom logits "
                             f"processors; got logits_processors={others}")
        model_config.logits_processors = [validator]
        from dgemma_vllm.refine.params import DiffusionParams, server_overrides

        from . import validation

        overrides = server_overrides(hf)
        DiffusionParams().with_overrides(overrides)  # bad server defaults fail at start-up
        validation.SERVED.update(canvas_length=hf.dgemma_canvas_length,
                                 vocab_size=hf.text_config.vocab_size, defaults=overrides,
                                 image_token_id=getattr(hf, "image_token_id", None)
                                 if getattr(hf, "vision_config", None) is not None else None)
        V.wrap_prompt_validation(validation.validate_prompt)
        validate_options(hf)

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        from . import validation

        so_cfg = getattr(vllm_config, "structured_outputs_config", None)
        # Constraints after a reasoning section follow vLLM's token-id rule for engine-adapter
        # reasoners (Gemma 4's is one); another reasoner's end is found by streaming calls the
        # worker cannot make: constrained requests are then refused (validation.py).
        name = getattr(so_cfg, "reasoning_parser", None) or None
        validation.SERVED["reasoning_unsupported"] = None
        validation.SERVED["reasoning_gate"] = bool(name) and not getattr(so_cfg, "enable_in_reasoning", False)
        validation.SERVED["vllm_config"] = vllm_config  # for the pins check (front end)
        if name and not getattr(so_cfg, "enable_in_reasoning", False):
            try:
                cls = V.reasoning_parser_class(name)
            except Exception:  # noqa: BLE001 - vLLM reports an unknown parser itself
                cls = None
            if not V.is_engine_reasoner(cls):
                validation.SERVED["reasoning_unsupported"] = name

        lora = getattr(vllm_config, "lora_config", None)
        if lora is not None:  # the routed experts take no adapter (model/lora.py)
            from dgemma_vllm.model.lora import check_target_modules

            lora.target_modules = check_target_modules(lora.target_modules)

        sched = vllm_config.scheduler_config
        par = vllm_config.parallel_config
        default_sched = "vllm.v1.core.sched.scheduler.Scheduler"
        cur = getattr(sched, "scheduler_cls", None)
        if cur in (None, "", default_sched) or (isinstance(cur, type) and cur is V.Scheduler):
            sched.scheduler_cls = "dgemma_vllm.engine.scheduler.DGemmaScheduler"
        if par.worker_cls in (None, "", "auto"):
            par.worker_cls = ("dgemma_vllm.engine.worker.DGemmaCPUWorker" if current_platform.is_cpu()
                              else "dgemma_vllm.engine.worker.DGemmaGPUWorker")
        for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
            if int(getattr(par, name, 1) or 1) > 1:
                raise ValueError(f"dgemma_vllm does not support {name}={getattr(par, name)} (context "
                                 "parallelism splits the canvas' attention sequences); use 1")
        hf = vllm_config.model_config.hf_config
        pipeline_checks(par, hf)
        unknown = V.unknown_attention_metadata_fields()
        if unknown and getattr(hf, "dgemma_fuse_commit", True):
            logger.warning("dgemma_vllm: this vLLM's attention metadata has fields the fused-commit "
                           "split does not know (%s): dgemma_fuse_commit is turned off", unknown)
            hf.dgemma_fuse_commit = False
        # The runner keeps refinement state between steps: synchronous scheduling only.
        if getattr(sched, "async_scheduling", None) is None:
            sched.async_scheduling = False
        if sched.async_scheduling:
            raise ValueError("dgemma_vllm needs async_scheduling=False (the canvas state machine is "
                             "synchronous)")
        if not current_platform.is_cpu():
            gpu_config_checks(vllm_config)
        # An image's tokens attend to the whole image (engine/attention.py): one prefill chunk
        # must hold all of it (vLLM then schedules an image that does not fit in the next step).
        if hasattr(sched, "disable_chunked_mm_input"):
            sched.disable_chunked_mm_input = True
        mc = vllm_config.model_config
        compile_checks(vllm_config, current_platform.is_cpu())
        if mc.max_model_len < canvas_length_of(mc.hf_config) + 1:
            raise ValueError(f"max_model_len ({mc.max_model_len}) must exceed the canvas length "
                             f"({canvas_length_of(mc.hf_config)})")
