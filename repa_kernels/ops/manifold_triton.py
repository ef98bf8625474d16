"""Tiled Triton kernels of the manifold (Gram difference) loss (docs/contract.md §2.2), forward and backward.

Shapes: z (B, T, N, Dz) and y (B, T, N, Dy), widths may differ, float16 / bfloat16 / float32 /
float64, any strides. Every (b, t) slice is one N-token set:

    loss = Σ_slices Σ_ij (Ẑ Ẑᵀ − Ŷ Ŷᵀ)[i, j]² / (B·T·N²)

No N x N tensor ever exists: Gram entries live only as register tiles.

- Inverse norms: one streaming kernel per input writes, per token, a power-of-two scale 2^-e with
  2^e <= max|x| < 2^(e+1) and 1/||x·2^-e|| (0 for zero tokens): B·T·N pairs. The squares are of the
  scaled token, so |x| ~ 1e30 does not overflow (docs/contract.md §2: the reference's max-scaled norm).
- Gram tiles: raw dot products times the two inverse norms, so no normalised copy is made and
  bf16/fp16 tiles enter `tl.dot` as they are (fp32 accumulation). Raw products overflow (or
  underflow) for extreme tokens, so a tile whose rows include a non-zero token with |e| above 40
  (fp32 accumulation; 400 in float64; bfloat16 and float64 inputs only, see `_gram_switches`)
  takes a branch that first multiplies each row by its 2^-e (exact); ordinary tiles take the plain
  path and give bitwise the results of unscaled math. float32 and float64 inputs accumulate in float64
  with explicit products (see `_gram_dtype`): exact enough near convergence, but without tensor cores
  (on a GPU the float32 path is a correctness path, not a fast one).
- Forward: one program per (slice, row block i, column block j) with j >= i (the Gram difference is
  symmetric, so off-diagonal tiles count twice and the lower triangle is skipped). It accumulates the
  raw Gram tiles Z_i Z_jᵀ and Y_i Y_jᵀ over channel chunks, scales them, and writes Σ (G_z − G_y)² of
  its tile to a per-program partial; one program sums the partials in a fixed order.
- Backward, flash-attention style: one program per (slice, row block i, chunk of output channels);
  it walks the column blocks j, recomputes E_ij = G_z − G_y, and accumulates E_ij X̂_j (X = Z for dZ,
  Y for dY) together with Σ_j E_ij G_x,ij = x̂_i·(E X̂)_i, which is exactly the projection the
  normalisation backward needs: dx_i = s·(E X̂ − x̂_i (x̂_i·E X̂)_i)/||x_i||, s = ±4·grad/(B·T·N²).
  So the gradient is written once, in the input dtype, with no atomics (bitwise reproducible).
  For fp16/bf16, E and X̂ enter that product rounded to the input dtype (like P in attention's P·V):
  with GPU rounding emulated in the interpreter, bf16 gradient error 3.4e-3 of the largest entry vs
  2.2e-3 for the bf16 reference (B=2, N=37, D=67; the rule allows 7.2e-3).
  Cost: the Gram tiles are recomputed once per output chunk (⌈D/BLOCK_OUT⌉ times per target); a
  register-resident output row block cannot hold all D channels when D is in the thousands.

The D x D identity of docs/contract.md §2.2 (‖ẐᵀẐ‖² − 2‖ẐᵀŶ‖² + ‖ŶᵀŶ‖², gradient Ẑ(ẐᵀẐ) − Ŷ(ŶᵀẐ)) is not
used: it subtracts large, nearly equal numbers, and near convergence (Z ≈ Y) that fails the accuracy
rule. Measured in float32 against float64 on one slice with N > D (where it would be the cheaper form),
Y = Z + s·noise:
    N=1024, D=64,  s=1e-3: loss 3.2e-8; loss error identity 5.2e-9 (16% of the loss), N x N form 3e-14;
                           gradient error / max entry: identity 5.8e-4, N x N form (the float32
                           reference) 7.8e-5, so the rule allows 7.9e-5
    N=2048, D=256, s=1e-3: loss 7.8e-9; gradient error identity 8.0e-4, N x N form 1.2e-4
    N=1024, D=64,  s=1e-5: loss 3.2e-12; loss error identity 3.2e-12 (100%); gradient 5.0e-2 vs 7.7e-3
So only the tiled N x N form is implemented.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import compute_dtype
from . import saved_gradients, utils
from .utils import inverse_norm, lowest_exponent, power_of_two, running_exponent, store_cast

_FINALIZE_BLOCK = 1024


# Rows of the (3, B·T·N) token-norm tensor that `inverse_norms` writes.
_INVERSE = tl.constexpr(0)         # 1/||x|| (exact for moderate tokens; may underflow for huge ones)
_SCALED_INVERSE = tl.constexpr(1)  # 1/||x·2^-e||: 0 exactly for zero tokens
_SCALE = tl.constexpr(2)           # 2^-e, a power of two with 2^e <= max|x| < 2^(e+1)


@triton.jit
def _inverse_norms_kernel(x_ptr, norms_ptr, num_rows, num_frames, num_tokens, dim,
                          stride_b, stride_t, stride_n, stride_d,
                          ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The three norm rows (_INVERSE, _SCALED_INVERSE, _SCALE) of the B·T·N token rows of a
    (B, T, N, D) tensor; the squares summed are those of x·2^-e, so |x| ~ 1e30 does not overflow."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < num_rows
    batch = rows // (num_frames * num_tokens)
    frame = (rows // num_tokens) % num_frames
    token = rows % num_tokens
    base = x_ptr + batch * stride_b + frame * stride_t + token * stride_n
    exponent = tl.zeros([BLOCK_N], tl.int32) + lowest_exponent(ACC)
    squared = tl.zeros([BLOCK_N], ACC)  # ||x·2^-e||², rescaled whenever a chunk raises e
    for d0 in range(0, dim, BLOCK_D):
        chans = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (chans < dim)[None, :]
        tile = tl.load(base[:, None] + chans[None, :] * stride_d, mask=mask, other=0.0).to(ACC)
        raised = running_exponent(exponent, tile, ACC)
        tile = tile * power_of_two(-raised, ACC)[:, None]
        squared = squared * power_of_two(2 * (exponent - raised), ACC) + tl.sum(tile * tile, 1)
        exponent = raised
    scaled_inverse = inverse_norm(squared, exponent, ACC)
    scale = power_of_two(-exponent, ACC)
    tl.store(norms_ptr + _INVERSE * num_rows + rows, scaled_inverse * scale, mask=row_mask)
    tl.store(norms_ptr + _SCALED_INVERSE * num_rows + rows, scaled_inverse, mask=row_mask)
    tl.store(norms_ptr + _SCALE * num_rows + rows, scale, mask=row_mask)


@triton.jit
def _multiply_accumulate(a, b, acc, UPCAST: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. Tensor cores with fp32 accumulation (`tl.dot`), or explicit products for float64."""
    if USE_DOT:
        if UPCAST:  # the interpreter's bf16/fp16 arithmetic is wrong: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)


