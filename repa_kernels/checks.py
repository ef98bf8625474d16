"""Input validation shared by every backend (docs/contract.md §2): the same errors whatever `impl` is.

Scalars are accepted in the types a training script holds them in: Python numbers and numpy scalars
(np.bool_ wherever a bool is, np.int64 for integers, np.float32 for reals); bools are never numbers.
A tensor is refused with how to pass its value, so a device-to-host read is the caller's choice.
"""

from __future__ import annotations

import math
import numbers
import sys

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


def type_name(value: object) -> str:
    """The type of `value` as a user writes it: bool, str, numpy.bool, numpy.float32, torch.Tensor."""
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def describe(value: object) -> str:
    """`value` and its type for an error message, with how to pass a tensor's value."""
    text = f"{value!r} ({type_name(value)})"
    if isinstance(value, torch.Tensor):
        text += "; pass its value as a Python scalar (tensor.item())"
    return text


def is_flag(value: object) -> bool:
    """A Python bool or a numpy bool (numpy is looked up only when imported: no numpy bool exists before)."""
    if isinstance(value, bool):
        return True
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.bool_)


def check_flag(name: str, value: object) -> bool:
    """`value` as a Python bool when it is a bool (numpy bools included), else a TypeError naming `name`."""
    if not is_flag(value):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return bool(value)


def is_integer(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not is_flag(value)


def is_real(value: object) -> bool:
    """A real number (Python or numpy, integers included), not a bool."""
    return isinstance(value, numbers.Real) and not is_flag(value)


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number >= 0 (loss weights); bools are rejected."""
    if not is_real(value):
        raise TypeError(f"{name} must be a finite number >= 0, got {describe(value)}")
    if not 0 <= value < math.inf:  # not math.isfinite, which torch.compile cannot trace; NaN fails it too
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)
