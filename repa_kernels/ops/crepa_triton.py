"""Fused Triton kernel of the CREPA / REPA cosine term (docs/contract.md §2.1), forward and gradient in one pass.

Shapes: z (student) and y (teacher) are (B, T, N, D), float16 / bfloat16 / float32 / float64, any
strides (the kernel takes strides; nothing is copied). Math runs in float32 (float64 for float64
inputs); the loss and metrics come back in that dtype, gradients in the input dtype.

Design (memory-bound: the goal is to move each tensor once):
- Grid: one program per (b, f, block of BLOCK_N tokens); frames vary fastest, so the programs that
  run together share teacher frames in L2.
- Pass 1 over channel chunks accumulates per token ||z_f||², ||y_f||², z_f·y_f and, for every
  neighbour frame g = f ± k (k = the clamped offsets), ||y_g||² and z_f·y_g (plus ||z_g||² and y_f·z_g
  when y needs a gradient). The neighbour values sit in (BLOCK_N, NUM_SLOTS) register tiles, one
  column per neighbour. No normalised copy and no per-offset tensor exists anywhere.
- Huge and tiny magnitudes (docs/contract.md §2: norms must not overflow): every token enters those sums as
  x·2^-e, with 2^e a running power-of-two bound of its max|x| over the chunks read so far (sums are
  rescaled exactly when a chunk raises e), so |x| up to the float32 maximum neither overflows nor
  underflows. Cosines are scale-free and scaling by a power of two is exact: for ordinary
  magnitudes the results are bitwise those of unscaled math (checked against the unscaled kernel
  under the interpreter). Cost: a max and a multiply per element, free in a memory-bound kernel.
- The program then forms its share of Σ_n Σ_g W[f,g] ẑ·ŷ_g / N and of the self similarity and writes
  them to a per-program partial (no atomics); a one-program kernel sums the partials in a fixed order.
- The loss is linear in ŷ, so ∂loss/∂ẑ_f = -ỹ_f / (N·B') with ỹ_f = Σ_g W[f,g] ŷ_g needs only what
  pass 1 produced. When z (or y) requires grad, pass 2 re-reads the program's tiles (L2-resident) and
  writes dz = (dẑ − ẑ(ẑ·dẑ)) / ||z|| (and dy, gathered per teacher frame), for an upstream gradient of
  1. The backward only scales the saved gradient by the upstream gradient, in place in eager mode
  (`saved_gradients`). HBM traffic: forward+gradient reads Z and Y once and writes dZ (three tensor
  passes); the scale in the backward reads and writes dZ once more, and allocates nothing.
- Bitwise reproducible: every output element is written by exactly one program and every sum has a
  fixed order.

Zero tokens (||x|| < 1e-12) are normalised to 0 and get a zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import CrepaOptions, compute_dtype
from . import saved_gradients, utils
from .utils import inverse_norm, lowest_exponent, power_of_two, running_exponent, store_cast

_FINALIZE_BLOCK = 1024


@triton.jit
def _accumulate_neighbour(other, own, column, nb_sq, nb_dot, nb_exp, ACC: tl.constexpr):
    """Add one channel chunk of a neighbour frame's rows `other` to the neighbour slot `column`: its
    squared norm and its dot with the program's own rows `own`, both kept at the scale 2^-nb_exp of
    the running per-token exponent (rescaled exactly when this chunk raises it)."""
    old = tl.sum(tl.where(column, nb_exp, 0), 1)
    new = running_exponent(old, other, ACC)
    other = other * power_of_two(-new, ACC)[:, None]
    nb_sq = tl.where(column, nb_sq * power_of_two(2 * (old - new), ACC)[:, None]
                     + tl.sum(other * other, 1)[:, None], nb_sq)
    nb_dot = tl.where(column, nb_dot * power_of_two(old - new, ACC)[:, None]
                      + tl.sum(own * other, 1)[:, None], nb_dot)
    nb_exp = tl.where(column, new[:, None], nb_exp)
    return nb_sq, nb_dot, nb_exp


@triton.jit
def _frame_scale(frame, num_frames, offset_start, num_offsets, inv_tau,
                 NORMALIZE_NEIGHBOUR_SUM: tl.constexpr, ACC: tl.constexpr):
    """c(frame) of docs/contract.md §2.1 for a scalar or a tensor of (int64) frame indices."""
    total = (frame * 0).to(ACC) + 1.0
    if NORMALIZE_NEIGHBOUR_SUM:
        for i in range(0, num_offsets):
            offset = offset_start + i
            weight = tl.exp(-offset.to(ACC) * inv_tau)
            total += weight * ((frame - offset >= 0).to(ACC) + (frame + offset < num_frames).to(ACC))
    return 1.0 / total


@triton.jit
def _neighbour_frame(frame, slot, offset_start):
    """Neighbour slot s is frame f − k (even s) or f + k (odd s) with k = offset_start + s // 2."""
    offset = offset_start + slot // 2
    return tl.where(slot % 2 == 0, frame - offset, frame + offset)


