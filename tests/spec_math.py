"""An independent float64 NumPy transcription of docs/contract.md §2, written from the formulas alone.

Deliberately naive (explicit loops over frames and neighbour sets) so it shares no code or structure
with repa_kernels.reference.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12


def normalize(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(-1, keepdims=True))
    return np.where(norm < EPS, 0.0, x / np.where(norm < EPS, 1.0, norm))


def neighbour_set(f: int, frames: int, distance: int, cumulative: bool) -> list[int]:
    d = min(distance, frames - 1)
    if d == 0:
        return []
    offsets = range(1, d + 1) if cumulative else [d]
    return [g for k in offsets for g in (f - k, f + k) if 0 <= g < frames]


def crepa(z, y, distance=1, tau=1.0, cumulative=False, normalize_by_frames=True,
          normalize_neighbour_sum=False):
    """(loss, alignment_score, similarity_self) for z, y of shape (B, T, N, D) or (B, N, D)."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if z.ndim == 3:
        z, y = z[:, None], y[:, None]
    batch, frames, tokens, _ = z.shape
    zn, yn = normalize(z), normalize(y)

    def s(b, f, g):
        return sum(float(zn[b, f, n] @ yn[b, g, n]) for n in range(tokens)) / tokens

    totals = np.zeros((batch, frames))
    selfs = np.zeros((batch, frames))
    for b in range(batch):
        for f in range(frames):
            neighbours = neighbour_set(f, frames, distance, cumulative)
            weights = [math.exp(-abs(g - f) / tau) for g in neighbours]
            c = 1.0 / (1.0 + sum(weights)) if normalize_neighbour_sum else 1.0
            selfs[b, f] = s(b, f, f)
            totals[b, f] = c * (selfs[b, f] + sum(w * s(b, f, g) for w, g in zip(weights, neighbours)))
    video = totals.sum(1) / (frames if normalize_by_frames else 1)
    return -video.mean(), totals.mean(), selfs.mean()


def manifold(z, y):
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if z.ndim == 3:
        z, y = z[:, None], y[:, None]
    batch, frames, tokens = z.shape[:3]
    total = 0.0
    for b in range(batch):
        for t in range(frames):
            zn, yn = normalize(z[b, t]), normalize(y[b, t])
            total += float(((zn @ zn.T - yn @ yn.T) ** 2).sum())
    return total / (batch * frames * tokens * tokens)
