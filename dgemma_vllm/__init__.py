"""dgemma_vllm: a vLLM plugin that serves DiffusionGemma."""
__version__ = "0.1.0"
