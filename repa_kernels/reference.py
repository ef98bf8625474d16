"""Plain-PyTorch reference of docs/contract.md §2: the ground truth of every test and the fallback on any device.

Everything here is differentiable by autograd (to z and y). Inputs are 4-D (B, T, N, D) tensors that
passed `checks.check_pair`. Math runs in float32 (float64 for float64 inputs); losses come back in
that compute dtype and gradients in the input dtype. torch.autocast is turned off inside (`crepa` and
`manifold`): it would run the Gram matmuls in bfloat16 / float16, which left the manifold loss 8% and
its gradient 30% off under CPU bf16 autocast; the kernels are custom ops that autocast never touches.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from .options import EPS, CrepaOptions, compute_dtype

# The manifold reference builds Gram matrices for this many (sample, frame) slices' worth of
# elements at a time, so its transient memory stays near the Grams autograd must keep anyway.
_GRAM_CHUNK_ELEMENTS = 1 << 26


# The device types torch.autocast knows; no other can have it on (asking about them raises).
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")
_Loss = TypeVar("_Loss", bound=Callable)


def without_autocast(loss: _Loss) -> _Loss:
    """`loss(z, y, ...)` run with torch.autocast off for z's device (a no-op when it is off)."""
    @functools.wraps(loss)
    def run(z: torch.Tensor, y: torch.Tensor, *arguments):
        device_type = z.device.type
        if device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return loss(z, y, *arguments)
        return loss(z, y, *arguments)
    return run  # type: ignore[return-value]


def safe_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim in the compute dtype; tokens with ||x|| < EPS become 0 with zero gradient.

    The norm is taken of x / max|x| so that squares neither overflow (|x| ~ 1e30 in float32) nor
    underflow; ||x|| = max|x| * ||x / max|x|||.
    """
    x = x.to(compute_dtype(x.dtype))
    # x / ||x|| does not depend on the scale, so the scale is a constant to autograd: exact gradients,
    # and no 1/peak² in the backward (which overflows for subnormal peaks and gave 0·inf = NaN).
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    unit_scaled = x / peak
    scaled_norm = torch.linalg.vector_norm(unit_scaled, dim=-1, keepdim=True)
    keep = peak * scaled_norm >= EPS
    inverse = torch.where(keep, 1.0 / torch.where(keep, scaled_norm, torch.ones_like(scaled_norm)),
                          torch.zeros_like(scaled_norm))
    return unit_scaled * inverse


def frame_similarities(zn: torch.Tensor, yn: torch.Tensor, offset: int) -> torch.Tensor:
    """s(f, f + offset)[b] for every frame f, (B, T); 0 where f + offset lies outside the clip."""
    batch, frames = zn.shape[:2]
    out = zn.new_zeros(batch, frames)
    lo, hi = max(0, -offset), frames - max(0, offset)
    if lo < hi:
        out[:, lo:hi] = (zn[:, lo:hi] * yn[:, lo + offset:hi + offset]).sum(-1).mean(-1)
    return out


def crepa_frame_totals(zn: torch.Tensor, yn: torch.Tensor, opts: CrepaOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """total[b, f] and s(f, f)[b] of docs/contract.md §2.1 from normalised tokens, both (B, T)."""
    frames = zn.shape[1]
    self_sim = frame_similarities(zn, yn, 0)
    total = self_sim
    for k in opts.offsets(frames):
        weight = opts.offset_weight(k)
        total = total + weight * (frame_similarities(zn, yn, k) + frame_similarities(zn, yn, -k))
    if not opts.normalize_neighbour_sum:
        return total, self_sim
    # c(f) as Python numbers, frame by frame: a host tensor moved to the device would sync every call
    scales = opts.frame_scale(frames)
    return torch.stack([total[:, f] * scales[f] for f in range(frames)], dim=1), self_sim


@without_autocast
def crepa(z: torch.Tensor, y: torch.Tensor, opts: CrepaOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CREPA/REPA term: (loss, alignment_score, similarity_self); metrics detached."""
    total, self_sim = crepa_frame_totals(safe_normalize(z), safe_normalize(y), opts)
    batch, frames = z.shape[:2]
    loss = -total.sum() / opts.loss_divisor(batch, frames)
    return loss, total.detach().mean(), self_sim.detach().mean()


@without_autocast
def manifold(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gram-difference loss of docs/contract.md §2.2: mean over (b, t, i, j) of (Ẑ Ẑᵀ − Ŷ Ŷᵀ)[i, j]²."""
    batch, frames, tokens = z.shape[:3]
    zn = safe_normalize(z).flatten(0, 1)
    yn = safe_normalize(y).flatten(0, 1)
    slices_per_chunk = max(1, _GRAM_CHUNK_ELEMENTS // (tokens * tokens))
    if zn.shape[0] <= slices_per_chunk:  # one chunk: no loop, so torch.compile keeps B and T symbolic
        return _gram_difference_sum(zn, yn) / (batch * frames * tokens * tokens)
    total = zn.new_zeros(())
    for start in range(0, zn.shape[0], slices_per_chunk):
        total = total + _gram_difference_sum(zn[start:start + slices_per_chunk], yn[start:start + slices_per_chunk])
    return total / (batch * frames * tokens * tokens)


def _gram_difference_sum(zn: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
    """Σ (Ẑ Ẑᵀ − Ŷ Ŷᵀ)² over a chunk of (S, N, D) normalised slices."""
    diff = torch.bmm(zn, zn.transpose(1, 2)) - torch.bmm(yn, yn.transpose(1, 2))
    return diff.square().sum()
