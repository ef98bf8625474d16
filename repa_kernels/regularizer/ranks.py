"""The regularizer's own communication across data-parallel ranks (torch.distributed, any backend).

Two things must agree on every rank without the trainer wrapping anything: the schedule's decisions (the
alignment score is averaged before the EMA, schedule.py) and the projector's gradients (averaged as DDP
averages the model's, projector.py). Both are no-ops without an initialised process group of more than
one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks of the default process group; 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: the mean of `tensor` over all ranks (one all_reduce); `tensor` itself when alone.
    NCCL reduces CUDA tensors only, so a CPU tensor travels through the current CUDA device there."""
    ranks = world_size()
    if ranks == 1:
        return tensor
    device = tensor.device
    reduced = tensor.detach().clone()
    if device.type == "cpu" and "nccl" in str(dist.get_backend()).lower():
        reduced = reduced.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return (reduced / ranks).to(device)