@triton.jit
def _gram_operands(base, rows_i, rows_j, mask_i, mask_j, k0, dim, stride_n, stride_d, BLOCK_K: tl.constexpr):
    """Channels [k0, k0 + BLOCK_K) of rows_i (BLOCK_M x BLOCK_K) and, transposed, of rows_j (BLOCK_K x BLOCK_N)."""
    chans = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    chan_mask = chans < dim
    a = tl.load(base + rows_i[:, None] * stride_n + chans[None, :] * stride_d,
                mask=mask_i[:, None] & chan_mask[None, :], other=0.0)
    b = tl.load(base + chans[:, None] * stride_d + rows_j[None, :] * stride_n,
                mask=chan_mask[:, None] & mask_j[None, :], other=0.0)
    return a, b


@triton.jit
def _raw_gram_tile(base, scale_ptr, rows_i, rows_j, num_tokens, dim, depth, stride_n, stride_d,
                   SCALED: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_{k < depth} x[i, k]·x[j, k] for rows_i x rows_j (unnormalised; padded rows give 0); with
    SCALED, of the rows times their power-of-two scales scale_ptr[row] (exact, also in the input
    dtype that enters the tensor cores)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    mask_i = rows_i < num_tokens
    mask_j = rows_j < num_tokens
    if SCALED:
        scale_i = tl.load(scale_ptr + rows_i, mask=mask_i, other=0.0)
        scale_j = tl.load(scale_ptr + rows_j, mask=mask_j, other=0.0)
        # Not software-pipelined: prefetched tiles would wait in registers (they are scaled on their
        # way to the tensor cores) next to the Gram accumulators. A rare, slower path.
        for k0 in tl.range(0, depth, BLOCK_K, num_stages=1):
            a, b = _gram_operands(base, rows_i, rows_j, mask_i, mask_j, k0, dim, stride_n, stride_d, BLOCK_K)
            if UPCAST or not USE_DOT:
                a = (a.to(ACC) * scale_i[:, None]).to(a.dtype)
                b = (b.to(ACC) * scale_j[None, :]).to(b.dtype)
            else:  # a power of two is exact in bf16 / fp16 too, and packed halves need fewer registers
                a = a * scale_i.to(a.dtype)[:, None]
                b = b * scale_j.to(b.dtype)[None, :]
            acc = _multiply_accumulate(a, b, acc, UPCAST, USE_DOT, PRECISION)
    else:
        for k0 in range(0, depth, BLOCK_K):
            a, b = _gram_operands(base, rows_i, rows_j, mask_i, mask_j, k0, dim, stride_n, stride_d, BLOCK_K)
            acc = _multiply_accumulate(a, b, acc, UPCAST, USE_DOT, PRECISION)
    return acc


@triton.jit
def _normalised_grams(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j, num_tokens,
                      dim_z, dim_y, depth_z, depth_y, stride_zn, stride_zd, stride_yn, stride_yd,
                      SCALED: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(Ẑ_i Ẑ_jᵀ, Ŷ_i Ŷ_jᵀ) tiles: raw products times 1/||x|| per row, or (SCALED) products of the
    rows scaled by 2^-e times 1/||x·2^-e||. The norms are loaded after the channel loops."""
    gram_z = _raw_gram_tile(z_base, norms_z_ptr + _SCALE * norms_stride, rows_i, rows_j, num_tokens, dim_z,
                            depth_z, stride_zn, stride_zd, SCALED, UPCAST, USE_DOT, PRECISION, ACC,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    gram_y = _raw_gram_tile(y_base, norms_y_ptr + _SCALE * norms_stride, rows_i, rows_j, num_tokens, dim_y,
                            depth_y, stride_yn, stride_yd, SCALED, UPCAST, USE_DOT, PRECISION, ACC,
                            BLOCK_M, BLOCK_N, BLOCK_K)
    if SCALED:
        row = _SCALED_INVERSE
    else:
        row = _INVERSE
    mask_i = rows_i < num_tokens
    mask_j = rows_j < num_tokens
    inv_z_i = tl.load(norms_z_ptr + row * norms_stride + rows_i, mask=mask_i, other=0.0)
    inv_z_j = tl.load(norms_z_ptr + row * norms_stride + rows_j, mask=mask_j, other=0.0)
    inv_y_i = tl.load(norms_y_ptr + row * norms_stride + rows_i, mask=mask_i, other=0.0)
    inv_y_j = tl.load(norms_y_ptr + row * norms_stride + rows_j, mask=mask_j, other=0.0)
    return (gram_z * inv_z_i[:, None] * inv_z_j[None, :], gram_y * inv_y_i[:, None] * inv_y_j[None, :])


@triton.jit
def _moderate_rows(norms_ptr, norms_stride, rows, num_tokens, MODERATE_SCALE: tl.constexpr):
    """1 when every row is a zero token (its Gram entries are 0 whatever the products) or has
    1/MODERATE_SCALE <= 2^-e <= MODERATE_SCALE, where raw products neither overflow nor underflow
    the accumulator; else 0."""
    mask = rows < num_tokens
    inv = tl.load(norms_ptr + _SCALED_INVERSE * norms_stride + rows, mask=mask, other=0.0)
    scale = tl.load(norms_ptr + _SCALE * norms_stride + rows, mask=mask, other=1.0)
    moderate = (inv == 0.0) | ((scale <= MODERATE_SCALE) & (scale >= 1.0 / MODERATE_SCALE))
    return tl.min(moderate.to(tl.int32), 0)


@triton.jit
def _squared_difference_sum(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j, num_tokens,
                            dim_z, dim_y, depth_z, depth_y, stride_zn, stride_zd, stride_yn, stride_yd,
                            SCALED: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr,
                            PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ over the tile of (Ĝ_z − Ĝ_y)²."""
    gram_z, gram_y = _normalised_grams(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j,
                                       num_tokens, dim_z, dim_y, depth_z, depth_y, stride_zn, stride_zd,
                                       stride_yn, stride_yd, SCALED, UPCAST, USE_DOT, PRECISION, ACC,
                                       BLOCK_M, BLOCK_M, BLOCK_K)
    diff = gram_z - gram_y
    return tl.sum(tl.sum(diff * diff, 1), 0)


@triton.jit
def _manifold_forward_kernel(
    z_ptr, y_ptr, norms_z_ptr, norms_y_ptr, partial_ptr,
    num_frames, num_tokens, dim_z, dim_y, num_blocks, norms_stride,
    stride_zb, stride_zt, stride_zn, stride_zd,
    stride_yb, stride_yt, stride_yn, stride_yd,
    EXTREME_ROWS: tl.constexpr, MODERATE_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    block_j = pid % num_blocks
    block_i = (pid // num_blocks) % num_blocks
    slice_index = pid // (num_blocks * num_blocks)
    batch = slice_index // num_frames
    frame = slice_index % num_frames
    # Symmetry: only tiles with j >= i do work (an empty channel loop otherwise).
    active = block_j >= block_i
    rows_i = block_i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rows_j = block_j * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    z_base = z_ptr + batch * stride_zb + frame * stride_zt
    y_base = y_ptr + batch * stride_yb + frame * stride_yt
    norms_z_ptr += slice_index * num_tokens
    norms_y_ptr += slice_index * num_tokens
    depth_z = tl.where(active, dim_z, 0)
    depth_y = tl.where(active, dim_y, 0)
    # One uniform branch per program: the scaled path only where a row is extreme (see module doc).
    moderate = True
    if EXTREME_ROWS:
        moderate = (_moderate_rows(norms_z_ptr, norms_stride, rows_i, num_tokens, MODERATE_SCALE)
                    * _moderate_rows(norms_z_ptr, norms_stride, rows_j, num_tokens, MODERATE_SCALE)
                    * _moderate_rows(norms_y_ptr, norms_stride, rows_i, num_tokens, MODERATE_SCALE)
                    * _moderate_rows(norms_y_ptr, norms_stride, rows_j, num_tokens, MODERATE_SCALE)) != 0
    if moderate:
        total = _squared_difference_sum(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j,
                                        num_tokens, dim_z, dim_y, depth_z, depth_y, stride_zn, stride_zd,
                                        stride_yn, stride_yd, False, UPCAST, USE_DOT, PRECISION, ACC,
                                        BLOCK_M, BLOCK_K)
    else:
        total = _squared_difference_sum(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j,
                                        num_tokens, dim_z, dim_y, depth_z, depth_y, stride_zn, stride_zd,
                                        stride_yn, stride_yd, True, UPCAST, USE_DOT, PRECISION, ACC,
                                        BLOCK_M, BLOCK_K)
    weight = tl.where(block_j > block_i, 2.0, tl.where(active, 1.0, 0.0))
    tl.store(partial_ptr + pid, weight * total)


@triton.jit
def _manifold_finalize_kernel(partial_ptr, num_partials, loss_ptr, num_tokens, num_slices,
                              ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: loss = Σ partials / (B·T·N²), summed in a fixed order."""
    total = tl.zeros([BLOCK], ACC)
    for start in range(0, num_partials, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(partial_ptr + index, mask=index < num_partials, other=0.0)
    loss = tl.sum(total, 0) / num_tokens / num_tokens / num_slices
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _manifold_backward_kernel(
    z_ptr, y_ptr, norms_z_ptr, norms_y_ptr, grad_ptr, out_ptr,
    num_frames, num_tokens, dim_z, dim_y, num_row_blocks, num_col_blocks, num_chunks, num_slices, norms_stride,
    stride_zb, stride_zt, stride_zn, stride_zd,
    stride_yb, stride_yt, stride_yn, stride_yd,
    TARGET_Z: tl.constexpr, X_DTYPE: tl.constexpr, EXTREME_ROWS: tl.constexpr, MODERATE_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
):
    """Gradient of the loss to z (TARGET_Z) or y, channels [chunk·BLOCK_OUT, +BLOCK_OUT) of row block i."""
    pid = tl.program_id(0).to(tl.int64)
    chunk = pid % num_chunks
    block_i = (pid // num_chunks) % num_row_blocks
    slice_index = pid // (num_chunks * num_row_blocks)
    batch = slice_index // num_frames
    frame = slice_index % num_frames
    z_base = z_ptr + batch * stride_zb + frame * stride_zt
    y_base = y_ptr + batch * stride_yb + frame * stride_yt
    norms_z_ptr += slice_index * num_tokens
    norms_y_ptr += slice_index * num_tokens
    if TARGET_Z:
        x_base = z_base
        x_dim = dim_z
        stride_xn = stride_zn
        stride_xd = stride_zd
        norms_x_ptr = norms_z_ptr
        sign = 1.0
    else:
        x_base = y_base
        x_dim = dim_y
        stride_xn = stride_yn
        stride_xd = stride_yd
        norms_x_ptr = norms_y_ptr
        sign = -1.0

    rows_i = block_i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_i = rows_i < num_tokens
    cols = chunk * BLOCK_OUT + tl.arange(0, BLOCK_OUT).to(tl.int64)
    col_mask = cols < x_dim
    if EXTREME_ROWS:
        moderate_i = (_moderate_rows(norms_z_ptr, norms_stride, rows_i, num_tokens, MODERATE_SCALE)
                      * _moderate_rows(norms_y_ptr, norms_stride, rows_i, num_tokens, MODERATE_SCALE))

    product = tl.zeros([BLOCK_M, BLOCK_OUT], ACC)  # (E X̂)_i for this chunk of channels
    projection = tl.zeros([BLOCK_M], ACC)          # Σ_j E_ij G_x,ij = x̂_i · (E X̂)_i
    for block_j in range(0, num_col_blocks):
        rows_j = block_j * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_j = rows_j < num_tokens
        moderate = True
        if EXTREME_ROWS:
            moderate = (moderate_i * _moderate_rows(norms_z_ptr, norms_stride, rows_j, num_tokens, MODERATE_SCALE)
                        * _moderate_rows(norms_y_ptr, norms_stride, rows_j, num_tokens, MODERATE_SCALE)) != 0
        if moderate:
            gram_z, gram_y = _normalised_grams(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j,
                                               num_tokens, dim_z, dim_y, dim_z, dim_y, stride_zn, stride_zd,
                                               stride_yn, stride_yd, False, UPCAST, USE_DOT, PRECISION, ACC,
                                               BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            gram_z, gram_y = _normalised_grams(z_base, y_base, norms_z_ptr, norms_y_ptr, norms_stride, rows_i, rows_j,
                                               num_tokens, dim_z, dim_y, dim_z, dim_y, stride_zn, stride_zd,
                                               stride_yn, stride_yd, True, UPCAST, USE_DOT, PRECISION, ACC,
                                               BLOCK_M, BLOCK_N, BLOCK_K)
        difference = gram_z - gram_y
        if TARGET_Z:
            projection += tl.sum(difference * gram_z, 1)
        else:
            projection += tl.sum(difference * gram_y, 1)
        # x̂_j = (x_j·2^-e)·1/||x_j·2^-e||: the same value as x_j/||x_j|| for moderate rows.
        inv_x_j = tl.load(norms_x_ptr + _SCALED_INVERSE * norms_stride + rows_j, mask=mask_j, other=0.0)
        scale_x_j = tl.load(norms_x_ptr + _SCALE * norms_stride + rows_j, mask=mask_j, other=0.0)
        x_j = tl.load(x_base + rows_j[:, None] * stride_xn + cols[None, :] * stride_xd,
                      mask=mask_j[:, None] & col_mask[None, :], other=0.0)
        x_hat_j = x_j.to(ACC) * scale_x_j[:, None] * inv_x_j[:, None]
        if USE_DOT:
            # Half inputs: E and X̂ (both bounded by 2 in magnitude) enter the tensor cores in the input
            # dtype, rounded to nearest, as attention kernels do with P·V.
            product = _multiply_accumulate(store_cast(difference, X_DTYPE, INTERPRET),
                                           store_cast(x_hat_j, X_DTYPE, INTERPRET), product,
                                           UPCAST, USE_DOT, PRECISION)
        else:
            product = _multiply_accumulate(difference, x_hat_j, product, UPCAST, USE_DOT, PRECISION)

    inv_x_i = tl.load(norms_x_ptr + _SCALED_INVERSE * norms_stride + rows_i, mask=mask_i, other=0.0)
    scale_x_i = tl.load(norms_x_ptr + _SCALE * norms_stride + rows_i, mask=mask_i, other=0.0)
    x_i = tl.load(x_base + rows_i[:, None] * stride_xn + cols[None, :] * stride_xd,
                  mask=mask_i[:, None] & col_mask[None, :], other=0.0).to(ACC) * scale_x_i[:, None]
    grad = tl.load(grad_ptr).to(ACC)
    grad_scale = sign * 4.0 * grad / num_tokens / num_tokens / num_slices
    # dx_i = (dx̂_i − x̂_i (x̂_i·dx̂_i)) / ||x_i|| with dx̂ = grad_scale·E X̂; here x_i is scaled by 2^-e,
    # x̂_i = x_i·inv_x_i and 1/||x_i|| = inv_x_i·2^-e, whose 2^-e comes last (it underflows only where
    # the gradient itself does).
    result = ((grad_scale * inv_x_i)[:, None] * (product - (inv_x_i * projection)[:, None] * x_i)) \
        * scale_x_i[:, None]
    out_offsets = (slice_index * num_tokens + rows_i)[:, None] * x_dim + cols[None, :]
    tl.store(out_ptr + out_offsets, store_cast(result, X_DTYPE, INTERPRET),
             mask=mask_i[:, None] & col_mask[None, :])


def _gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the Gram kernels: float32 for half inputs, float64 for float32/float64.

    float32 inputs accumulate in float64 (a product of two float32 values is exact in float64): near
    convergence G_z − G_y cancels, and float32 Grams then carry the same error as the float32
    reference (measured: gradient error 7.3e-5 of its max entry vs 5.7e-5 for the reference at
    N=48, D=16, Y = Z + 1e-3·noise), so the accuracy rule would be a coin toss.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _gram_switches(dtype: torch.dtype) -> dict:
    """Constexprs of the Gram kernels for inputs of `dtype`."""
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(
        UPCAST=utils.is_interpreter(),
        # Tensor cores for half inputs; float64 products written out otherwise (tl.dot in float64 is
        # not available on every Triton 3.6+ GPU backend).
        USE_DOT=half,
        PRECISION="tf32",  # ignored: tl.dot only ever sees fp16/bf16 (or fp32 in the interpreter)
        ACC=utils.triton_dtype(_gram_dtype(dtype)),
        # Rows scaled by 2^-e with |e| <= log2(MODERATE_SCALE) have raw products that neither overflow
        # nor underflow the accumulator (D·2^82 < 2^128 in float32). Every float16 row qualifies
        # (-24 <= e <= 15) and so does every float32 row in float64 (|e| <= 127): only bfloat16 and
        # float64 inputs can hold extreme rows and compile the scaled branch.
        EXTREME_ROWS=dtype in (torch.bfloat16, torch.float64),
        MODERATE_SCALE=2.0 ** 400 if _gram_dtype(dtype) == torch.float64 else 2.0 ** 40,
    )


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """(3, B·T·N) token norms of a (B, T, N, D) tensor in the Gram dtype: row 0 1/||x|| (0 for zero
    tokens; exact for moderate tokens only, it may underflow for huge ones), row 1 1/||x·2^-e|| (0
    exactly for zero tokens), row 2 the power-of-two scales 2^-e (2^e <= max|x| < 2^(e+1))."""
    batch, frames, tokens, dim = x.shape
    rows = batch * frames * tokens
    out = torch.empty(3, rows, dtype=_gram_dtype(x.dtype), device=x.device)
    blocks = utils.token_blocks(tokens, dim, x.dtype)
    with utils.device_guard(x):
        _inverse_norms_kernel[(triton.cdiv(rows, blocks.block_n),)](
            x, out, rows, frames, tokens, dim, *utils.strides4(x),
            ACC=utils.triton_dtype(_gram_dtype(x.dtype)), BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d,
            num_warps=blocks.num_warps)
    return out


def manifold_forward(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, norms_z, norms_y): the loss and the token norms (see `inverse_norms`) the backward reuses."""
    batch, frames, tokens, dim_z = z.shape
    dim_y = y.shape[-1]
    norms_z, norms_y = inverse_norms(z), inverse_norms(y)
    blocks = utils.manifold_blocks(tokens, dim_z, dim_y, z.dtype, backward=False)
    num_blocks = triton.cdiv(tokens, blocks.block_m)
    num_programs = batch * frames * num_blocks * num_blocks
    partials = torch.empty(num_programs, dtype=_gram_dtype(z.dtype), device=z.device)
    loss = torch.empty((), dtype=compute_dtype(z.dtype), device=z.device)
    switches = _gram_switches(z.dtype)
    with utils.device_guard(z):
        _manifold_forward_kernel[(num_programs,)](
            z, y, norms_z, norms_y, partials, frames, tokens, dim_z, dim_y, num_blocks, norms_z.stride(0),
            *utils.strides4(z), *utils.strides4(y), **switches,
            BLOCK_M=blocks.block_m, BLOCK_K=blocks.block_k,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        _manifold_finalize_kernel[(1,)](partials, num_programs, loss, tokens, batch * frames,
                                        ACC=switches["ACC"], BLOCK=_FINALIZE_BLOCK, num_warps=4)
    return loss, norms_z, norms_y


def manifold_gradient(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, norms_z: torch.Tensor,
                      norms_y: torch.Tensor, target_z: bool) -> torch.Tensor:
    """Gradient of the loss, scaled by the upstream `grad` (a 0-d tensor), to z or y (contiguous)."""
    batch, frames, tokens, dim_z = z.shape
    dim_y = y.shape[-1]
    x = z if target_z else y
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    blocks = utils.manifold_blocks(tokens, dim_z, dim_y, z.dtype, backward=True)
    row_blocks = triton.cdiv(tokens, blocks.block_m)
    chunks = triton.cdiv(x.shape[-1], blocks.block_out)
    switches = _gram_switches(z.dtype)
    with utils.device_guard(z):
        _manifold_backward_kernel[(batch * frames * row_blocks * chunks,)](
            z, y, norms_z, norms_y, grad, out,
            frames, tokens, dim_z, dim_y, row_blocks, triton.cdiv(tokens, blocks.block_n), chunks,
            batch * frames, norms_z.stride(0), *utils.strides4(z), *utils.strides4(y),
            TARGET_Z=target_z, X_DTYPE=utils.triton_dtype(x.dtype), **switches,
            INTERPRET=utils.is_interpreter(),
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
            BLOCK_OUT=blocks.block_out, num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library registration: opaque nodes for torch.compile; the backward is an op of its own.

@torch.library.custom_op("repa_kernels::manifold_triton_forward", mutates_args=())
def manifold_triton_forward(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, norms_z, norms_y); norms_* are the (3, B·T·N) token norms (`inverse_norms`) saved for the
    backward."""
    return manifold_forward(z, y)


@manifold_triton_forward.register_fake
def _manifold_triton_forward_fake(z, y):
    rows = z.shape[0] * z.shape[1] * z.shape[2]
    return z.new_empty((), dtype=compute_dtype(z.dtype)), \
        z.new_empty((3, rows), dtype=_gram_dtype(z.dtype)), y.new_empty((3, rows), dtype=_gram_dtype(y.dtype))


@torch.library.custom_op("repa_kernels::manifold_triton_backward", mutates_args=())
def manifold_triton_backward(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, norms_z: torch.Tensor,
                             norms_y: torch.Tensor, need_dz: bool, need_dy: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dy) for the upstream gradient `grad`; an empty tensor where not requested."""
    dz = manifold_gradient(grad, z, y, norms_z, norms_y, target_z=True) if need_dz else z.new_empty((0,))
    dy = manifold_gradient(grad, z, y, norms_z, norms_y, target_z=False) if need_dy else y.new_empty((0,))
    return dz, dy


@manifold_triton_backward.register_fake
def _manifold_triton_backward_fake(grad, z, y, norms_z, norms_y, need_dz, need_dy):
    return (z.new_empty(z.shape) if need_dz else z.new_empty((0,)),
            y.new_empty(y.shape) if need_dy else y.new_empty((0,)))


def _manifold_setup_context(ctx, inputs, output):
    z, y = inputs
    _, norms_z, norms_y = output
    # save_for_backward refuses inference tensors (a teacher made under torch.inference_mode()); they
    # are kept by reference, which is safe: they cannot be modified outside inference mode.
    ctx.inference_inputs = tuple(t if t.is_inference() else None for t in (z, y))
    ctx.save_for_backward(*(None if t.is_inference() else t for t in (z, y)), norms_z, norms_y)


def _manifold_backward(ctx, grad_loss, grad_norms_z, grad_norms_y):
    saved_z, saved_y, norms_z, norms_y = ctx.saved_tensors
    z, y = (kept if saved is None else saved for saved, kept in zip((saved_z, saved_y), ctx.inference_inputs))
    need_dz, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dz or need_dy):
        return None, None
    dz, dy = manifold_triton_backward(grad_loss, z, y, norms_z, norms_y, need_dz, need_dy)
    return (dz if need_dz else None), (dy if need_dy else None)


def _second_order_backward(ctx, grad_dz, grad_dy):
    raise RuntimeError(saved_gradients.second_order_message("triton"))


manifold_triton_forward.register_autograd(_manifold_backward, setup_context=_manifold_setup_context)
# The gradient kernel forms the first derivative only: a backward through it (create_graph=True, then
# hessian, hvp or a gradient penalty) is an error naming the way out, not torch's generic one.
manifold_triton_backward.register_autograd(_second_order_backward, setup_context=lambda ctx, inputs, output: None)


def manifold(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Backend entry (see `repa_kernels.backends`): the scalar loss (float32; float64 for float64).

    z: (B, T, N, Dz), y: (B, T, N, Dy), one dtype and device, validated.
    """
    utils.check_triton_device(z)
    saved_gradients.check_derivative_mode("triton", z, y)
    loss, _, _ = manifold_triton_forward(z, y)
    return loss


def cuda_compile_reports(dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int, int] = (2, 1, 3600),
                         dim_z: int = 768, dim_y: int = 768, arch: int = 90) -> list[utils.CompiledKernelReport]:
    """Compile the kernels as a launch on contiguous (B, T, N, D) inputs would, for sm_`arch`, without
    a GPU: inverse norms, forward, finalize, and the backward to z and to y."""
    batch, frames, tokens = shape
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    gram = {torch.float32: "fp32", torch.float64: "fp64"}[_gram_dtype(dtype)]
    loss = "fp64" if dtype == torch.float64 else "fp32"
    switches = dict(_gram_switches(dtype), UPCAST=False)
    strides = dict(stride_zb=frames * tokens * dim_z, stride_zt=tokens * dim_z, stride_zn=dim_z, stride_zd=1,
                   stride_yb=frames * tokens * dim_y, stride_yt=tokens * dim_y, stride_yn=dim_y, stride_yd=1)
    sizes = dict(num_frames=frames, num_tokens=tokens, dim_z=dim_z, dim_y=dim_y, num_slices=batch * frames,
                 norms_stride=batch * frames * tokens)
    pointers = dict(z_ptr=element, y_ptr=element, norms_z_ptr=gram, norms_y_ptr=gram)
    rows = utils.token_blocks(tokens, dim_z, dtype)
    reports = [utils.compile_for_cuda(
        _inverse_norms_kernel, dict(x_ptr=element, norms_ptr=gram),
        dict(num_rows=batch * frames * tokens, num_frames=frames, num_tokens=tokens, dim=dim_z,
             stride_b=strides["stride_zb"], stride_t=strides["stride_zt"], stride_n=dim_z, stride_d=1),
        dict(ACC=switches["ACC"], BLOCK_N=rows.block_n, BLOCK_D=rows.block_d), rows.num_warps, 3, arch)]
    forward = utils.manifold_blocks(tokens, dim_z, dim_y, dtype, backward=False)
    blocks = triton.cdiv(tokens, forward.block_m)
    reports.append(utils.compile_for_cuda(
        _manifold_forward_kernel, dict(pointers, partial_ptr=gram), dict(sizes, num_blocks=blocks, **strides),
        dict(switches, BLOCK_M=forward.block_m, BLOCK_K=forward.block_k), forward.num_warps, forward.num_stages, arch))
    reports.append(utils.compile_for_cuda(
        _manifold_finalize_kernel, dict(partial_ptr=gram, loss_ptr=loss),
        dict(num_partials=batch * frames * blocks * blocks, num_tokens=tokens, num_slices=batch * frames),
        dict(ACC=switches["ACC"], BLOCK=_FINALIZE_BLOCK), 4, 3, arch))
    backward = utils.manifold_blocks(tokens, dim_z, dim_y, dtype, backward=True)
    for target_z in (True, False):
        integers = dict(sizes, num_row_blocks=triton.cdiv(tokens, backward.block_m),
                        num_col_blocks=triton.cdiv(tokens, backward.block_n),
                        num_chunks=triton.cdiv(dim_z if target_z else dim_y, backward.block_out), **strides)
        reports.append(utils.compile_for_cuda(
            _manifold_backward_kernel, dict(pointers, grad_ptr=loss, out_ptr=element), integers,
            dict(switches, TARGET_Z=target_z, X_DTYPE=utils.triton_dtype(dtype), INTERPRET=False,
                 BLOCK_M=backward.block_m, BLOCK_N=backward.block_n, BLOCK_K=backward.block_k,
                 BLOCK_OUT=backward.block_out),
            backward.num_warps, backward.num_stages, arch))
    return reports
