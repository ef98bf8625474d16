"""CREPA / REPA exact under context (sequence) parallelism: the layout of the sharded sequence and the
frames each rank works on. The captured block output is one rank's contiguous shard of the video token
sequence; sharded_loss.py computes the loss of the unsharded sequence from the shards, token_exchange.py
moves the few tokens a rank needs from the others.

The trainer states the layout (`CrepaRegularizer.set_context_parallel(group, shard=(start, stop))`: the
context process group and this rank's tokens [start, stop) of the full frame-major, row-major sequence of
T*H*W tokens), or diffusers' `enable_parallelism` set it on the model (found at each call: equal chunks
over the flattened ring x Ulysses mesh of this rank's context group; a data x context mesh gives one
context group per data rank). Every rank of a context group holds the same batch, so the same teacher
input: teacher_features (B, T, N, D), pixels, or latents.

Who computes what (T frames of N student tokens; d = the largest neighbour offset):
- a rank's loss frames: the frames its shard touches, or, when the student grid is resampled (it holds
  more tokens per frame than the teacher's, docs/contract.md §3), the frames whose first token it holds
  (each frame's resampled terms are computed once, by that rank, from the whole frame);
- its teacher window: its loss frames plus d frames on each side (the neighbour-frame targets). Only
  these frames are taken from teacher_features, encoded from pixels, or decoded and encoded from latents
  (a causal Wan VAE decodes just the latent prefix up to the window's last frame, vae.py); a backbone
  teacher's window comes from the other ranks' shards of the teacher block (token_exchange.py).

Communication per step, for a context group of P ranks (B samples, D the teacher width):
- one all_reduce of 2 float64 (16 bytes): the loss value and the self similarity of the whole sequence;
- resampled student grids: each frame split between ranks moves its tokens held by later ranks to its
  first rank (< N tokens x B x D per boundary, in float32 with the projector) and their gradient back in
  the backward; equal grids move nothing and need no backward communication;
- backbone teacher: the window's teacher tokens held by other ranks (about d frames x N x B x width per
  shard boundary); teacher_features, pixels and latents move nothing (every rank holds the input);
- as without context parallelism: the schedule's scalar all_reduce over the world, and the projector's
  gradient all_reduce over the world, scaled by P (each context rank holds a partial gradient, summed
  over the context group and averaged over the data ranks: world mean x P).

The pooled and CLS modes (crepa_spatial_align false, crepa_encoder_tokens cls) compare one vector per
frame: the frame means of the student tokens are summed over the context group (B x T x D floats, with
gradient, identity backward), and each teacher frame is computed by the rank holding its first token and
shared the same way (sharded_loss.py); every rank then computes the whole, small loss.

Refused under context parallelism (each with an error naming the key or argument): iREPA's
convolutional projector (irepa_enabled: its k x k convolution mixes rows across shard boundaries),
U-REPA, and families whose block output is not the image or video tokens alone (a joint caption + image
sequence, Kandinsky5's local-window order; reference tokens after the image are refused at the call).
Image DiTs (Flux, SD3, ...) are one frame: the same math with T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..options import CrepaOptions
from .families import ImageTokens, ModelFamily, TupleItem
from .grids import TokenGrid


@dataclass(frozen=True)
class ContextShard:
    """The context group's layout: `shards[r]` is group rank r's tokens [start, stop) of the full
    sequence (they tile [0, total) in group-rank order); `rank` is this rank's place in the group."""

    group: object
    rank: int
    shards: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.shards[self.rank][0]

    @property
    def stop(self) -> int:
        return self.shards[self.rank][1]

    @property
    def total(self) -> int:
        return self.shards[-1][1]

    @property
    def ranks(self) -> int:
        return len(self.shards)


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
    return ContextShard(group, dist.get_rank(group), tuple(tuple(s) for s in shards))


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


def equal_chunks(group, rank: int, ranks: int, total: int) -> ContextShard:
    """The layout of `total` tokens cut as tensor.chunk(ranks) cuts them (diffusers' split)."""
    size = -(-total // ranks)
    return ContextShard(group, rank, tuple((min(total, r * size), min(total, (r + 1) * size)) for r in range(ranks)))


def check_family(family: ModelFamily) -> None:
    """Only a DiT whose captured block output is its image or video tokens as one tensor (or one tuple
    item), in frame-major, row-major order: the shard is then a plain slice of the grid's sequence. A
    joint (text, image) sequence (its text is sharded too, so the image starts at a rank's local text
    length) and Kandinsky5's local-window order are refused. Tokens after the image (Flux Kontext's
    reference image) are refused at the call: the shards then cover more than the grid."""
    plain = all(isinstance(rule, (ImageTokens, TupleItem)) for rule in family.block_outputs)
    if family.kind not in ("video", "image") or not plain or family.local_block_tokens:
        raise ValueError(f"context parallelism is supported for DiTs whose block output is the image or video "
                         f"tokens alone in frame-major order (Wan, LTX-Video, Sana-Video, Flux, Qwen-Image, SD3, "
                         f"PixArt, Sana); the {family.name} family ({family.describe_blocks()}) is not")


# ---------------------------------------------------------------------------------------- frame windows


def loss_frames(span: tuple[int, int], per_frame: int, student_resampled: bool) -> tuple[int, int]:
    """Frames [first, last) whose terms the rank holding tokens `span` computes: those its tokens touch,
    or, when the student is resampled (a whole frame at a time), those whose first token it holds
    (possibly none: a shard inside one frame)."""
    start, stop = span
    if student_resampled:
        return -(-start // per_frame), -(-stop // per_frame)
    return start // per_frame, (stop - 1) // per_frame + 1


def teacher_window(span: tuple[int, int], grid: TokenGrid, opts: CrepaOptions) -> tuple[int, int]:
    """Student frames [low, high) whose teacher tokens the rank holding `span` needs: the frames its
    tokens touch (which hold its resampled frames too) and d neighbour frames on each side."""
    first, last = loss_frames(span, grid.height * grid.width, student_resampled=False)
    reach = max(opts.offsets(grid.frames), default=0)
    return max(0, first - reach), min(grid.frames, last + reach)
