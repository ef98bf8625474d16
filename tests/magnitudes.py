"""Huge and tiny token magnitudes for the C++ kernel tests (docs/contract.md §2: norms must not overflow).

A row whose squared norm leaves [2^-64, 2^64] (fp32; [2^-400, 2^400] fp64) is used as its exact
power-of-two rescaled copy (csrc/common.h): 1e30^2 would overflow fp32, 1e-30^2 underflow it.
"""

from __future__ import annotations

import torch

from tolerance import assert_within_reference_error

# Token scales: huge (squares overflow fp32), beyond 2^32 (rescaled), just below it (not), ordinary,
# tiny but a real direction (||x|| ~ 4e-11 > 1e-12, rescaled), and zero tokens (||x|| < 1e-12).
TOKEN_SCALES = {
    torch.float32: [1e30, 3e37, 1e10, 1e9, 1.0, 1e-3, 1e-11, 1e-14, 1e-30],
    torch.float64: [1e300, 1e200, 1e130, 1.0, 1e-100, 1e-200],
}
# Gradient entries this small are fp32 subnormals (1 / ||x|| for |x| ~ 3e37): compared only through the
# whole-tensor rule, not per scale group.
NORMAL_GRADIENT = 1e-35


def token_count(dtype: torch.dtype) -> int:
    """Tokens per frame that `scale_tokens` needs: every pairing of the dtype's scales."""
    return len(TOKEN_SCALES[torch.float64 if dtype == torch.float64 else torch.float32]) ** 2


def scale_tokens(z: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
    """float64 (B, T, token_count(dtype), D) inputs -> (z, y in `dtype`, z_scale, y_scale): token n gets
    z scale S[n % |S|] and y scale S[n // |S|], and (below fp64) token 4, of ordinary size, a single
    1e35 channel."""
    scales = torch.tensor(TOKEN_SCALES[torch.float64 if dtype == torch.float64 else torch.float32],
                          dtype=torch.float64)
    count = len(scales)
    index = torch.arange(count * count)
    z_scale, y_scale = scales[index % count], scales[index // count]
    z, y = z * z_scale[:, None], y * y_scale[:, None]
    if dtype != torch.float64:
        z[0, 0, 4, 3] = 1e35  # token 4: z scale 1, one dominant channel
    return z.to(dtype), y.to(dtype), z_scale, y_scale


def check_each_scale_group(kernel, ref, truth, token_scale, dtype, what):
    """tests/tolerance.py's rule on the gradient rows of each token scale separately (relative to that
    group's largest true entry), so that the tiny gradients of huge tokens are checked too."""
    for scale in token_scale.unique():
        rows = token_scale == scale
        group_truth = truth[:, :, rows]
        if group_truth.abs().max() < NORMAL_GRADIENT:
            continue
        assert_within_reference_error(kernel[:, :, rows], ref[:, :, rows], group_truth, dtype,
                                      f"{what} of tokens at scale {scale.item():g}", relative=True)
