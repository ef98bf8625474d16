"""Procedurally generated video clips of moving shapes, the training data of `repa-kernels demo`.

Each clip shows one to `max_shapes` soft-edged shapes (discs, squares, rings) of random colour on a
plain background, each moving on a straight line at constant speed and bouncing off the borders. The
motion is smooth across frames, which is what CREPA's neighbour terms exploit. Everything is drawn with
torch from a seeded generator: the same seed gives the same clips on every machine, and nothing is
downloaded.

Layouts:
- `moving_shapes(...)` -> (num_clips, frames, 3, height, width) float32 in [0, 1] (the layout of the
  regularizer's `pixels=` input, docs/contract.md §7).
- `to_vae_input(clips)` -> (num_clips, 3, frames, height, width) in [-1, 1] (what a diffusers video VAE
  encodes).
"""

from __future__ import annotations

import torch

SHAPE_KINDS = ("disc", "square", "ring")


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _bounce(start: torch.Tensor, velocity: torch.Tensor, steps: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Positions of points moving at constant velocity inside [low, high], reflected at the borders.

    start, velocity: (S,); steps: (F,) -> (F, S).
    """
    span = high - low
    travelled = start[None, :] - low + velocity[None, :] * steps[:, None]
    folded = torch.remainder(travelled, 2 * span)
    return low + torch.where(folded > span, 2 * span - folded, folded)


def moving_shapes(num_clips: int, frames: int, height: int, width: int, *, max_shapes: int = 3,
                  seed: int = 0) -> torch.Tensor:
    """Clips of shapes moving and bouncing: (num_clips, frames, 3, height, width) float32 in [0, 1]."""
    for name, value in (("num_clips", num_clips), ("frames", frames), ("height", height), ("width", width),
                        ("max_shapes", max_shapes)):
        _check_positive(name, value)
    if height < 4 or width < 4:
        raise ValueError(f"height and width must be at least 4 pixels, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    rows = torch.arange(height, dtype=torch.float32)[:, None] + 0.5   # pixel centres
    cols = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    steps = torch.arange(frames, dtype=torch.float32)
    short_side = min(height, width)
    clips = torch.empty(num_clips, frames, 3, height, width)
    for clip in range(num_clips):
        background = uniform(3, high=0.35)
        canvas = background[None, :, None, None].expand(frames, 3, height, width).clone()
        count = int(torch.randint(1, max_shapes + 1, (1,), generator=generator))
        for _ in range(count):
            kind = SHAPE_KINDS[int(torch.randint(len(SHAPE_KINDS), (1,), generator=generator))]
            radius = float(uniform(1, low=0.12, high=0.25)) * short_side
            colour = uniform(3, low=0.45, high=1.0)
            centre = uniform(2) * torch.tensor([height - 2 * radius, width - 2 * radius]) + radius
            angle = float(uniform(1, high=2 * torch.pi))
            speed = float(uniform(1, low=0.04, high=0.12)) * short_side   # pixels per frame
            velocity = speed * torch.tensor([torch.sin(torch.tensor(angle)), torch.cos(torch.tensor(angle))])
            cy = _bounce(centre[:1], velocity[:1], steps, radius, height - radius)[:, 0]   # (F,)
            cx = _bounce(centre[1:], velocity[1:], steps, radius, width - radius)[:, 0]
            dy = rows[None] - cy[:, None, None]                                               # (F, H, 1)
            dx = cols[None] - cx[:, None, None]                                               # (F, 1, W)
            if kind == "square":
                edge = torch.maximum(dy.abs(), dx.abs()) - radius
            elif kind == "disc":
                edge = torch.sqrt(dy ** 2 + dx ** 2) - radius
            else:  # ring: a band of width radius/2 around the circle of radius 0.75*radius
                edge = (torch.sqrt(dy ** 2 + dx ** 2) - 0.75 * radius).abs() - 0.25 * radius
            coverage = torch.clamp(0.5 - edge, 0.0, 1.0)                                    # 1-pixel soft edge
            canvas = canvas * (1 - coverage[:, None]) + colour[None, :, None, None] * coverage[:, None]
        clips[clip] = canvas
    return clips.clamp_(0.0, 1.0)


def to_vae_input(clips: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) in [0, 1] -> (N, 3, F, H, W) in [-1, 1], the input layout of diffusers video VAEs."""
    if clips.dim() != 5 or clips.shape[2] != 3:
        raise ValueError(f"clips must be (N, F, 3, H, W), got shape {tuple(clips.shape)}")
    return clips.permute(0, 2, 1, 3, 4).mul(2.0).sub(1.0).contiguous()
