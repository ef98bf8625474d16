"""The CREPA / REPA loss of the unsharded sequence, computed from one rank's shard of it (context_parallel.py).

The math (docs/contract.md §2.1): with unit tokens ẑ, ŷ on the common grid of N tokens per frame and
W[f, g] = c(f) w(f, g),

    Σ_{b,f} total[b, f] = Σ_{b,f} Σ_n ẑ[b, f, n] · E[b, f, n] / N,   E[b, f, n] = Σ_g W[f, g] ŷ[b, g, n]

is a sum over frames, and within a frame over tokens, each against a teacher target built from the
teacher's frames and the global constants (N, T, B, c(f)). So a rank sums the terms of its loss frames
(context_parallel.loss_frames) against targets from its teacher window, and one all_reduce of two
float64 scalars over the context group (the total and the self similarity) gives the loss value, the
alignment score and the self similarity of the whole sequence on every rank.

- Equal grids, or a teacher resampled onto the student grid (no gradient): the terms are per student
  token, so a rank takes exactly its own tokens, whatever the shard boundaries (inside a frame, shards
  smaller than a frame, uneven shards); nothing is communicated in the backward.
- A resampled student (more tokens per frame than the teacher): resampling mixes neighbouring rows, so
  a frame's terms need the whole frame. Each frame is computed by the rank holding its first token, which
  receives the frame's other tokens from the next ranks (token_exchange.py) and sends their gradient back
  in the backward.

The loss returned is the local share with gradient plus the rest as a constant: its value is the global
loss, and the gradient reaching each rank's tokens is the single-process gradient of those tokens.

The pooled and CLS modes (crepa_spatial_align false, crepa_encoder_tokens cls) compare one vector per
frame, the mean of the frame's student tokens: each rank sums its own tokens per frame, and one
all_reduce (B x T x D floats) gives every rank the frame means (`pooled_student`), with gradient; every
rank then computes the same, whole loss on (B, T) vectors, so the backward of that all_reduce is the
identity. The teacher's vector of each frame is computed by the rank holding the frame's first token
(the whole frame: its pooled or CLS token) and shared by one all_reduce without gradient
(`share_frames`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import CrepaOptions
from ..reference import safe_normalize
from .context_parallel import ContextShard, loss_frames
from .grids import TokenGrid, resample_grid
from .token_exchange import all_reduce_sum, exchange_tokens, sum_over_group


def sharded_crepa_loss(z: torch.Tensor, y: torch.Tensor, low: int, grid: TokenGrid, shard: ContextShard,
                       opts: CrepaOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z: this rank's projected student tokens (B, stop - start, D); y: the teacher tokens of the student
    frames [low, low + y.shape[1]) on the teacher's grid (B, t, h, w, D) (context_parallel.teacher_window).
    Returns (loss of the unsharded sequence whose gradient reaches this rank's tokens only, alignment
    score, self similarity), the last two detached, equal on every rank of the context group."""
    batch, width = z.shape[0], z.shape[2]
    per_frame = grid.height * grid.width
    teacher_grid = tuple(y.shape[2:4])
    student_resampled = teacher_grid[0] * teacher_grid[1] < per_frame
    if not student_resampled and teacher_grid != (grid.height, grid.width):
        y = resample_grid(y, (grid.height, grid.width))    # the teacher onto the student grid, as grids.align_grids
    first, last = loss_frames((shard.start, shard.stop), per_frame, student_resampled)
    yn = safe_normalize(y.flatten(2, 3)).to(z.dtype)        # (B, t, N, D), N the common grid's tokens per frame
    tokens = yn.shape[2]
    weights = opts.frame_weights(grid.frames, dtype=z.dtype, device=z.device)[first:last, low:low + y.shape[1]]
    target = torch.einsum("fg,bgnd->bfnd", weights, yn)     # (B, last - first, N, D)
    own = yn[:, first - low:last - low]
    if student_resampled:
        # every rank takes part (its tokens may be wanted by a frame's first rank, even if it owns no frame)
        wants = [tuple(f * per_frame for f in loss_frames(span, per_frame, True)) for span in shard.shards]
        whole = exchange_tokens(z, shard, wants).reshape(batch, last - first, grid.height, grid.width, width)
        zn = safe_normalize(resample_grid(whole, teacher_grid).flatten(2, 3))
    else:
        begin = shard.start - first * per_frame
        zn = safe_normalize(z)
        target = target.reshape(batch, -1, width)[:, begin:begin + z.shape[1]]
        own = own.reshape(batch, -1, width)[:, begin:begin + z.shape[1]]
    local_total = (zn * target).sum() / tokens
    local_self = (zn.detach() * own).sum() / tokens
    sums = all_reduce_sum(torch.stack([local_total.detach(), local_self]).to(torch.float64), shard.group)
    divisor = opts.loss_divisor(batch, grid.frames)
    local_loss = -local_total / divisor
    loss = local_loss + (-sums[0] / divisor - local_loss.detach().double()).to(local_loss.dtype)
    return loss, (sums[0] / (batch * grid.frames)).to(z.dtype), (sums[1] / (batch * grid.frames)).to(z.dtype)


def frame_sums(tokens: torch.Tensor, grid: TokenGrid, shard: ContextShard) -> torch.Tensor:
    """tokens: this rank's (B, stop - start, D) -> (B, T, D): the sum of its tokens in each frame (zero for
    the frames it does not touch), differentiable."""
    per_frame = grid.height * grid.width
    first, last = loss_frames((shard.start, shard.stop), per_frame, student_resampled=False)
    padded = F.pad(tokens, (0, 0, shard.start - first * per_frame, last * per_frame - shard.stop))
    sums = padded.reshape(tokens.shape[0], last - first, per_frame, tokens.shape[2]).sum(dim=2)
    return F.pad(sums, (0, 0, first, grid.frames - last))


def pooled_student(z: torch.Tensor, grid: TokenGrid, shard: ContextShard) -> torch.Tensor:
    """z: this rank's projected tokens (B, stop - start, D) -> every frame's mean token (B, T, 1, 1, D), the
    same on every rank of the context group; its gradient reaches this rank's tokens (see the docstring)."""
    means = sum_over_group(frame_sums(z, grid, shard), shard.group) / (grid.height * grid.width)
    return means[:, :, None, None, :]


def share_frames(vectors: torch.Tensor, first: int, frames: int, group) -> torch.Tensor:
    """vectors: (B, n, D) of frames [first, first + n) computed by this rank (the frames whose first token
    it holds) -> (B, T, 1, 1, D) of every frame on every rank (one all_reduce, no gradient)."""
    placed = F.pad(vectors.detach(), (0, 0, first, frames - first - vectors.shape[1]))
    return all_reduce_sum(placed, group)[:, :, None, None, :]
