"""DiffusionGemmaForBlockDiffusion built from vLLM's layers.

One backbone weight set (vLLM's ``Gemma4Model``: QKV/MLP parallel linears, RMSNorm, the
proportional partial RoPE of full layers, FusedMoE with the Gemma 4 router and per-expert
scale, vocab-parallel embedding) serves both modes of the reference:

- encoder / commit rows: ``E[ids]*sqrt(H)`` through the layers with causal attention, the
  encoder's ``layer_scalar`` set; their K/V are committed to the paged cache;
- canvas rows: ``post_norm(E[ids]*sqrt(H) + SC_MLP(pre_norm(soft)))`` through the same layers
  with bidirectional attention and the decoder's ``layer_scalar`` set; then the tied head,
  fp32, softcap 30.

The runner tells the model which rows of a batch are canvas rows and hands it their
self-conditioning soft embeddings (``[rows, hidden]``) through :meth:`set_step`.

Images (prompt rows only; canvases never hold one): transformers' Gemma 4 vision tower (plain
torch; vLLM's Gemma 4 image model cannot be imported without torchvision, and builds the same
module with ``AutoModel.from_config``), then the multimodal embedder; vLLM merges the features,
unscaled, at the image-token rows. Image tokens attend bidirectionally within their image on
every layer (engine/attention.py), DiffusionGemma's rule (plain Gemma 4 keeps full layers causal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from dgemma_vllm.engine import vllm_api as V
from dgemma_vllm.model.lora import LORA_RENAMES

logger = logging.getLogger("dgemma_vllm")

SOFTCAP = 30.0  # DiffusionGemma's final_logit_softcapping (a class default in transformers)


def softcap_of(hf_config) -> float:
    """The head's logit softcap: ``text_config.final_logit_softcapping`` (the release's config.json
    writes 30.0; transformers' class default is the same, and its reference reads this field)."""
    text = getattr(hf_config, "text_config", hf_config)
    v = getattr(text, "final_logit_softcapping", None)
    return float(v) if v else SOFTCAP


@dataclass
class StepInputs:
    """Per-forward inputs the runner passes to the model (None: every row is causal)."""

    canvas_rows: torch.Tensor  # int64 [n] token indices of canvas rows in the flat batch
    soft_embeds: torch.Tensor | None  # [n, hidden] self-conditioning soft embeddings, or None (zeros)


def refuse_quantized_head(lm_head, embed_tokens) -> None:
    """The canvas head reads the tied embedding's float rows itself (refine/head.py), so a
    quantization method on ``lm_head`` or ``embed_tokens`` is refused when the model is built
    (engine start), naming the module."""
    for name, mod in (("lm_head", lm_head), ("embed_tokens", embed_tokens)):
        method = type(getattr(mod, "quant_method", None)).__name__
        if method not in ("NoneType", "UnquantizedEmbeddingMethod"):
            raise ValueError(f"dgemma_vllm: a quantized {name} ({method}) is not supported: the "
                             "canvas head reads the tied embedding's float weights; keep lm_head "
                             "and embed_tokens out of the quantization (its ignore list)")


