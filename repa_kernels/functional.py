"""Functional API: `crepa_loss`, `manifold_loss`, `urepa_loss` (docs/contract.md §1 layer 3, §2)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from .checks import check_nonnegative, check_pair
from .options import CrepaOptions


class CrepaResult(NamedTuple):
    """loss: scalar (fp32, fp64 for fp64 inputs), differentiable. Metrics are detached scalars."""

    loss: torch.Tensor
    alignment_score: torch.Tensor
    similarity_self: torch.Tensor


class UrepaResult(NamedTuple):
    """loss = alignment + manifold_weight * manifold; `similarity` (detached) is the mean cosine."""

    loss: torch.Tensor
    alignment: torch.Tensor
    manifold: torch.Tensor
    similarity: torch.Tensor


def crepa_loss(z: torch.Tensor, y: torch.Tensor, *, distance: int = 1, tau: float = 1.0,
               cumulative: bool = False, normalize_by_frames: bool = True,
               normalize_neighbour_sum: bool = False, impl: str = "auto") -> CrepaResult:
    """CREPA (video) / REPA (image) cosine term of docs/contract.md §2.1.

    z: student tokens (B, T, N, D) or (B, N, D); y: teacher tokens of the same shape and dtype
    (float16, bfloat16, float32 or float64). Gradients reach z, and y when it requires grad.
    """
    opts = CrepaOptions(distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum)
    return crepa_loss_with_options(z, y, opts, impl=impl)


def crepa_loss_with_options(z: torch.Tensor, y: torch.Tensor, opts: CrepaOptions, *,
                            impl: str = "auto") -> CrepaResult:
    """`crepa_loss` with the hyper-parameters as one validated `CrepaOptions`."""
    if not isinstance(opts, CrepaOptions):
        raise TypeError(f"opts must be a repa_kernels.CrepaOptions, got {type(opts).__name__}")
    z4, y4 = check_pair(z, y, same_width=True)
    backend = backends.resolve(impl, z4.device)
    return CrepaResult(*backends.ops(backend).crepa(z4, y4, opts))


def manifold_loss(z: torch.Tensor, y: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Gram-difference manifold loss of docs/contract.md §2.2 (per sample, per frame when 4-D).

    z: (B, [T,] N, Dz), y: (B, [T,] N, Dy), widths may differ. Returns a scalar (fp32, fp64 for fp64).
    """
    z4, y4 = check_pair(z, y, same_width=False)
    backend = backends.resolve(impl, z4.device)
    return backends.ops(backend).manifold(z4, y4)


def urepa_loss(z: torch.Tensor, y: torch.Tensor, *, manifold_weight: float = 3.0,
               impl: str = "auto") -> UrepaResult:
    """U-REPA objective (docs/contract.md §2.2): -mean cosine + manifold_weight * manifold, before lambda.

    z, y: (B, N, D) or (B, T, N, D), same shape and dtype. With T > 1 the cosine is per frame
    (no neighbour terms) and the manifold loss is per (sample, frame).
    """
    check_nonnegative("manifold_weight", manifold_weight)
    z4, y4 = check_pair(z, y, same_width=True)
    ops = backends.ops(backends.resolve(impl, z4.device))
    alignment, similarity, _ = ops.crepa(z4, y4, CrepaOptions(distance=0))
    manifold = ops.manifold(z4, y4)
    return UrepaResult(alignment + manifold_weight * manifold, alignment, manifold, similarity)

