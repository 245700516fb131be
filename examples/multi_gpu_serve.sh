#!/usr/bin/env bash
# NOT RUN here (no GPU machine was available to this project's sessions). Shown for users of
# the CUDA build: tensor parallelism over the GPUs of one node, plugin loaded automatically.
#   pip install "dgemma-vllm[gpu]"
set -euo pipefail
MODEL=${1:-google/diffusiongemma-26B-A4B-it}
vllm serve "$MODEL" --tensor-parallel-size "${TP:-2}" --dtype bfloat16 \
    --max-model-len 32768 --max-num-seqs 64 --gpu-memory-utilization 0.9 \
    --hf-overrides '{"diffusion_max_steps": 16}'
