"""Image input through vLLM's multimodal processing, without torchvision.

vLLM's own Gemma 4 processor (``gemma4_mm.Gemma4MultiModalProcessor``) wraps transformers'
``Gemma4Processor``, which imports torchvision (none exists for torch 2.13+cpu): neither can be
imported on a CPU install. This module is the image half of it, on transformers' PIL image
processor (``Gemma4ImageProcessorPil``, which ``AutoImageProcessor`` picks for the checkpoint's
``preprocessor_config.json`` where torchvision is absent) and the checkpoint's tokenizer:

- each image becomes ``pixel_values`` ``[patches, 3 * patch**2]`` and ``pixel_position_ids``
  ``[patches, 2]`` (padded to the soft-token budget's patches, ``(-1, -1)`` for padding), exactly
  the processor's output, which the reference's ``generate(pixel_values=...)`` takes;
- the one ``<|image|>`` a chat template (or a raw prompt) places per image is replaced by
  ``boi + N x <|image|> + eoi``, N the soft tokens the vision tower yields for that image, computed
  by transformers' own resize rule (``get_aspect_ratio_preserving_size``), as Gemma 4's processor
  does; only the N image tokens take image embeddings (``is_embed``).

Video and audio are not served (the release's chat checkpoint has neither token).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

from . import vllm_api as V

IMAGE_PLACEHOLDER = "<|image|>"  # the release's image token, one per image in a prompt
# Gemma4ImageProcessorPil accepts these soft-token budgets only (image_processing_pil_gemma4.py)
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)


def num_soft_tokens(width: int, height: int, *, patch_size: int, pooling: int, budget: int) -> int:
    """Soft tokens of one image: transformers' resize rule (the largest size with at most
    ``budget * pooling**2`` patches and sides divisible by ``patch_size * pooling``), then one
    token per ``pooling x pooling`` patches: what ``Gemma4ImageProcessorPil`` returns as
    ``num_soft_tokens_per_image`` and the vision tower yields after its padding is stripped."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        get_aspect_ratio_preserving_size)

    h, w = get_aspect_ratio_preserving_size(height=height, width=width, patch_size=patch_size,
                                            max_patches=budget * pooling ** 2,
                                            pooling_kernel_size=pooling)
    return (h // patch_size) * (w // patch_size) // pooling ** 2


class DGemmaProcessingInfo(V.BaseProcessingInfo):
    """What vLLM asks of a multimodal model's processing: the HF processor, the modalities and
    their limits, the most tokens one image can take."""

    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(_processor_class(), **kwargs)

    @cached_property
    def image_processor(self):
        return self.get_hf_processor().image_processor

    def has_vision(self) -> bool:
        return getattr(self.get_hf_config(), "vision_config", None) is not None

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # a checkpoint without a vision tower takes no image (a request with one gets a 400
        # from vLLM's limit check, naming the limit)
        return {"image": None if self.has_vision() else 0}

    def budget(self, mm_kwargs: Mapping[str, object] | None = None) -> int:
        """Soft tokens at most per image: ``max_soft_tokens`` of the request's or the server's
        ``mm_processor_kwargs`` (flat or under ``images_kwargs``), else the checkpoint's image
        processor's (the release: 280); one of 70, 140, 280, 560, 1120."""
        if not self.has_vision():
            return 0
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs or {})
        scoped = merged.get("images_kwargs")
        scoped = scoped if isinstance(scoped, Mapping) else {}
        unknown = sorted(set(merged) - {"max_soft_tokens", "images_kwargs"}) + sorted(
            f"images_kwargs.{k}" for k in scoped if k != "max_soft_tokens")
        if unknown:
            raise ValueError(f"mm_processor_kwargs: {unknown[0]!r} is not supported (the image "
                             "processor takes max_soft_tokens only)")
        val = merged.get("max_soft_tokens")
        if val is None:
            val = scoped.get("max_soft_tokens")
        if val is None:
            return int(self.image_processor.max_soft_tokens)
        if isinstance(val, bool) or val not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"mm_processor_kwargs.max_soft_tokens must be one of "
                             f"{SUPPORTED_SOFT_TOKENS} (soft tokens per image), got {val!r}")
        return int(val)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]):
        return {"image": self.budget()}

    def soft_tokens(self, width: int, height: int, budget: int) -> int:
        ip = self.image_processor
        return num_soft_tokens(width, height, patch_size=int(ip.patch_size),
                               pooling=int(ip.pooling_kernel_size), budget=budget)

    def image_tokens(self) -> tuple[int, int, int]:
        cfg = self.get_hf_config()
        return int(cfg.boi_token_id), int(cfg.image_token_id), int(cfg.eoi_token_id)


