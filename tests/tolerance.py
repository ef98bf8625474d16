"""The accuracy rule every kernel test uses, after Cut Cross-Entropy:

    |kernel - fp64 truth| <= |same-dtype reference - fp64 truth| + tol

on the loss, and on gradients relative to the largest entry of the true gradient.
tol = 1e-6 for float32 (and float64), 5e-3 for float16 / bfloat16.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-6, torch.float16: 5e-3, torch.bfloat16: 5e-3}


def max_error(value: torch.Tensor, truth: torch.Tensor, scale: float = 1.0) -> float:
    return float((value.detach().double() - truth.detach().double()).abs().max()) / scale


def assert_within_reference_error(kernel: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor,
                                  dtype: torch.dtype, what: str, relative: bool = False) -> None:
    """Bound the kernel's error by the same-dtype reference's error (plus the dtype's tol)."""
    assert kernel.shape == truth.shape, f"{what}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(kernel.detach()).all(), f"{what}: kernel result is not finite"
    scale = max(float(truth.detach().double().abs().max()), 1e-30) if relative else 1.0
    kernel_err = max_error(kernel, truth, scale)
    reference_err = max_error(reference, truth, scale)
    bound = reference_err + TOLERANCE[dtype]
    assert kernel_err <= bound, (
        f"{what} ({dtype}): kernel error {kernel_err:.3e} > reference error {reference_err:.3e} + tol "
        f"{TOLERANCE[dtype]:.0e}")
