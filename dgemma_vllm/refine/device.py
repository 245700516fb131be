"""Host <-> device transfers of the refinement code without blocking the host where it can be
avoided (on a GPU every blocking copy and every device-to-host read waits for the stream)."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`: on a GPU through pinned memory without blocking the host (no
    synchronisation; the copy is ordered on the stream before its use)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def draw_device(gen: torch.Generator | None):
    """Where a generator's draws are made: its own device (a request's GPU generator draws on
    the GPU; the reference's CPU generator on the host)."""
    return gen.device if gen is not None else "cpu"


def to_host(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Device tensors (int64 values < 2**53, fp32 values) on the host with one device-to-host
    copy (one synchronisation on a GPU, instead of one per tensor), each in its own shape and
    dtype."""
    if all(t.device.type == "cpu" for t in ts):
        return list(ts)
    packed = torch.cat([t.reshape(-1).double() for t in ts]).cpu()
    out, o = [], 0
    for t in ts:
        out.append(packed[o:o + t.numel()].view(t.shape).to(t.dtype))
        o += t.numel()
    return out