class DGemmaDummyInputsBuilder(V.BaseDummyInputsBuilder[DGemmaProcessingInfo]):
    """Profiling inputs: square images, which fill the soft-token budget best."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        side = int(self.info.image_processor.patch_size) * int(
            self.info.image_processor.pooling_kernel_size) * 16
        return {"image": self._get_dummy_images(
            width=side, height=side, num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image") if mm_options else None)}


class DGemmaMultiModalProcessor(V.BaseMultiModalProcessor[DGemmaProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]):
        return None  # the images alone go through the image processor (the prompt is tokenized)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        from transformers import BatchFeature

        images = hf_data.get("images") or []
        out = self.info.image_processor(list(images), max_soft_tokens=self.info.budget(hf_kwargs),
                                        return_tensors="pt")
        return BatchFeature({"pixel_values": out["pixel_values"],
                             "pixel_position_ids": out["image_position_ids"],
                             "num_soft_tokens": out["num_soft_tokens_per_image"]})

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return dict(pixel_values=V.MultiModalFieldConfig.batched("image"),
                    pixel_position_ids=V.MultiModalFieldConfig.batched("image"),
                    num_soft_tokens=V.MultiModalFieldConfig.batched("image", keep_on_cpu=True))

    def _apply_prompt_updates(self, token_ids, mm_prompt_updates):
        """vLLM's, after checking that the prompt has one ``<|image|>`` per image (vLLM's own
        mismatch error speaks of the processor's implementation, not of the request)."""
        _, image, _ = self.info.image_tokens()
        n_images = len(mm_prompt_updates.get("image", ()))
        n_marks = sum(1 for t in token_ids if t == image)
        if n_marks != n_images:
            raise ValueError(
                f"the prompt has {n_marks} image placeholder(s) {IMAGE_PLACEHOLDER!r} for "
                f"{n_images} image(s): put one {IMAGE_PLACEHOLDER} where each image belongs "
                "(chat messages with image parts get them from the chat template)")
        return super()._apply_prompt_updates(token_ids, mm_prompt_updates)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        boi, image, eoi = self.info.image_tokens()
        budget = self.info.budget(hf_processor_mm_kwargs)

        def replacement(i: int):
            size = mm_items.get_items("image", V.ImageProcessorItems).get_image_size(i)
            n = self.info.soft_tokens(size.width, size.height, budget)
            return V.PromptUpdateDetails.select_token_id([boi] + [image] * n + [eoi], image)

        return [V.PromptReplacement(modality="image", target=[image], replacement=replacement)]


_PROCESSOR_CLASS = None


def _processor_class():
    """A two-part ``ProcessorMixin`` (image processor + tokenizer) loaded from the checkpoint with
    ``from_pretrained``, as vLLM builds HF processors; Gemma 4's own needs torchvision for its
    video part. Built on first use (transformers' processing module is heavy to import)."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        from transformers import ProcessorMixin

        class DGemmaImageProcessor(ProcessorMixin):
            attributes = ["image_processor", "tokenizer"]
            image_processor_class = "AutoImageProcessor"
            tokenizer_class = "AutoTokenizer"

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
                super().__init__(image_processor, tokenizer, chat_template=chat_template)
                self.image_token = tokenizer.image_token
                self.image_token_id = tokenizer.image_token_id

        _PROCESSOR_CLASS = DGemmaImageProcessor
    return _PROCESSOR_CLASS


def register(model_cls):
    """Register the processor for the plugin's model class (vLLM's decorator, applied here so
    that the model module names no processing class)."""
    return V.MULTIMODAL_REGISTRY.register_processor(
        DGemmaMultiModalProcessor, info=DGemmaProcessingInfo,
        dummy_inputs=DGemmaDummyInputsBuilder)(model_cls)
