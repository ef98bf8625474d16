"""Hyper-parameters of the CREPA/REPA cosine term (docs/contract.md §2.1) and the frame weights they imply, and the
numeric rules every backend shares (the zero-token threshold EPS, the compute dtype).

The bottom of the kernel half: the reference path, the kernel ops and the functional API all import
it, and it imports only the scalar checks of `checks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import check_flag, describe, is_integer, is_real

EPS = 1e-12  # a token with ||z|| < EPS carries no direction: normalised to 0 with zero gradient


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend does its math and returns its losses in: float64 for float64 inputs,
    float32 for float32, float16 and bfloat16 (never lower, also under torch.autocast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class CrepaOptions:
    """Options of the neighbour-weighted cosine term.

    distance: d >= 0, clamped to T - 1 per clip; 0 leaves only the self term (per-frame REPA).
    tau: > 0, neighbour weight w(f, g) = exp(-|g - f| / tau).
    cumulative: neighbours at every offset 1..d (True) or only at +-d (False, "adjacent").
    normalize_by_frames: divide each clip's sum over frames by T.
    normalize_neighbour_sum: divide each frame's total by 1 + sum of its neighbour weights.
    """

    distance: int = 1
    tau: float = 1.0
    cumulative: bool = False
    normalize_by_frames: bool = True
    normalize_neighbour_sum: bool = False

    def __post_init__(self) -> None:
        if not is_integer(self.distance):
            raise TypeError(f"distance must be an integer >= 0, got {describe(self.distance)}")
        if self.distance < 0:
            raise ValueError(f"distance must be an integer >= 0, got {self.distance}")
        if not is_real(self.tau):
            raise TypeError(f"tau must be a finite number > 0, got {describe(self.tau)}")
        # Comparisons, not math.isfinite: they also run while torch.compile traces (dynamic=True), and
        # NaN and inf fail them too.
        if not 0 < self.tau < math.inf:
            raise ValueError(f"tau must be a finite number > 0, got {self.tau}")
        for name in ("cumulative", "normalize_by_frames", "normalize_neighbour_sum"):
            object.__setattr__(self, name, check_flag(name, getattr(self, name)))  # numpy bools become bools
        object.__setattr__(self, "distance", int(self.distance))
        object.__setattr__(self, "tau", float(self.tau))

    def offsets(self, num_frames: int) -> list[int]:
        """Positive neighbour offsets k (each used as +k and -k) for a clip of `num_frames` frames."""
        clamped = min(self.distance, num_frames - 1)
        if clamped <= 0:
            return []
        return list(range(1, clamped + 1)) if self.cumulative else [clamped]

    def offset_weight(self, offset: int) -> float:
        return math.exp(-abs(offset) / self.tau)

    def frame_scale(self, num_frames: int) -> list[float]:
        """c(f) for every frame: 1, or 1 / (1 + sum of the frame's neighbour weights)."""
        if not self.normalize_neighbour_sum:
            return [1.0] * num_frames
        offsets = self.offsets(num_frames)
        scales = []
        for f in range(num_frames):
            total = 1.0
            for k in offsets:
                for g in (f - k, f + k):
                    if 0 <= g < num_frames:
                        total += self.offset_weight(k)
            scales.append(1.0 / total)
        return scales

    def frame_weight_list(self, num_frames: int) -> list[float]:
        """W of `frame_weights` as a row-major list of T*T Python floats (no tensor: traceable by
        torch.compile, and what the C++ op takes)."""
        scales = self.frame_scale(num_frames)
        offsets = self.offsets(num_frames)
        weights = [0.0] * (num_frames * num_frames)
        for f in range(num_frames):
            weights[f * num_frames + f] = scales[f]
            for k in offsets:
                for g in (f - k, f + k):
                    if 0 <= g < num_frames:
                        weights[f * num_frames + g] = scales[f] * self.offset_weight(k)
        return weights

    def frame_weights(self, num_frames: int, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """(T, T) matrix W with W[f, g] = c(f) * w(f, g) (w(f, f) = 1) and 0 outside {f} u K(f).

        total[b, f] = sum_g W[f, g] * s(f, g)[b]; built on the host from Python numbers.
        """
        return torch.tensor(self.frame_weight_list(num_frames), dtype=dtype, device=device).view(num_frames,
                                                                                                 num_frames)

    def loss_divisor(self, batch: int, num_frames: int) -> int:
        """B' of docs/contract.md §2.1: loss = -sum_{b,f} total[b, f] / B'."""
        return batch * (num_frames if self.normalize_by_frames else 1)
