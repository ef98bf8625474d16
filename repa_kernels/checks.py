"""Input validation shared by every backend (SPEC §2): the same errors whatever `impl` is."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected a real floating dtype ({_DTYPE_NAMES})")
    if t.dim() not in (3, 4):
        raise ValueError(
            f"{name} must be 3-D (B, N, D) or 4-D (B, T, N, D), got {t.dim()}-D with shape {tuple(t.shape)}")
    if any(size == 0 for size in t.shape):
        raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}; B, T, N and D must all be >= 1")
    return t


def as_frames(t: torch.Tensor) -> torch.Tensor:
    """View a (B, N, D) tensor as (B, 1, N, D); a 4-D tensor is returned as is."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def check_pair(z: object, y: object, *, same_width: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate student `z` and teacher `y` and return both as 4-D (B, T, N, D) views.

    same_width=True (cosine term): identical shapes. False (manifold term): the same (B, [T,] N), any D.
    """
    z = _check_tensor("z", z)
    y = _check_tensor("y", y)
    if z.device != y.device:
        raise ValueError(f"z and y must be on the same device, got z on {z.device} and y on {y.device}")
    if z.dtype != y.dtype:
        raise TypeError(
            f"z and y must have the same dtype, got z {z.dtype} and y {y.dtype}; cast one of them explicitly")
    if same_width:
        if z.shape != y.shape:
            raise ValueError(f"z and y must have the same shape, got z {tuple(z.shape)} and y {tuple(y.shape)}")
    elif z.dim() != y.dim() or z.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            "z and y must have the same leading dimensions (B, [T,] N) (widths D may differ), "
            f"got z {tuple(z.shape)} and y {tuple(y.shape)}")
    return as_frames(z), as_frames(y)


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number >= 0 (loss weights); bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {value!r} ({type(value).__name__})")
    if not 0 <= value < math.inf:  # not math.isfinite, which torch.compile cannot trace; NaN fails it too
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)