@triton.jit
def _neighbour_slot(frame, slot, offset_start, num_frames, dim, token_mask, chans, slots):
    """Neighbour `slot` of `frame`, for both passes: its frame clamped into the clip, the load mask of
    channels `chans` (out-of-clip neighbours load nothing: a zero channel range, since the interpreter
    rejects masks built from a scalar condition) and the slot's column selector (1, NUM_SLOTS)."""
    other = _neighbour_frame(frame, slot, offset_start)
    channel_limit = tl.where((other >= 0) & (other < num_frames), dim, 0)
    mask_other = token_mask[:, None] & (chans < channel_limit)[None, :]
    other = tl.minimum(tl.maximum(other, 0), num_frames - 1)
    return other, mask_other, slots[None, :] == slot


@triton.jit
def _crepa_fused_kernel(
    z_ptr, y_ptr, dz_ptr, dy_ptr, partial_ptr,
    num_frames, num_tokens, dim, num_token_blocks, num_programs, loss_divisor,
    stride_zb, stride_zt, stride_zn, stride_zd,
    stride_yb, stride_yt, stride_yn, stride_yd,
    offset_start, num_offsets, inv_tau,
    NUM_SLOTS: tl.constexpr, NORMALIZE_NEIGHBOUR_SUM: tl.constexpr,
    NEED_DZ: tl.constexpr, NEED_DY: tl.constexpr,
    ACC: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    frame = pid % num_frames
    token_block = (pid // num_frames) % num_token_blocks
    batch = pid // (num_frames * num_token_blocks)

    tokens = token_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    token_mask = tokens < num_tokens
    slots = tl.arange(0, NUM_SLOTS)
    num_neighbours = 2 * num_offsets
    z_rows = z_ptr + batch * stride_zb + tokens * stride_zn
    y_rows = y_ptr + batch * stride_yb + tokens * stride_yn

    # Pass 1: squared norms and dot products per token, own frame and every neighbour frame, of the
    # tokens scaled by 2^-e (e: a running power-of-two bound of the token's max|x|, see utils), so
    # that |x| ~ 1e30 does not overflow; when a chunk raises e, the sums so far are rescaled exactly.
    lowest = lowest_exponent(ACC)
    exp_z = tl.zeros([BLOCK_N], tl.int32) + lowest
    exp_y = tl.zeros([BLOCK_N], tl.int32) + lowest
    zz = tl.zeros([BLOCK_N], ACC)
    yy = tl.zeros([BLOCK_N], ACC)
    zy = tl.zeros([BLOCK_N], ACC)
    nb_exp_y = tl.zeros([BLOCK_N, NUM_SLOTS], tl.int32) + lowest
    nb_exp_z = tl.zeros([BLOCK_N, NUM_SLOTS], tl.int32) + lowest  # (dy only)
    nb_yy = tl.zeros([BLOCK_N, NUM_SLOTS], ACC)  # ||y_g||²
    nb_zy = tl.zeros([BLOCK_N, NUM_SLOTS], ACC)  # z_f · y_g
    nb_zz = tl.zeros([BLOCK_N, NUM_SLOTS], ACC)  # ||z_g||²  (dy only)
    nb_yz = tl.zeros([BLOCK_N, NUM_SLOTS], ACC)  # y_f · z_g  (dy only)
    for d0 in range(0, dim, BLOCK_D):
        chans = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = token_mask[:, None] & (chans < dim)[None, :]
        z_tile = tl.load(z_rows[:, None] + frame * stride_zt + chans[None, :] * stride_zd,
                         mask=mask, other=0.0).to(ACC)
        y_tile = tl.load(y_rows[:, None] + frame * stride_yt + chans[None, :] * stride_yd,
                         mask=mask, other=0.0).to(ACC)
        new_z = running_exponent(exp_z, z_tile, ACC)
        new_y = running_exponent(exp_y, y_tile, ACC)
        z_tile = z_tile * power_of_two(-new_z, ACC)[:, None]
        y_tile = y_tile * power_of_two(-new_y, ACC)[:, None]
        zz = zz * power_of_two(2 * (exp_z - new_z), ACC) + tl.sum(z_tile * z_tile, 1)
        yy = yy * power_of_two(2 * (exp_y - new_y), ACC) + tl.sum(y_tile * y_tile, 1)
        zy = zy * power_of_two(exp_z - new_z + exp_y - new_y, ACC) + tl.sum(z_tile * y_tile, 1)
        nb_zy = nb_zy * power_of_two(exp_z - new_z, ACC)[:, None]
        if NEED_DY:
            nb_yz = nb_yz * power_of_two(exp_y - new_y, ACC)[:, None]
        exp_z = new_z
        exp_y = new_y
        for slot in range(0, num_neighbours):
            other, mask_other, column = _neighbour_slot(frame, slot, offset_start, num_frames, dim, token_mask,
                                                        chans, slots)
            y_other = tl.load(y_rows[:, None] + other * stride_yt + chans[None, :] * stride_yd,
                              mask=mask_other, other=0.0).to(ACC)
            nb_yy, nb_zy, nb_exp_y = _accumulate_neighbour(y_other, z_tile, column, nb_yy, nb_zy, nb_exp_y, ACC)
            if NEED_DY:
                z_other = tl.load(z_rows[:, None] + other * stride_zt + chans[None, :] * stride_zd,
                                  mask=mask_other, other=0.0).to(ACC)
                nb_zz, nb_yz, nb_exp_z = _accumulate_neighbour(z_other, y_tile, column, nb_zz, nb_yz, nb_exp_z,
                                                               ACC)

    # Frame weights: W[f, g] = c(f)·exp(-|g − f|/tau) for the in-clip neighbours, c(f) on the diagonal.
    slot_frames = _neighbour_frame(frame, slots.to(tl.int64), offset_start)
    slot_offsets = (offset_start + slots // 2).to(ACC)
    slot_valid = (slots < num_neighbours) & (slot_frames >= 0) & (slot_frames < num_frames)
    slot_weight = tl.where(slot_valid, tl.exp(-slot_offsets * inv_tau), 0.0)
    scale_f = _frame_scale(frame, num_frames, offset_start, num_offsets, inv_tau, NORMALIZE_NEIGHBOUR_SUM, ACC)

    # Inverse norms of the scaled tokens: cosines are scale-free, so they need no 2^e.
    inv_z = inverse_norm(zz, exp_z, ACC)
    inv_y = inverse_norm(yy, exp_y, ACC)
    inv_y_nb = inverse_norm(nb_yy, nb_exp_y, ACC)
    sim_self = zy * inv_z * inv_y
    sim_nb = nb_zy * inv_z[:, None] * inv_y_nb
    weighted = scale_f * (sim_self + tl.sum(sim_nb * slot_weight[None, :], 1))  # Σ_g W[f,g] ẑ_f·ŷ_g
    tl.store(partial_ptr + pid, tl.sum(weighted, 0) / num_tokens)
    tl.store(partial_ptr + num_programs + pid, tl.sum(sim_self, 0) / num_tokens)

    if NEED_DZ or NEED_DY:
        grad_scale = (tl.zeros([], ACC) - 1.0) / num_tokens / loss_divisor  # -1 / (N·B')
        out_rows = ((batch * num_frames + frame) * num_tokens + tokens) * dim
    # The gradient coefficients below multiply the scaled tiles x·2^-e (values below 4); the
    # remaining 2^-e of 1/||x|| = inv·2^-e sits in dz_out / dy_out, the last factor, so a product
    # underflows only where the gradient itself does.
    if NEED_DZ:
        # d loss / d ẑ_f = grad_scale·ỹ_f; the projection ẑ(ẑ·dẑ) uses ẑ_f·ỹ_f = `weighted`.
        dz_self = scale_f * inv_y                              # coefficient of scaled y_f
        dz_nb = scale_f * slot_weight[None, :] * inv_y_nb      # coefficients of scaled y_g
        dz_own = weighted * inv_z                              # coefficient of scaled z_f
        dz_out = grad_scale * inv_z * power_of_two(-exp_z, ACC)
    if NEED_DY:
        # d loss / d ŷ_f = grad_scale·Σ_h W[h,f] ẑ_h with W[h,f] = c(h)·w(h,f): gathered, no atomics.
        transposed_weight = slot_weight * _frame_scale(slot_frames, num_frames, offset_start, num_offsets,
                                                       inv_tau, NORMALIZE_NEIGHBOUR_SUM, ACC)
        inv_z_nb = inverse_norm(nb_zz, nb_exp_z, ACC)
        sim_t = nb_yz * inv_y[:, None] * inv_z_nb
        weighted_t = scale_f * sim_self + tl.sum(sim_t * transposed_weight[None, :], 1)
        dy_self = scale_f * inv_z                              # coefficient of scaled z_f
        dy_nb = transposed_weight[None, :] * inv_z_nb          # coefficients of scaled z_h
        dy_own = weighted_t * inv_y                            # coefficient of scaled y_f
        dy_out = grad_scale * inv_y * power_of_two(-exp_y, ACC)

    if NEED_DZ or NEED_DY:
        # Pass 2: the tiles of pass 1 again (from L2), scaled by the final 2^-e, combined into the
        # gradients.
        z_scale = power_of_two(-exp_z, ACC)[:, None]
        y_scale = power_of_two(-exp_y, ACC)[:, None]
        for d0 in range(0, dim, BLOCK_D):
            chans = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = token_mask[:, None] & (chans < dim)[None, :]
            z_tile = tl.load(z_rows[:, None] + frame * stride_zt + chans[None, :] * stride_zd,
                             mask=mask, other=0.0).to(ACC) * z_scale
            y_tile = tl.load(y_rows[:, None] + frame * stride_yt + chans[None, :] * stride_yd,
                             mask=mask, other=0.0).to(ACC) * y_scale
            if NEED_DZ:
                dz_acc = dz_self[:, None] * y_tile - dz_own[:, None] * z_tile
            if NEED_DY:
                dy_acc = dy_self[:, None] * z_tile - dy_own[:, None] * y_tile
            for slot in range(0, num_neighbours):
                other, mask_other, column = _neighbour_slot(frame, slot, offset_start, num_frames, dim,
                                                            token_mask, chans, slots)
                if NEED_DZ:
                    y_other = tl.load(y_rows[:, None] + other * stride_yt + chans[None, :] * stride_yd,
                                      mask=mask_other, other=0.0).to(ACC)
                    y_other = y_other * power_of_two(-tl.sum(tl.where(column, nb_exp_y, 0), 1), ACC)[:, None]
                    dz_acc += tl.sum(tl.where(column, dz_nb, 0.0), 1)[:, None] * y_other
                if NEED_DY:
                    z_other = tl.load(z_rows[:, None] + other * stride_zt + chans[None, :] * stride_zd,
                                      mask=mask_other, other=0.0).to(ACC)
                    z_other = z_other * power_of_two(-tl.sum(tl.where(column, nb_exp_z, 0), 1), ACC)[:, None]
                    dy_acc += tl.sum(tl.where(column, dy_nb, 0.0), 1)[:, None] * z_other
            out_offsets = out_rows[:, None] + chans[None, :]
            if NEED_DZ:
                tl.store(dz_ptr + out_offsets, store_cast(dz_acc * dz_out[:, None], OUT_DTYPE, INTERPRET),
                         mask=mask)
            if NEED_DY:
                tl.store(dy_ptr + out_offsets, store_cast(dy_acc * dy_out[:, None], OUT_DTYPE, INTERPRET),
                         mask=mask)


@triton.jit
def _crepa_finalize_kernel(partial_ptr, num_programs, loss_ptr, alignment_ptr, similarity_ptr,
                           loss_divisor, metric_divisor, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: sums the per-program partials in a fixed order (bitwise reproducible)."""
    total = tl.zeros([BLOCK], ACC)
    self_total = tl.zeros([BLOCK], ACC)
    for start in range(0, num_programs, BLOCK):
        index = start + tl.arange(0, BLOCK)
        mask = index < num_programs
        total += tl.load(partial_ptr + index, mask=mask, other=0.0)
        self_total += tl.load(partial_ptr + num_programs + index, mask=mask, other=0.0)
    weighted_sum = tl.sum(total, 0)
    tl.store(loss_ptr, -weighted_sum / loss_divisor)
    tl.store(alignment_ptr, weighted_sum / metric_divisor)
    tl.store(similarity_ptr, tl.sum(self_total, 0) / metric_divisor)


def crepa_forward(z: torch.Tensor, y: torch.Tensor, opts: CrepaOptions, need_dz: bool, need_dy: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel: (loss, alignment_score, similarity_self, dz, dy).

    dz / dy are the gradients of the loss for an upstream gradient of 1 (input dtype, contiguous),
    or empty tensors when not requested.
    """
    batch, frames, tokens, dim = z.shape
    offsets = opts.offsets(frames)
    blocks = utils.token_blocks(tokens, dim, z.dtype)
    acc_torch = compute_dtype(z.dtype)
    token_blocks = triton.cdiv(tokens, blocks.block_n)
    num_programs = batch * frames * token_blocks
    partials = torch.empty(2 * num_programs, dtype=acc_torch, device=z.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device) if need_dz else z.new_empty((0,))
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_dy else y.new_empty((0,))
    loss, alignment, similarity = (torch.empty((), dtype=acc_torch, device=z.device) for _ in range(3))
    loss_divisor = opts.loss_divisor(batch, frames)
    with utils.device_guard(z):
        _crepa_fused_kernel[(num_programs,)](
            z, y, dz, dy, partials,
            frames, tokens, dim, token_blocks, num_programs, loss_divisor,
            *utils.strides4(z), *utils.strides4(y),
            offsets[0] if offsets else 1, len(offsets), 1.0 / opts.tau,
            NUM_SLOTS=max(2, triton.next_power_of_2(2 * len(offsets))),
            NORMALIZE_NEIGHBOUR_SUM=opts.normalize_neighbour_sum,
            NEED_DZ=need_dz, NEED_DY=need_dy,
            ACC=utils.accumulator_dtype(z.dtype), OUT_DTYPE=utils.triton_dtype(z.dtype),
            INTERPRET=utils.is_interpreter(),
            BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d, num_warps=blocks.num_warps,
        )
        _crepa_finalize_kernel[(1,)](
            partials, num_programs, loss, alignment, similarity, loss_divisor, batch * frames,
            ACC=utils.accumulator_dtype(z.dtype), BLOCK=_FINALIZE_BLOCK, num_warps=4,
        )
    return loss, alignment, similarity, dz, dy


# ---------------------------------------------------------------------------------------------------
# torch.library registration: one opaque node for torch.compile, autograd through the saved gradient
# (`saved_gradients`: scaled in place in eager mode, out of place under tracing).

@torch.library.custom_op("repa_kernels::crepa_triton_forward", mutates_args=())
def crepa_triton_forward(z: torch.Tensor, y: torch.Tensor, distance: int, tau: float, cumulative: bool,
                         normalize_by_frames: bool, normalize_neighbour_sum: bool, need_dz: bool,
                         need_dy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """(loss, alignment_score, similarity_self, dz, dy); dz/dy empty unless requested."""
    opts = CrepaOptions(distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum)
    return crepa_forward(z, y, opts, need_dz, need_dy)


saved_gradients.register("repa_kernels::crepa_triton_forward", "triton")


def crepa(z: torch.Tensor, y: torch.Tensor, opts: CrepaOptions
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry (see `repa_kernels.backends`): (loss, alignment_score, similarity_self).

    z, y: validated (B, T, N, D) tensors of one dtype and device. The metrics are detached.
    """
    utils.check_triton_device(z)
    saved_gradients.check_derivative_mode("triton", z, y)
    grad_enabled = torch.is_grad_enabled()
    need_dz = grad_enabled and z.requires_grad
    need_dy = grad_enabled and y.requires_grad
    distance = min(opts.distance, z.shape[1] - 1)  # what offsets() clamps to anyway; keeps SymInt in range
    loss, alignment, similarity = saved_gradients.run(
        crepa_triton_forward, "triton", z, y, distance, opts.tau, opts.cumulative, opts.normalize_by_frames,
        opts.normalize_neighbour_sum, need_dz, need_dy)
    return loss, alignment.detach(), similarity.detach()


def cuda_compile_reports(dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int, int, int] = (1, 21, 1560, 1536),
                         distance: int = 1, arch: int = 90) -> list[utils.CompiledKernelReport]:
    """Compile the kernels as a launch on contiguous (B, T, N, D) inputs of `shape` would, for
    sm_`arch`, without a GPU: forward only, forward + dz, forward + dz + dy, and the finalize kernel."""
    batch, frames, tokens, dim = shape
    offsets = CrepaOptions(distance).offsets(frames)
    blocks = utils.token_blocks(tokens, dim, dtype)
    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    token_blocks = triton.cdiv(tokens, blocks.block_n)
    strides = dict(stride_zb=frames * tokens * dim, stride_zt=tokens * dim, stride_zn=dim, stride_zd=1)
    integers = dict(num_frames=frames, num_tokens=tokens, dim=dim, num_token_blocks=token_blocks,
                    num_programs=batch * frames * token_blocks, loss_divisor=batch * frames,
                    offset_start=offsets[0] if offsets else 1, num_offsets=len(offsets), **strides,
                    **{name.replace("_z", "_y"): value for name, value in strides.items()})
    pointers = dict(z_ptr=element, y_ptr=element, dz_ptr=element, dy_ptr=element, partial_ptr=acc)
    reports = []
    for need_dz, need_dy in ((False, False), (True, False), (True, True)):
        constexprs = dict(NUM_SLOTS=max(2, triton.next_power_of_2(2 * len(offsets))), NORMALIZE_NEIGHBOUR_SUM=True,
                          NEED_DZ=need_dz, NEED_DY=need_dy, ACC=utils.accumulator_dtype(dtype),
                          OUT_DTYPE=utils.triton_dtype(dtype), INTERPRET=False,
                          BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d)
        reports.append(utils.compile_for_cuda(_crepa_fused_kernel, pointers, integers, constexprs,
                                              blocks.num_warps, 3, arch))
    reports.append(utils.compile_for_cuda(
        _crepa_finalize_kernel, dict(partial_ptr=acc, loss_ptr=acc, alignment_ptr=acc, similarity_ptr=acc),
        dict(num_programs=integers["num_programs"], loss_divisor=batch * frames, metric_divisor=batch * frames),
        dict(ACC=utils.accumulator_dtype(dtype), BLOCK=_FINALIZE_BLOCK), 4, 3, arch))
    return reports
