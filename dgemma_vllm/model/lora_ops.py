"""CPU LoRA ops: vLLM 0.32's torch fallbacks (``vllm/lora/ops/torch_ops/lora_ops.py``), grouped
by adapter.

vLLM's CPU build computes each LoRA product with ``weights[indices]`` (a copy of one adapter's
matrix per row: ``[rows, out, rank]``) and an einsum over it: for a 256-row canvas batch of 16
that is 4096 copies of every adapter matrix per layer and projection, on one core, and the index
-1 ("no adapter") picks the last slot's adapter instead of none. No library ships a CPU grouped
LoRA GEMM for vLLM, so these three functions keep vLLM's signatures and semantics and compute,
for each adapter present in the batch, one GEMM over its rows (``x[rows] @ W[i].T``, BLAS,
multithreaded); rows with index -1 get no delta. ``tests/test_lora.py`` holds them against
vLLM's originals on random inputs (rows without an adapter against zero).
"""

from __future__ import annotations

import torch


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``out[r] = x[r] @ weights[indices[r]].T`` in `dtype`, zero where ``indices[r] < 0``.
    `weights`: ``[slots, out, in]`` or ``[slots, 1, out, in]`` (vLLM's stacked LoRA tensors)."""
    w = weights.squeeze(1) if weights.dim() == 4 else weights
    x = x.to(dtype)
    ids = torch.unique(indices).tolist()
    if len(ids) == 1 and ids[0] >= 0:  # one adapter for every row: one GEMM, no gather
        return x @ w[ids[0]].to(dtype).t()
    out = x.new_zeros((x.shape[0], w.shape[1]))
    for i in ids:
        if i >= 0:
            rows = (indices == i).nonzero().squeeze(1)
            out.index_copy_(0, rows, x.index_select(0, rows) @ w[i].to(dtype).t())
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                      slice_size, add_inputs=True):
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs
