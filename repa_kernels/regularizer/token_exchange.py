"""Point-to-point exchange of token ranges between the ranks of a context group (context_parallel.py).

Each rank holds its shard [start, stop) of a (B, S, D) token sequence and wants one contiguous range
[lo, hi) of the full sequence (a teacher halo of neighbour frames, or the whole frames its resampled
student terms need). Every rank knows every rank's shard and wanted range (both follow from the layout
and the config, which all ranks share), so the exchange needs no negotiation: rank q sends rank r the
overlap of its shard with r's range and receives the overlap of r's shard with its own, by isend/irecv
(gloo, NCCL, any backend with point-to-point). Only the tokens that are wanted move: a halo of d
frames costs d frames of tokens per shard boundary, not the sequence.

`exchange_tokens(local, shard, wants, differentiable=True)` is an autograd function: its backward
sends the gradient of every received token back to the rank that holds it, which adds it to its own
tokens' gradient, so each token's gradient is the sum over every rank that used it, as in the
single-process graph. Every rank of the group must call it (and its backward) together; a rank that
wants nothing still takes part, because others may want its tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return (start, stop) if start < stop else None


def all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    """A detached copy of `values` summed over `group` (NCCL reduces CUDA tensors only: a CPU tensor
    travels through the current CUDA device there)."""
    reduced = values.detach().clone()
    if reduced.device.type == "cpu" and "nccl" in str(dist.get_backend(group)).lower():
        reduced = reduced.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced.to(values.device)


def _transfer(sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, torch.Tensor]]) -> None:
    """Post every receive and send at once (no ordering between pairs can deadlock), then wait."""
    requests = [dist.irecv(buffer, src=peer) for peer, buffer in receives]
    requests += [dist.isend(tensor.contiguous(), dst=peer) for peer, tensor in sends]
    for request in requests:
        request.wait()


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, shard, wants: Sequence[tuple[int, int]]) -> torch.Tensor:
        me = shard.rank
        lo, hi = wants[me]
        batch, width = local.shape[0], local.shape[2]
        out = local.new_zeros(batch, hi - lo, width)
        sends, receives, placed = [], [], []
        for peer, peer_shard in enumerate(shard.shards):
            if peer == me:
                common = overlap(peer_shard, (lo, hi))
                if common:
                    out[:, common[0] - lo:common[1] - lo] = local[:, common[0] - shard.start:common[1] - shard.start]
                continue
            global_peer = dist.get_global_rank(shard.group, peer)
            given = overlap((shard.start, shard.stop), wants[peer])     # my tokens that the peer wants
            if given:
                sends.append((global_peer, local[:, given[0] - shard.start:given[1] - shard.start].detach()))
            taken = overlap(peer_shard, (lo, hi))                        # the peer's tokens that I want
            if taken:
                buffer = local.new_empty(batch, taken[1] - taken[0], width)
                receives.append((global_peer, buffer))
                placed.append((taken, buffer))
        _transfer(sends, receives)
        for (first, last), buffer in placed:
            out[:, first - lo:last - lo] = buffer
        ctx.shard, ctx.wants = shard, wants
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        shard, wants = ctx.shard, ctx.wants
        me = shard.rank
        lo, hi = wants[me]
        grad_out = grad_out.contiguous()
        batch, width = grad_out.shape[0], grad_out.shape[2]
        grad_local = grad_out.new_zeros(batch, shard.stop - shard.start, width)
        sends, receives, placed = [], [], []
        for peer, peer_shard in enumerate(shard.shards):
            if peer == me:
                common = overlap(peer_shard, (lo, hi))
                if common:
                    grad_local[:, common[0] - shard.start:common[1] - shard.start] += \
                        grad_out[:, common[0] - lo:common[1] - lo]
                continue
            global_peer = dist.get_global_rank(shard.group, peer)
            taken = overlap(peer_shard, (lo, hi))                        # back to the rank that holds them
            if taken:
                sends.append((global_peer, grad_out[:, taken[0] - lo:taken[1] - lo]))
            given = overlap((shard.start, shard.stop), wants[peer])     # what the peer did with my tokens
            if given:
                buffer = grad_out.new_empty(batch, given[1] - given[0], width)
                receives.append((global_peer, buffer))
                placed.append((given, buffer))
        _transfer(sends, receives)
        for (first, last), buffer in placed:
            grad_local[:, first - shard.start:last - shard.start] += buffer
        return grad_local, None, None


def exchange_tokens(local: torch.Tensor, shard, wants: Sequence[tuple[int, int]], *,
                    differentiable: bool = True) -> torch.Tensor:
    """local: this rank's tokens (B, stop - start, D) of the group's sequence; wants: every group rank's
    wanted range [lo, hi) (lo == hi: nothing). Returns this rank's range (B, hi - lo, D). differentiable:
    the gradient of the returned tokens goes back to the ranks that hold them (else a detached copy)."""
    if len(wants) != shard.ranks:
        raise ValueError(f"wants must give one token range per rank of the context group ({shard.ranks}), got "
                         f"{len(wants)}")
    if differentiable and local.requires_grad:
        return _Exchange.apply(local, shard, tuple(wants))
    with torch.no_grad():
        return _Exchange.forward(_NoContext(), local.detach(), shard, tuple(wants))


class _NoContext:
    """Stands in for autograd's ctx when the exchange runs without a graph."""
