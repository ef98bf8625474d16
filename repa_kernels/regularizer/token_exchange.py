"""Point-to-point exchange of token ranges between the ranks of a context group (context_parallel.py).

Each rank holds its shard [start, stop) of a (B, S, D) token sequence and wants one contiguous range
[lo, hi) of the full sequence (a teacher halo of neighbour frames, or the whole frames its resampled
student terms need). Every rank knows every rank's shard and wanted range (both follow from the layout
and the config, which all ranks share), so the exchange needs no negotiation: rank q sends rank r the
overlap of its shard with r's range and receives the overlap of r's shard with its own, by isend/irecv
(point-to-point; tested on gloo, no multi-GPU machine was available for NCCL). Only the tokens that are
wanted move: a halo of d frames costs d frames of tokens per shard boundary, not the sequence.

`exchange_tokens(local, shard, wants, differentiable=True)` is an autograd function: its backward
sends the gradient of every received token back to the rank that holds it, which adds it to its own
tokens' gradient, so each token's gradient is the sum over every rank that used it, as in the
single-process graph. Every rank of the group must call it (and its backward) together; a rank that
wants nothing still takes part, because others may want its tokens. `sum_over_group` is the pooled
modes' all_reduce with gradient (identity backward); `all_reduce_sum` the plain one.
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


def _collect(held: torch.Tensor, held_ranges: Sequence[tuple[int, int]], wanted_ranges: Sequence[tuple[int, int]],
             shard) -> torch.Tensor:
    """held: this rank's tokens over held_ranges[me] (B, len, D). Returns (B, len(wanted_ranges[me]), D):
    the sum, per wanted token, of every rank's held copy of it. Each rank sends the overlap of what it holds
    with what each peer wants and receives the reverse, all posted at once (no pair order can deadlock).
    The forward holds the shards (disjoint: each wanted token arrives once); the backward holds the wanted
    ranges' gradients and wants the shards (a token several ranks used gets the sum of their gradients)."""
    me = shard.rank
    mine = held_ranges[me]
    lo = mine[0]
    first, last = wanted_ranges[me]
    out = held.new_zeros(held.shape[0], last - first, held.shape[2])
    requests, placed, sent = [], [], []   # sent: each payload stays referenced until its send completes
    for peer in range(shard.ranks):
        if peer == me:
            common = overlap(mine, (first, last))
            if common:
                out[:, common[0] - first:common[1] - first] += held[:, common[0] - lo:common[1] - lo]
            continue
        global_peer = dist.get_global_rank(shard.group, peer)
        taken = overlap(held_ranges[peer], (first, last))
        if taken:
            buffer = held.new_empty(held.shape[0], taken[1] - taken[0], held.shape[2])
            requests.append(dist.irecv(buffer, src=global_peer))
            placed.append((taken, buffer))
        given = overlap(mine, wanted_ranges[peer])
        if given:
            sent.append(held[:, given[0] - lo:given[1] - lo].contiguous())
            requests.append(dist.isend(sent[-1], dst=global_peer))
    for request in requests:
        request.wait()
    for (start, stop), buffer in placed:
        out[:, start - first:stop - first] += buffer
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, shard, wants: Sequence[tuple[int, int]]) -> torch.Tensor:
        ctx.shard, ctx.wants = shard, wants
        return _collect(local.detach(), shard.shards, wants, shard)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _collect(grad_out.contiguous(), ctx.wants, ctx.shard.shards, ctx.shard), None, None


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
    return _collect(local.detach(), shard.shards, tuple(wants), shard)


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity: right when every rank of the group computes the
    same function of the sum (the pooled modes' loss), so d loss / d (this rank's part) = d loss / d sum,
    already on every rank; nothing moves in the backward."""

    @staticmethod
    def forward(ctx, part: torch.Tensor, group) -> torch.Tensor:
        return all_reduce_sum(part, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_group(part: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's `part` on every rank; differentiable when the loss built from it is the
    same on every rank of `group` (see _SumOverGroup)."""
    return _SumOverGroup.apply(part, group) if part.requires_grad else all_reduce_sum(part, group)
