"""CREPA / REPA exact under context (sequence) parallelism: the captured block output is one rank's
contiguous shard of the video token sequence.

The trainer states the layout (`CrepaRegularizer.set_context_parallel(group, shard=(start, stop))`: the
context process group and this rank's tokens [start, stop) of the full frame-major, row-major sequence of
T*H*W tokens), or diffusers' `enable_parallelism` set it on the model (found at each call: equal chunks
over the flattened ring x Ulysses mesh), and every rank passes the full teacher features (B, T, N, D)
with N = H*W.

The math (docs/contract.md §2.1, spatial alignment on equal grids): with unit tokens ẑ, ŷ and W[f, g] = c(f) w(f, g),

    Σ_{b,f} total[b, f] = Σ_b Σ_{p = (f, n)} ẑ[b, p] · E[b, f, n] / N,   E[b, f, n] = Σ_g W[f, g] ŷ[b, g, n]

is a sum over student tokens, each against a teacher target built from the full teacher features and the
global constants (N, T, B, c(f)). So a rank computes E only for the frames its shard touches (its shard plus
the teacher halo of d frames on each side, read from the full features it holds), sums its tokens' share,
and one all_reduce of two float64 scalars over the context group (the total and the self similarity) gives
the loss value, the alignment score and the self similarity of the unsharded sequence on every rank. The
loss returned is the local share with gradient plus the rest as a constant: its value is the global loss,
its gradient reaches exactly this rank's tokens, as the single-process gradient does; nothing is
communicated in the backward. Shard boundaries may fall anywhere: inside a frame, shards smaller than a
frame, uneven shards.

Communication per step: one all_reduce of 2 float64 over the context group (16 bytes), the schedule's
scalar all_reduce over the world (as without context parallelism), and the projector's gradient
all_reduce over the world, scaled by the context size (each context rank holds a partial gradient that must
be summed over the context group and averaged over the data ranks: world mean × context size).

Refused under context parallelism (each with an error naming the key or argument): resampled grids
(student grid != teacher grid), the pooled and CLS modes (crepa_spatial_align false, crepa_encoder_tokens
cls), iREPA's convolutional projector (irepa_enabled), backbone mode, a feature cache, latents= / pixels=
calls (decode and encode are not shared out), U-REPA, and families whose block output is not the video
tokens alone (text or reference tokens in the sequence, Kandinsky5's local-window order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..options import CrepaOptions
from ..reference import safe_normalize
from .families import ImageTokens, ModelFamily, TupleItem
from .grids import TokenGrid


@dataclass(frozen=True)
class ContextShard:
    """This rank's tokens [start, stop) of the full sequence of `total` tokens, in a context group of
    `ranks` ranks (the group's shards tile [0, total) in group-rank order)."""

    group: object
    start: int
    stop: int
    total: int
    ranks: int


def _check_index(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"shard {name} must be an integer >= 0 (a token index of the full sequence), got {value!r}")
    return value


def make_shard(group, shard) -> ContextShard:
    """Validate the layout on every rank of `group` (one all_gather_object over it, so every rank of the
    group must call this together): the shards must be contiguous, in group-rank order, from token 0."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("set_context_parallel needs an initialised torch.distributed process group "
                           "(dist.init_process_group) and the context group from it")
    try:
        start, stop = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (start, stop), this rank's token range of the full sequence, got "
                         f"{shard!r}") from None
    start, stop = _check_index("start", start), _check_index("stop", stop)
    if stop <= start:
        raise ValueError(f"shard must hold at least one token (start < stop), got ({start}, {stop})")
    ranks = dist.get_world_size(group)
    shards: list = [None] * ranks
    dist.all_gather_object(shards, (start, stop), group=group)
    expected = 0
    for rank, (first, last) in enumerate(shards):
        if first != expected:
            raise ValueError(f"the context group's shards must tile the sequence from token 0 in group-rank order; "
                             f"got {shards} (group rank {rank} starts at {first}, expected {expected})")
        expected = last
    return ContextShard(group, start, stop, expected, ranks)


def diffusers_context(model) -> tuple[object, int, int] | None:
    """(group, group rank, group size) of the context parallelism diffusers' `enable_parallelism` set on
    `model` (its `_cp_plan` splits the sequence into equal chunks over the flattened ring x Ulysses mesh at
    the first block), or None when the model runs unsharded. The uneven "anything" partitions are refused."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    if config is None:
        return None
    mesh = config._flattened_mesh
    if getattr(config, "ulysses_anything", False) or getattr(config, "ring_anything", False):
        raise ValueError("diffusers context parallelism with ulysses_anything / ring_anything (uneven shards) is "
                         "not detected: state the layout with reg.set_context_parallel(group, shard=(start, stop))")
    group = mesh.get_group()
    return group, dist.get_rank(group), mesh.size()


def equal_chunk(total: int, rank: int, ranks: int) -> tuple[int, int]:
    """Token range of `rank` when `total` tokens are cut as tensor.chunk(ranks) cuts them."""
    size = -(-total // ranks)
    return min(total, rank * size), min(total, (rank + 1) * size)


def check_family(family: ModelFamily) -> None:
    """Only a video family whose captured block output is the video tokens alone, in frame-major order."""
    plain = all(isinstance(rule, (ImageTokens, TupleItem)) for rule in family.block_outputs)
    if family.kind != "video" or not plain or family.tokens_after_image or family.local_block_tokens:
        raise ValueError(f"context parallelism is supported for video DiTs whose block output is the video tokens "
                         f"alone in frame-major order (Wan, LTX-Video, Sana-Video); the {family.name} family "
                         f"({family.describe_blocks()}) is not")


def _all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    reduced = values.detach().clone()
    if reduced.device.type == "cpu" and "nccl" in str(dist.get_backend(group)).lower():
        reduced = reduced.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced.to(values.device)


def sharded_crepa_loss(z: torch.Tensor, y: torch.Tensor, grid: TokenGrid, shard: ContextShard,
                       opts: CrepaOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z: this rank's projected student tokens (B, stop - start, D); y: the full teacher tokens
    (B, T, H, W, D) on the student grid. Returns (loss of the unsharded sequence whose gradient reaches
    this rank's tokens only, alignment score, self similarity), the last two detached, equal on every rank
    of the context group."""
    batch, frames, rows, columns, width = y.shape
    per_frame = rows * columns
    first_frame, last_frame = shard.start // per_frame, (shard.stop - 1) // per_frame
    zn = safe_normalize(z)
    # the teacher frames the shard's frames reach: [first - d, last + d] (the halo), normalised once
    offsets = opts.offsets(frames)
    reach = max(offsets, default=0)
    low, high = max(0, first_frame - reach), min(frames, last_frame + reach + 1)
    yn = safe_normalize(y[:, low:high].reshape(batch, high - low, per_frame, width)).to(zn.dtype)
    weights = opts.frame_weights(frames, dtype=zn.dtype, device=zn.device)[first_frame:last_frame + 1, low:high]
    target = torch.einsum("fg,bgnd->bfnd", weights, yn).reshape(batch, -1, width)
    own = yn[:, first_frame - low:last_frame + 1 - low].reshape(batch, -1, width)
    begin = shard.start - first_frame * per_frame
    tokens = slice(begin, begin + shard.stop - shard.start)
    local_total = (zn * target[:, tokens]).sum() / per_frame
    local_self = (zn.detach() * own[:, tokens]).sum() / per_frame
    sums = _all_reduce_sum(torch.stack([local_total.detach(), local_self]).to(torch.float64), shard.group)
    divisor = opts.loss_divisor(batch, frames)
    local_loss = -local_total / divisor
    loss = local_loss + (-sums[0] / divisor - local_loss.detach().double()).to(local_loss.dtype)
    return loss, (sums[0] / (batch * frames)).to(zn.dtype), (sums[1] / (batch * frames)).to(zn.dtype)
