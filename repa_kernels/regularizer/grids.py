"""Token grids and the alignment of student and teacher tokens (docs/contract.md §3).

A token grid is (T, H, W): frames, rows, columns. Tokens are stored frame-major then row-major, so a
(B, S, C) sequence with S = T*H*W reshapes to (B, T, H, W, C). Spatial resampling always acts on the
true 2-D grid of each frame, never on a flattened sequence (a 1-D resample would mix rows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..checks import is_integer


class TokenGrid(NamedTuple):
    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


def parse_token_grid(value) -> TokenGrid:
    """A user-given (frames, rows, columns): exactly 3 positive integers."""
    try:
        items = tuple(value)
    except TypeError:
        items = ()
    if len(items) != 3 or not all(is_integer(v) and v > 0 for v in items):   # numpy integers too
        raise ValueError(f"token_grid must be (frames, rows, columns), 3 positive integers, got {value!r}")
    return TokenGrid(*(int(v) for v in items))


def tokens_to_grid(tokens: torch.Tensor, grid: TokenGrid, what: str = "tokens") -> torch.Tensor:
    """(B, S, C) with S = T*H*W (frame-major, row-major) -> (B, T, H, W, C)."""
    if tokens.dim() != 3:
        raise ValueError(f"{what} must be (B, S, C), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] != grid.tokens:
        raise ValueError(f"{what} has {tokens.shape[1]} tokens but the token grid {tuple(grid)} (frames, rows, "
                         f"columns) holds {grid.tokens}")
    return tokens.reshape(tokens.shape[0], grid.frames, grid.height, grid.width, tokens.shape[2])


def unpermute_local_blocks(tokens: torch.Tensor, grid: TokenGrid, block: int) -> torch.Tensor:
    """Undo a (1, block, block) local-window token order (Kandinsky5's sparse-attention "fractal" order).

    tokens: (B, S, C) ordered as [frame, row-block, column-block, row-in-block, column-in-block];
    returns the same tokens in frame-major, row-major order, (B, S, C).
    """
    if grid.height % block or grid.width % block:
        raise ValueError(f"tokens in {block}x{block} local-window order need a grid whose rows and columns are "
                         f"multiples of {block}, got {tuple(grid)}")
    b, s, c = tokens.shape
    x = tokens.reshape(b, grid.frames, grid.height // block, grid.width // block, block, block, c)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, s, c)


def image_grid_from_aspect(num_tokens: int, height: int, width: int, what: str, hint: str = "") -> TokenGrid:
    """The (1, h, w) grid with h*w = num_tokens and h/w closest to height/width (e.g. Flux's packed tokens)."""
    rows = max(1, round(math.sqrt(num_tokens * height / width)))
    if num_tokens % rows:
        raise ValueError(f"cannot lay {num_tokens} {what} tokens on a grid with the aspect ratio "
                         f"{height}x{width}{hint}")
    return TokenGrid(1, rows, num_tokens // rows)


def check_pixels_fit_grid(pixels_shape: tuple[int, ...], grid: TokenGrid, grid_source: str) -> None:
    """Refuse pixels whose aspect ratio is not the token grid's (they would be stretched onto it).

    The grid's sides are whole tokens rounded from the image (floor or ceil of the latent size over the
    patch size or the downsampling), so each true side lies within one token of the grid's: pixels
    (H, W) fit a grid (h, w) when (h − 1)/(w + 1) <= H/W <= (h + 1)/(w − 1). On a 64 x 64 grid that is
    about 3%; portrait 32 x 16 frames on a landscape 2 x 3 grid (2.0 against 2/3) are refused."""
    height, width = pixels_shape[-2], pixels_shape[-1]
    aspect = height / width
    low = max(grid.height - 1, 0) / (grid.width + 1)
    high = (grid.height + 1) / (grid.width - 1) if grid.width > 1 else math.inf
    if not low <= aspect <= high:
        raise ValueError(f"pixels of shape {tuple(pixels_shape)} ({height}x{width}, aspect {aspect:.3g}) do not "
                         f"fit the token grid {tuple(grid)} (frames, rows, columns) of {grid_source} (aspect "
                         f"{grid.height / grid.width:.3g}, one token of rounding allowed per side): they would be "
                         "stretched. Pass the frames of the batch the model saw, at its aspect ratio")


def select_frames(num_source: int, num_target: int) -> list[int]:
    """Indices of `num_target` frames out of `num_source`, nearest on an even spacing.

    With a causal video VAE of temporal ratio r (num_source = r*(F-1)+1) this is exactly latent frame
    k <-> pixel frame r*k. num_target == 1 picks frame 0.
    """
    if num_target < 1:
        raise ValueError(f"num_target must be >= 1, got {num_target}")
    if num_source < num_target:
        raise ValueError(f"cannot pick {num_target} frames out of {num_source}")
    if num_target == 1:
        return [0]
    step = (num_source - 1) / (num_target - 1)
    return [int(math.floor(k * step + 0.5)) for k in range(num_target)]


def encoder_input_size(height: int, width: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """Encoder input (h, w): about image_size**2 pixels of area with the frame's aspect ratio, each side
    rounded to the nearest multiple of the patch size and never below one patch."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    scale = image_size / math.sqrt(height * width)

    def side(n: int) -> int:
        return max(patch_size, int(math.floor(n * scale / patch_size + 0.5)) * patch_size)

    return side(height), side(width)



RESIZE_RULES = ("area", "square", "naflex")


def teacher_input_size(rule: str, height: int, width: int, image_size: int, stride: int) -> tuple[int, int]:
    """A teacher's input (h, w) for a frame of height x width pixels and the configured size S, both
    multiples of its token stride (docs/teachers.md):
    "area":   `encoder_input_size` (about S x S pixels of area, the frame's aspect ratio);
    "square": S x S rounded to the stride (SigLIP's processor);
    "naflex": SigLIP2's processor rule for a budget of round(S²/stride²) patches (the largest scale whose
              sides, rounded up to the patch, fit the budget)."""
    if rule == "area":
        return encoder_input_size(height, width, image_size, stride)
    if rule == "square":
        side = max(stride, int(math.floor(image_size / stride + 0.5)) * stride)
        return side, side
    if rule == "naflex":
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

        budget = max(1, round(image_size * image_size / (stride * stride)))
        return get_image_size_for_max_num_patches(height, width, stride, budget)
    raise ValueError(f"resize rule must be one of {', '.join(RESIZE_RULES)}, got {rule!r}")

def resample_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, T, h, w, C), per frame on the 2-D grid.

    Downsampling is antialiased (area-weighted triangle filter); upsampling is bilinear. Differentiable.
    """
    b, t, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    frames = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
    out = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.permute(0, 2, 3, 1).reshape(b, t, size[0], size[1], c)


def align_grids(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample the grid with more tokens per frame onto the other's 2-D grid.

    student, teacher: (B, T, H, W, D) with the same B, T and D (grids may differ);
    returns both as (B, T, N, D) on a common (h, w) grid.
    """
    s_hw, t_hw = student.shape[2:4], teacher.shape[2:4]
    if s_hw[0] * s_hw[1] > t_hw[0] * t_hw[1]:
        student = resample_grid(student, tuple(t_hw))
    elif s_hw != t_hw:
        teacher = resample_grid(teacher, tuple(s_hw))
    return student.flatten(2, 3), teacher.flatten(2, 3)


def mean_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, D) or (B, T, N, D) -> (B, T, 1, D), mean over the tokens of each frame."""
    return x.flatten(2, -2).mean(dim=2, keepdim=True)


ALIGNMENTS = ("spatial", "pooled", "cls")


def align_tokens(student: torch.Tensor, teacher: torch.Tensor, alignment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """student, teacher: (B, T, H, W, D) -> both (B, T, N, D) for the loss.

    spatial: each grid resampled onto the other's (align_grids); pooled: the mean token of each frame on
    both sides (crepa_spatial_align false); cls: the student's mean token against the teacher's one CLS
    token per frame."""
    if alignment == "spatial":
        return align_grids(student, teacher)
    if alignment == "pooled":
        return mean_pool(student), mean_pool(teacher)
    if alignment == "cls":
        return mean_pool(student), teacher.flatten(2, 3)
    raise ValueError(f"alignment must be one of {', '.join(map(repr, ALIGNMENTS))}, got {alignment!r}")


def spatially_normalize(teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """iREPA's teacher normalisation: per sample, frame and channel, over the frame's patch tokens,
    y' = (y - alpha * mean(y)) / (std(y) + 1e-6), std unbiased; alpha 1 removes the spatial mean entirely.

    teacher: (B, T, h, w, D) -> the same shape, float32 (float64 stays float64), without gradient: the
    teacher side only. Two statistics passes over Y (mean, then the two-pass variance, which stays
    accurate where E[y^2] - E[y]^2 cancels) plus one fused multiply-add into the normalised copy: about 4
    passes of Y's float32 bytes, 4 x 21 x 1560 x 1536 x 4 B = 0.8 GB for crepa-wan480p (Y is 0.2 GB).
    Measured on the crepa-cpu shape (13 x 1024 x 768 float32, 2 loaded cores): 259 ms, against 92 ms for
    one elementwise multiply of Y and 85 ms for the cpp crepa loss forward + backward in the same run."""
    if teacher.dim() != 5:
        raise ValueError(f"teacher tokens must lie on their grid (B, T, h, w, D), got shape {tuple(teacher.shape)}")
    tokens = teacher.shape[2] * teacher.shape[3]
    if tokens < 2:
        raise ValueError(f"iREPA's spatial normalisation needs at least 2 teacher tokens per frame (an unbiased std "
                         f"over 1 token is undefined), got a {teacher.shape[2]} x {teacher.shape[3]} grid")
    with torch.no_grad():
        y = teacher.detach()
        y = y.float() if y.dtype != torch.float64 else y
        b, t, h, w, d = y.shape
        x = y.reshape(b * t, h * w, d)
        mean = x.mean(dim=1, keepdim=True)
        scale = 1.0 / (torch.var(x, dim=1, keepdim=True, correction=1).sqrt() + 1e-6)
        # (x - alpha * mean) * scale as one fused multiply-add over Y
        return torch.addcmul(-alpha * mean * scale, x, scale).reshape(b, t, h, w, d)
