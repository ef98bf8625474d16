"""Drop-in `torch.nn.Module` losses over the functional API (docs/contract.md §1 layer 4)."""

from __future__ import annotations

import torch
from torch import nn

from . import backends
from .checks import check_nonnegative
from .functional import CrepaResult, UrepaResult, crepa_loss_with_options, manifold_loss, urepa_loss
from .options import CrepaOptions


class CrepaLoss(nn.Module):
    """Negative neighbour-weighted cosine similarity (docs/contract.md §2.1); REPA when T = 1 or distance = 0.

    forward(z, y): z, y (B, T, N, D) or (B, N, D) -> scalar loss, or a `CrepaResult` with
    `return_metrics=True`.
    """

    def __init__(self, distance: int = 1, tau: float = 1.0, cumulative: bool = False,
                 normalize_by_frames: bool = True, normalize_neighbour_sum: bool = False,
                 impl: str = "auto") -> None:
        super().__init__()
        self.options = CrepaOptions(distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum)
        self.impl = backends.check_impl(impl)

    def forward(self, z: torch.Tensor, y: torch.Tensor, return_metrics: bool = False) -> torch.Tensor | CrepaResult:
        result = crepa_loss_with_options(z, y, self.options, impl=self.impl)
        return result if return_metrics else result.loss

    def extra_repr(self) -> str:
        o = self.options
        return (f"distance={o.distance}, tau={o.tau}, cumulative={o.cumulative}, "
                f"normalize_by_frames={o.normalize_by_frames}, "
                f"normalize_neighbour_sum={o.normalize_neighbour_sum}, impl={self.impl!r}")


class ManifoldLoss(nn.Module):
    """Gram-difference manifold loss (docs/contract.md §2.2), optionally scaled by `weight`.

    forward(z, y): z (B, [T,] N, Dz), y (B, [T,] N, Dy) -> scalar.
    """

    def __init__(self, weight: float = 1.0, impl: str = "auto") -> None:
        super().__init__()
        self.weight = check_nonnegative("weight", weight)
        self.impl = backends.check_impl(impl)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = manifold_loss(z, y, impl=self.impl)
        return loss if self.weight == 1.0 else self.weight * loss

    def extra_repr(self) -> str:
        return f"weight={self.weight}, impl={self.impl!r}"


class UrepaLoss(nn.Module):
    """U-REPA objective (docs/contract.md §2.2): -mean cosine + manifold_weight * manifold.

    forward(z, y) -> scalar loss, or a `UrepaResult` with `return_metrics=True`.
    """

    def __init__(self, manifold_weight: float = 3.0, impl: str = "auto") -> None:
        super().__init__()
        self.manifold_weight = check_nonnegative("manifold_weight", manifold_weight)
        self.impl = backends.check_impl(impl)

    def forward(self, z: torch.Tensor, y: torch.Tensor, return_metrics: bool = False) -> torch.Tensor | UrepaResult:
        result = urepa_loss(z, y, manifold_weight=self.manifold_weight, impl=self.impl)
        return result if return_metrics else result.loss

    def extra_repr(self) -> str:
        return f"manifold_weight={self.manifold_weight}, impl={self.impl!r}"