class SelfConditioning(nn.Module):
    """``post_norm(x + down(gelu_tanh(gate(pre_norm(s))) * up(pre_norm(s))))``; post_norm has no
    weight (reference: DiffusionGemmaSelfConditioning)."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        h = config.hidden_size
        self.pre_norm = V.RMSNorm(h, eps=config.rms_norm_eps)
        self.post_norm = V.RMSNorm(h, eps=config.rms_norm_eps, has_weight=False)
        self.mlp = V.Gemma4MLP(h, config.intermediate_size, config.hidden_activation,
                               quant_config=quant_config, prefix=f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is None:  # first step: the reference feeds zeros, and pre_norm(0) = 0 -> MLP(0) = 0
            return self.post_norm(x)
        return self.post_norm(x + self.mlp(self.pre_norm(soft)))


class MultimodalEmbedder(nn.Module):
    """RMSNorm without weight, then a bias-free projection to the text width (reference:
    DiffusionGemmaMultimodalEmbedder). A plain ``nn.Linear``, not one of vLLM's linears: those
    take LoRA wrappers whose per-row mapping is the text batch's, not the image tokens'."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        dim = getattr(vision_config, "output_proj_dims", None) or vision_config.hidden_size
        self.embedding_pre_projection_norm = V.RMSNorm(dim, eps=vision_config.rms_norm_eps,
                                                       has_weight=False)
        self.embedding_projection = nn.Linear(dim, text_config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def build_vision_tower(vision_config):
    """transformers' Gemma 4 vision tower for the checkpoint's ``vision_config`` (SDPA
    attention), parameters in the current default dtype (vLLM sets the model's)."""
    from transformers import AutoModel

    vision_config._attn_implementation = "sdpa"
    return AutoModel.from_config(vision_config, dtype=torch.get_default_dtype())


@contextlib.contextmanager
def _attention_layers(backend_cls=None, unclamped_mm_prefix: bool = False):
    """Build Gemma 4's attention layers with our backend class (vLLM's ``Attention`` takes an
    ``attn_backend`` argument; Gemma4Attention does not pass one through), and on GPU with the
    multimodal-prefix ranges not clamped to the sliding window (Gemma 4 passes
    ``mm_prefix_clamp_sliding_window=is_sliding``; the canvas's exact window is one such range
    and must reach past the window, see runner.reference_window_metadata)."""
    import vllm.model_executor.models.gemma4 as g4

    orig = g4.Attention

    def build(*args, **kwargs):
        if backend_cls is not None:
            kwargs["attn_backend"] = backend_cls
        if unclamped_mm_prefix:
            kwargs["mm_prefix_clamp_sliding_window"] = False
        return orig(*args, **kwargs)

    g4.Attention = build if (backend_cls is not None or unclamped_mm_prefix) else orig
    try:
        yield
    finally:
        g4.Attention = orig


@dataclass
class _Mapper(V.WeightsMapper):
    """vLLM's mapper plus the renames LoRA name parsing needs where loading stacks: the
    self-conditioning MLP's ``gate_proj`` / ``up_proj`` are named inside ``mlp`` (vLLM packs them
    into ``gate_up_proj`` itself, from ``packed_modules_mapping``)."""

    lora_renames: dict = field(default_factory=dict)

    def get_rename_mapper(self):
        m = super().get_rename_mapper()
        return dataclasses.replace(m, orig_to_new_substr={**m.orig_to_new_substr,
                                                          **self.lora_renames}, lora_renames={})


@contextlib.contextmanager
def _experts_without_lora(vllm_config):
    """Build the MoE layers as if LoRA were off. vLLM 0.32 picks its Triton MoE kernel for every
    FusedMoE when LoRA is on (fused_moe/oracle/unquantized.py), which the CPU build cannot run;
    the routed experts never carry an adapter here (model/lora.py), so they keep the kernel they
    would have without LoRA. Only FusedMoE reads ``lora_config`` while the backbone is built."""
    configs = {id(c): c for c in (vllm_config, V.get_current_vllm_config())}
    saved = [(c, c.lora_config) for c in configs.values() if c.lora_config is not None]
    for c, _ in saved:
        object.__setattr__(c, "lora_config", None)
    try:
        yield
    finally:
        for c, lora in saved:
            object.__setattr__(c, "lora_config", lora)


@V.support_torch_compile(dynamic_arg_dims={"positions": -1, "hidden_states": 0, "soft": 0,
                                           "canvas": 0})
class DecoderStack(nn.Module):
    """The self-conditioning MLP (first stage), this stage's decoder layers and (last stage) the
    final norm, as one compiled region.

    Why not vLLM's ``Gemma4Model.forward`` (compiled the same way): it multiplies each layer's
    output by the layer's ``layer_scalar`` buffer, one value for the whole batch, while a
    DiffusionGemma batch mixes encoder rows (the encoder's scalar set) and canvas rows (the
    decoder's). Here the layers' own buffers stay 1.0 (``x * 1.0 == x``, exactly) and each layer's
    output is multiplied by ``where(canvas, decoder scalar, encoder scalar)`` per row. Every
    per-step input is a graph input with the batch's symbolic size, so one graph serves every
    batch: the rows' mode (``canvas``, ``[tokens, 1]`` bool) and the self-conditioning input
    (``soft``, ``[tokens, hidden]``, zeros outside canvas rows and on a canvas's first step: the
    reference feeds zeros there, and ``MLP(pre_norm(0)) = 0`` exactly); the scalars are a fixed
    ``[2, layers]`` buffer. The self-conditioning MLP thus runs on every row of the batch and
    its result is kept on canvas rows only (on a prefill chunk that is one dense MLP more over
    the chunk's rows, next to the backbone's one per layer). The layers stay registered in
    ``Gemma4Model`` and the MLP in the model class (checkpoint, LoRA and attention-layer names
    unchanged): this module holds plain references.
    """

    def __init__(self, *, vllm_config, prefix: str = "", backbone=None, self_conditioning=None,
                 first: bool = True, last: bool = True):
        super().__init__()
        self.__dict__["_backbone"] = backbone  # not submodules: names stay ``model.layers.*``
        self.__dict__["_sc"] = self_conditioning
        self.first, self.last = first, last

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, soft: torch.Tensor,
                canvas: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        m, h = self._backbone, hidden_states
        if self.first:
            h = torch.where(canvas, self._sc(h, soft), h)
        for i in range(m.start_layer, m.end_layer):
            h, _ = m.layers[i](positions, h, None)
            h = h * torch.where(canvas, scalars[1, i], scalars[0, i])
        return m.norm(h) if self.last else h


class DGemmaForBlockDiffusion(nn.Module, V.SupportsMultiModal, V.SupportsLoRA, V.SupportsPP):
    """vLLM model class for ``DiffusionGemmaForBlockDiffusion`` checkpoints."""

    # vLLM drops image ranges longer than the sliding window from the attention metadata unless
    # the model bounds them itself (gpu_model_runner.py:2341): DiffusionGemma's image tokens see
    # their whole image on sliding layers too, and the attention backends apply the window only to
    # keys outside it (CPU: engine/attention.py; GPU: the unclamped multimodal-prefix ranges)
    mm_prefix_clamp_sliding_window = True

    # checkpoint name -> module name (applied in order, prefixes)
    hf_to_vllm_mapper = _Mapper(
        orig_to_new_prefix={
            "model.encoder.vision_tower.": "vision_tower.",
            "model.encoder.embed_vision.": "embed_vision.",
            "model.decoder.self_conditioning.": "self_conditioning.",
            "model.decoder.": "model.",
        },
        orig_to_new_substr={
            "self_conditioning.down_proj.": "self_conditioning.mlp.down_proj.",
        },
        orig_to_new_stacked={
            "self_conditioning.gate_proj.": ("self_conditioning.mlp.gate_up_proj.", 0),
            "self_conditioning.up_proj.": ("self_conditioning.mlp.gate_up_proj.", 1),
        },
        lora_renames={f"{k}.": f"{v}." for k, v in LORA_RENAMES.items()},
    )
    embedding_modules: dict[str, str] = {}  # no adapter on the embedding (model/lora.py)
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        config = hf_config.text_config
        # Full-attention layers of DiffusionGemma are always k_eq_v (no v_proj in the file).
        config.attention_k_eq_v = True
        self.config = config
        self.canvas_length = int(getattr(hf_config, "dgemma_canvas_length", None)
                                 or getattr(hf_config, "canvas_length", None) or 256)
        quant_config = vllm_config.quant_config

        from vllm.platforms import current_platform

        from dgemma_vllm.engine.config import plugin_options

        opts = plugin_options(vllm_config)
        backend = None
        if current_platform.is_cpu():  # the CPU backend module is imported on the CPU only
            from dgemma_vllm.engine.attention import DGemmaCPUAttentionBackend as backend
            from dgemma_vllm.engine.attention import set_canvas_window

            set_canvas_window(opts["canvas_window"])
        with _attention_layers(backend, unclamped_mm_prefix=not current_platform.is_cpu()), \
                _experts_without_lora(vllm_config):
            self.model = V.Gemma4Model(vllm_config=vllm_config,
                                       prefix=V.maybe_prefix(prefix, "model"))
        self.self_conditioning = SelfConditioning(config, quant_config,
                                                  prefix=V.maybe_prefix(prefix, "self_conditioning"))
        self.lm_head = V.ParallelLMHead(config.vocab_size, config.hidden_size,
                                        quant_config=quant_config,
                                        prefix=V.maybe_prefix(prefix, "lm_head"))
        if getattr(hf_config, "tie_word_embeddings", True):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        refuse_quantized_head(self.lm_head, self.model.embed_tokens)
        vision = getattr(hf_config, "vision_config", None)
        self.has_vision = vision is not None
        if self.has_vision:  # replicated on every rank, as vLLM's Gemma 4 builds it
            self.vision_tower = build_vision_tower(vision)
            self.embed_vision = MultimodalEmbedder(vision, config)

        n = config.num_hidden_layers
        # The two layer_scalar sets of the checkpoint (buffers are not tied in the reference):
        # row 0 the encoder's, row 1 the decoder's; the layers' own buffers stay 1.0 (DecoderStack)
        self.register_buffer("layer_scalars", torch.ones(2, n), persistent=False)
        _, first, last = V.pp_ranks()
        self.stack = DecoderStack(vllm_config=vllm_config, prefix=V.maybe_prefix(prefix, "stack"),
                                  backbone=self.model, self_conditioning=self.self_conditioning,
                                  first=first, last=last)
        # per-step inputs of the compiled stack, in buffers that keep their address (a CUDA graph
        # replays the addresses it captured): the rows' mode, the first stage's input rows and
        # self-conditioning input (nonzero only at the previous step's canvas rows)
        self.max_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
        self._canvas_buf: torch.Tensor | None = None
        self._embeds_buf: torch.Tensor | None = None
        self._soft_buf: torch.Tensor | None = None
        self._soft_rows: torch.Tensor | None = None
        self._step: StepInputs | None = None
        # pipeline stages: vLLM's Gemma4Model holds this stage's layers (PPMissingLayer for the
        # others) and embed_tokens on every stage; only the first embeds and self-conditions
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.dtype = vllm_config.model_config.dtype
        self.sc_calls = 0  # self-conditioning MLP calls (one per forward with canvas rows)

    # ------------------------------------------------------------------ runner interface
    def set_step(self, step: StepInputs | None) -> None:
        self._step = step

    @contextlib.contextmanager
    def vision_hidden(self):
        """The vision tower and embedder out of the module tree for a while: vLLM's LoRA manager
        walks the modules once when it is built and would try to wrap the tower's ``q_proj`` /
        ``k_proj`` (their names match the text targets), which it cannot; adapters are for the
        text backbone and the self-conditioning MLP only (model/lora.py)."""
        hidden = {k: self._modules.pop(k) for k in ("vision_tower", "embed_vision")
                  if k in self._modules}
        try:
            yield
        finally:
            self._modules.update(hidden)

    # embed_input_ids: SupportsMultiModal's (the backbone's scaled embedding, then the image
    # features at the image rows, unscaled, as the reference's masked_scatter)
    def get_language_model(self):
        return self.model

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        from dgemma_vllm.engine.multimodal import IMAGE_PLACEHOLDER

        return IMAGE_PLACEHOLDER if modality == "image" else None

    def embed_multimodal(self, **kwargs) -> list[torch.Tensor]:
        """Image features, one ``[N_i, hidden]`` tensor per image: the vision tower on the
        processor's patches (its padding stripped), then the embedder (reference:
        ``get_image_features``)."""
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return []
        positions = kwargs["pixel_position_ids"]
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype

        def encode(px, pos):  # [images, patches, 3 * patch**2] -> [their soft tokens, vision hidden]
            return tower(pixel_values=px.to(dtype), pixel_position_ids=pos).last_hidden_state

        if isinstance(pixels, (list, tuple)):  # images of different budgets: one by one
            feats = torch.cat([encode(px[None], pos[None]) for px, pos in zip(pixels, positions)])
        else:
            feats = encode(pixels, positions)
        counts = [int(n) for n in kwargs["num_soft_tokens"]]
        if sum(counts) != feats.shape[0]:
            raise ValueError(f"dgemma_vllm: the vision tower gave {feats.shape[0]} soft tokens for "
                             f"images expecting {counts}")
        return list(self.embed_vision(feats.to(self.dtype)).split(counts))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        step, self._step = self._step, None
        _, first, last = V.pp_ranks()
        n_tok = positions.shape[-1]
        rows = step.canvas_rows if step is not None and step.canvas_rows.numel() > 0 else None
        canvas = self._buffer("_canvas_buf", n_tok, 1, torch.bool, positions.device)
        canvas.fill_(False)
        if rows is not None:
            canvas[rows] = True
        if first:
            if inputs_embeds is None:
                inputs_embeds = self.model.embed_input_ids(input_ids)
            hidden = self._buffer("_embeds_buf", n_tok, inputs_embeds.shape[-1],
                                  inputs_embeds.dtype, inputs_embeds.device)
            hidden.copy_(inputs_embeds)
            soft = self._soft_input(n_tok, rows, None if step is None else step.soft_embeds,
                                    hidden)
        else:
            hidden = intermediate_tensors["hidden_states"]
            soft = hidden[:, :0]  # unused on later stages (no self-conditioning there)
        if rows is not None:
            self.sc_calls += 1
        out = self.stack(positions, hidden, soft, canvas, self.layer_scalars)
        return out if last else V.IntermediateTensors({"hidden_states": out})

    def _soft_input(self, n_tok, rows, soft, like):
        """The self-conditioning input of this step's rows: the canvas rows' soft embeddings,
        zeros elsewhere (the buffer is cleared where the previous step wrote)."""
        buf = self._buffer("_soft_buf", n_tok, like.shape[-1], like.dtype, like.device)
        if self._soft_rows is not None:
            prev = self._soft_rows
            self._soft_buf[prev[prev < self._soft_buf.shape[0]]] = 0
            self._soft_rows = None
        if rows is not None and soft is not None:
            buf[rows] = soft.to(buf.dtype)
            self._soft_rows = rows
        return buf

    def _buffer(self, name: str, n: int, width: int, dtype, device) -> torch.Tensor:
        """The first ``n`` rows of a persistent ``[max tokens, width]`` buffer (remade, larger,
        for a batch beyond it: the dummy runs of vLLM's start-up reach the largest size)."""
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < n or buf.dtype != dtype or buf.device != device \
                or buf.shape[1] != width:
            buf = torch.zeros(max(n, self.max_tokens), width, dtype=dtype, device=device)
            setattr(self, name, buf)
        return buf[:n]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The plugin's runner computes the head itself, tiled over the vocabulary and on this
        rank's slice only (dgemma_vllm/refine/head.py, fp32, softcap ``softcap_of``): vLLM's logits step
        hands it the canvas rows' hidden states unchanged."""
        return hidden_states

    def vocab_slice(self):
        """This rank's slice of the tied output embedding, with the tensor-parallel collectives
        (for :func:`dgemma_vllm.refine.head.canvas_head`)."""
        from dgemma_vllm.refine.head import VocabSlice

        emb, head = self.model.embed_tokens, self.lm_head
        # soft embeddings use the input embedding; a separate table only when not tied
        untied = None if head.weight is emb.weight else emb.weight
        tp = V.get_tensor_model_parallel_world_size()
        if tp == 1:
            return VocabSlice(weight=head.weight, start=0, size=self.config.vocab_size,
                              vocab=self.config.vocab_size, embed=untied)
        si = head.shard_indices
        return VocabSlice(
            weight=head.weight, embed=untied, start=si.org_vocab_start_index,
            size=si.org_vocab_end_index - si.org_vocab_start_index, vocab=self.config.vocab_size,
            max_size=head.num_embeddings_per_partition, rank=V.get_tensor_model_parallel_rank(),
            ranks=tp, gather=V.tp_gather_stack,
            reduce=V.tensor_model_parallel_all_reduce)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skipped_vision = 0
        loaded_scalars: set[str] = set()

        def text_weights():
            nonlocal skipped_vision
            for name, tensor in weights:
                if not self.has_vision and name.startswith(("model.encoder.vision_tower.",
                                                            "model.encoder.embed_vision.")):
                    skipped_vision += 1  # a config without vision_config: nothing to load into
                    continue
                if name.endswith(".layer_scalar"):
                    i = int(name.split(".layers.")[1].split(".")[0])
                    target = self.layer_scalars[1 if name.startswith("model.decoder.") else 0]
                    target[i] = tensor.reshape(()).to(target.dtype)
                    loaded_scalars.add(name)
                    continue
                if name == "lm_head.weight" and getattr(self.lm_head, "weight", None) is \
                        self.model.embed_tokens.weight:
                    continue
                if name.startswith("model.encoder.language_model."):
                    # Tied to the decoder in the reference; a checkpoint saved with ties off
                    # would carry a second backbone, which this class does not serve.
                    raise ValueError(
                        f"checkpoint carries untied encoder weight {name!r}: this plugin serves "
                        "one backbone for both modes (tie_word_embeddings must be true)")
                yield name, tensor

        loader = V.AutoWeightsLoader(self)
        loaded = loader.load_weights(text_weights(), mapper=self.hf_to_vllm_mapper)
        if skipped_vision:
            logger.info("dgemma_vllm: skipped %d vision-tower tensors (the config has no "
                        "vision_config: text only)", skipped_vision)
        n = self.config.num_hidden_layers
        for kind in ("model.decoder.layers", "model.encoder.language_model.layers"):
            missing = [i for i in range(n) if f"{kind}.{i}.layer_scalar" not in loaded_scalars]
            if missing:
                raise ValueError(f"checkpoint lacks {kind}.<i>.layer_scalar for layers {missing}")
        # the layers' layer_scalar buffers stay 1.0 (DecoderStack applies both sets per row)
        loaded |= {f"model.layers.{i}.layer_scalar" for i in range(n)}
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded


def _register_processor() -> None:
    from dgemma_vllm.engine.multimodal import register

    register(DGemmaForBlockDiffusion)


_register_processor()
