"""Numerics of every backend at the edges.

- Zero tokens (and tokens below EPS): zero gradient, no inf, also in fp16 / bf16 (docs/contract.md §2).
- Huge and tiny magnitudes in fp32 (1e30, 1e-30; norms must not square-overflow), the fp16 overflow
  range (|x| near 65504, whose squares overflow fp16), and mixtures of them inside one frame.
- bf16 / fp16 / fp32 inputs against a float64 ground truth with the tolerance rule of tests/tolerance.py
  (tests/tolerance.py), on feature distributions that stress the math: a large shared mean (cosines
  near 1, as DINOv2 features have) and a student close to the teacher (manifold near convergence).
- 64-bit offsets: tensors with more than 2^31 elements (GPU only; the same check runs small on CPU so
  the test itself is known to be right).

The float64 truth is the reference path run on float64 copies: it agrees with the independent
transcription of docs/contract.md §2 (tests/spec_math.py) to 1e-10 (tests/test_reference.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import repa_kernels as rk
from repa_kernels.options import CrepaOptions

from tolerance import assert_within_reference_error
from backend_params import impl_param

CPU = torch.device("cpu")
HALF_DTYPES = [torch.float16, torch.bfloat16]


IMPLS = [impl_param(name) for name in ("reference", "cpp", "triton")]
KERNELS = [impl_param(name) for name in ("cpp", "triton")]

# Found by this file and since fixed in both kernels: squaring fp32 values in fp32 overflowed at
# |x| ~ 1e30; norms must be taken as the reference does, ||x|| = max|x| * ||x / max|x|||.


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def losses_and_grads(z, y, impl, opts: CrepaOptions, manifold_weight=1.0):
    """crepa loss, alignment score, manifold loss and d(crepa + w * manifold)/d(z, y), for fresh leaves."""
    z = z.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    crepa = rk.crepa_loss_with_options(z, y, opts, impl=impl)
    manifold = rk.manifold_loss(z, y, impl=impl)
    dz, dy = torch.autograd.grad(crepa.loss + manifold_weight * manifold, (z, y))
    return dict(loss=crepa.loss.detach(), alignment=crepa.alignment_score, manifold=manifold.detach(), dz=dz, dy=dy)


def check_against_truth(z, y, impl, opts=CrepaOptions(distance=1), what=""):
    """The tolerance rule (tests/tolerance.py) on losses, the metric, and both gradients."""
    dtype = z.dtype
    kernel = losses_and_grads(z, y, impl, opts)
    reference = losses_and_grads(z, y, "reference", opts)
    truth = losses_and_grads(z.double(), y.double(), "reference", opts)
    for key in ("loss", "alignment", "manifold"):
        assert_within_reference_error(kernel[key], reference[key], truth[key], dtype, f"{what} {impl} {key}")
    for key in ("dz", "dy"):
        assert kernel[key].dtype == dtype, f"{key} dtype {kernel[key].dtype} != input dtype {dtype}"
        assert_within_reference_error(kernel[key], reference[key], truth[key], dtype, f"{what} {impl} {key}", relative=True)
    return kernel


# ---- zero tokens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_all_zero_inputs_give_zero_losses_and_gradients(impl, dtype):
    z = torch.zeros(2, 3, 4, 8, dtype=dtype, requires_grad=True)
    y = torch.zeros(2, 3, 4, 8, dtype=dtype, requires_grad=True)
    crepa = rk.crepa_loss(z, y, distance=2, cumulative=True, impl=impl)
    urepa = rk.urepa_loss(z, y, impl=impl)
    for value in (crepa.loss, crepa.alignment_score, crepa.similarity_self, urepa.loss, urepa.manifold):
        assert value.item() == 0.0
    (crepa.loss + urepa.loss).backward()
    assert torch.count_nonzero(z.grad) == 0 and torch.count_nonzero(y.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_zero_student_against_a_real_teacher(impl, dtype):
    """ẑ = 0: cosine 0, manifold = mean(G_y²) (finite), and no gradient to z at all."""
    z = torch.zeros(2, 2, 5, 8, dtype=dtype, requires_grad=True)
    y = randn(2, 2, 5, 8, seed=1, dtype=dtype).requires_grad_()
    crepa = rk.crepa_loss(z, y, distance=1, impl=impl)
    manifold = rk.manifold_loss(z, y, impl=impl)
    assert crepa.loss.item() == 0.0
    assert torch.allclose(manifold, rk.manifold_loss(z.detach(), y.detach(), impl="reference"), rtol=1e-5)
    (crepa.loss + manifold).backward()
    assert torch.count_nonzero(z.grad) == 0
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_scattered_zero_and_sub_eps_tokens(impl, dtype):
    z = randn(2, 3, 6, 16, seed=2, dtype=torch.float32)
    y = randn(2, 3, 6, 16, seed=3, dtype=torch.float32)
    zero_z = [(0, 0, 0), (1, 2, 5), (0, 1, 3)]
    zero_y = [(1, 0, 0), (0, 2, 1)]
    for index in zero_z:
        z[index] = 0
    for index in zero_y:
        y[index] = 0
    if dtype == torch.float32:
        z[1, 1, 1] = 1e-14  # ||z|| = 4e-14 < EPS: no direction, zero gradient
        zero_z.append((1, 1, 1))
    z, y = z.to(dtype), y.to(dtype)
    got = check_against_truth(z, y, impl, CrepaOptions(distance=1), "zero tokens")
    for index in zero_z:
        assert torch.count_nonzero(got["dz"][index]) == 0, index
    for index in zero_y:
        assert torch.count_nonzero(got["dy"][index]) == 0, index


# ---- huge and tiny magnitudes --------------------------------------------------------------------

MAGNITUDES = [(1e30, 1e30), (1e30, 1.0), (1e-30, 1e-30), (1e-30, 1.0), (1e30, 1e-30), (1e-6, 1e-6)]


def magnitude_cases():
    for z_scale, y_scale in MAGNITUDES:
        for p in KERNELS:
            impl = p.values[0]
            yield pytest.param(impl, z_scale, y_scale, id=f"z{z_scale:g}_y{y_scale:g}-{impl}", marks=p.marks)


@pytest.mark.parametrize("impl, z_scale, y_scale", list(magnitude_cases()))
def test_fp32_huge_and_tiny_magnitudes(impl, z_scale, y_scale):
    """|x| = 1e30: squares overflow fp32, the norm must not. |x| = 1e-30: ||x|| < EPS, a zero token."""
    z = (randn(2, 3, 5, 12, seed=4) * z_scale).float()
    y = (randn(2, 3, 5, 12, seed=5) * y_scale).float()
    got = check_against_truth(z, y, impl, CrepaOptions(distance=1, normalize_neighbour_sum=True), "magnitudes")
    if z_scale == 1e-30 or y_scale == 1e-30:
        assert got["loss"].item() == 0.0  # one side carries no direction: every cosine is 0
    for key in ("dz", "dy"):
        assert torch.isfinite(got[key]).all()


@pytest.mark.parametrize("impl", KERNELS)
def test_fp32_mixed_magnitudes_in_one_frame(impl):
    """Per-token scaling: tokens of 1e30, 1, 1e-3 and 1e-30 side by side, and one huge entry in a token."""
    z = randn(2, 2, 8, 12, seed=6)
    y = randn(2, 2, 8, 12, seed=7)
    scales = torch.tensor([1e30, 1.0, 1e-3, 1e-30, 1e20, 1e-20, 3e37, 1e-37], dtype=torch.float64)
    z = z * scales[:, None]
    y = y * scales.flip(0)[:, None]
    z[0, 0, 1, 3] = 1e35  # one dominant channel
    check_against_truth(z.float(), y.float(), impl, CrepaOptions(distance=1, cumulative=True), "mixed magnitudes")


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("scale", [6e4, 1e-3], ids=["fp16_overflow_range", "fp16_tiny"])
def test_fp16_overflow_range(impl, scale):
    """fp16 entries near 65504: every square and sum overflows fp16, so math must run in fp32."""
    z = (randn(2, 2, 5, 32, seed=8).clamp(-1, 1) * scale).half()
    y = (randn(2, 2, 5, 32, seed=9).clamp(-1, 1) * scale).half()
    assert torch.isfinite(z).all() and (z.float().square().sum(-1) > 65504).all() == (scale > 1)
    got = check_against_truth(z, y, impl, CrepaOptions(distance=1), f"fp16 |x|~{scale:g}")
    assert torch.isfinite(got["dz"]).all() and torch.isfinite(got["dy"]).all()


@pytest.mark.parametrize("impl", KERNELS)
def test_bf16_huge_magnitudes(impl):
    z = (randn(1, 3, 5, 16, seed=10) * 1e30).bfloat16()
    y = (randn(1, 3, 5, 16, seed=11) * 1e30).bfloat16()
    check_against_truth(z, y, impl, CrepaOptions(distance=1), "bf16 1e30")


# ---- low precision against the float64 truth on realistic feature distributions ----------------------

def shared_mean_features(shape, seed):
    """Features dominated by one shared direction (cosines near 1), as real encoder features are."""
    mean = randn(shape[-1], seed=100)
    return 4.0 * mean + 0.5 * randn(*shape, seed=seed)


DISTRIBUTIONS = ["shared_mean", "near_convergence", "odd_shape_random"]


def features(kind):
    if kind == "shared_mean":
        return shared_mean_features((2, 4, 9, 24), 12), shared_mean_features((2, 4, 9, 24), 13)
    if kind == "near_convergence":
        y = randn(2, 3, 11, 20, seed=14)
        return y + 1e-2 * randn(2, 3, 11, 20, seed=15), y
    return randn(1, 5, 37, 67, seed=16), randn(1, 5, 37, 67, seed=17)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_low_precision_against_float64_truth(impl, dtype, kind):
    z, y = features(kind)
    opts = CrepaOptions(distance=2, tau=0.7, cumulative=True, normalize_neighbour_sum=(kind == "shared_mean"))
    check_against_truth(z.to(dtype), y.to(dtype), impl, opts, kind)


@pytest.mark.parametrize("impl", KERNELS)
def test_manifold_near_convergence_keeps_relative_accuracy(impl):
    """Z ≈ Y: the manifold loss is ~1e-7 and the D x D identity would cancel catastrophically (docs/contract.md §2.2).

    The loss's *relative* error must stay within the fp32 reference's relative error + 1e-6 of the
    float64 truth (an absolute 1e-6 would accept any answer at this scale), for N > D where the identity
    is the cheaper form.
    """
    y = randn(2, 1, 96, 16, seed=18)
    z = y + 3e-4 * randn(2, 1, 96, 16, seed=19)
    truth = rk.manifold_loss(z, y, impl="reference")
    assert 1e-9 < truth.item() < 1e-5
    kernel = rk.manifold_loss(z.float(), y.float(), impl=impl)
    reference = rk.manifold_loss(z.float(), y.float(), impl="reference")
    assert_within_reference_error(kernel, reference, truth, torch.float32, f"{impl} manifold near convergence", relative=True)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=["fp16", "bf16", "fp32", "fp64"])
def test_result_and_gradient_dtypes(impl, dtype):
    z = randn(1, 2, 3, 4, seed=20, dtype=dtype).requires_grad_()
    y = randn(1, 2, 3, 4, seed=21, dtype=dtype).requires_grad_()
    crepa = rk.crepa_loss(z, y, impl=impl)
    urepa = rk.urepa_loss(z, y, impl=impl)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for value in (crepa.loss, crepa.alignment_score, crepa.similarity_self, urepa.manifold, urepa.similarity):
        assert value.dtype == want and value.dim() == 0
    assert not crepa.alignment_score.requires_grad and not crepa.similarity_self.requires_grad
    (crepa.loss + urepa.loss).backward()
    assert z.grad.dtype == dtype and y.grad.dtype == dtype


# ---- torch.autocast: every backend still accumulates in float32 -------------------------------------

def losses_under_autocast(z, y, impl, device_type, dtype):
    """crepa, urepa (cosine + manifold) and d(sum)/dz of float32 inputs, inside torch.autocast."""
    z = z.detach().clone().requires_grad_()
    with torch.autocast(device_type, dtype=dtype):
        crepa = rk.crepa_loss(z, y, distance=2, cumulative=True, impl=impl)
        urepa = rk.urepa_loss(z, y, impl=impl)
        losses = [crepa.loss, crepa.alignment_score, urepa.alignment, urepa.manifold]
        dz, = torch.autograd.grad(crepa.loss + urepa.loss, z)
    return losses, dz


def check_autocast_changes_nothing(device, impl, dtype):
    """Autocast would run the reference's Gram matmuls in bf16/fp16 (manifold loss 8% off, its gradient
    30%); every op of every backend keeps float32 accumulation, so the results equal those outside it."""
    g = torch.Generator().manual_seed(40)
    z = torch.randn(2, 3, 16, 32, generator=g).to(device)
    y = (z + 0.1 * torch.randn(2, 3, 16, 32, generator=g).to(device)).requires_grad_()  # near convergence
    inside, inside_dz = losses_under_autocast(z, y, impl, device.type, dtype)
    with torch.autocast(device.type, enabled=False):
        outside, outside_dz = losses_under_autocast(z, y, impl, device.type, dtype)
    for name, a, b in zip(("crepa", "alignment_score", "urepa alignment", "manifold"), inside, outside):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6, atol=1e-9), (name, a.item(), b.item())
    assert inside_dz.dtype == torch.float32
    assert torch.allclose(inside_dz, outside_dz, rtol=1e-5, atol=1e-9), (inside_dz - outside_dz).abs().max()


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_autocast_keeps_float32_accumulation(impl):
    check_autocast_changes_nothing(CPU, impl, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_keeps_float32_accumulation(impl, dtype):
    check_autocast_changes_nothing(torch.device("cuda"), impl, dtype)


# ---- derivatives the kernels do not form: an error naming the way out, never a silent zero ------------

LOSSES = {
    "crepa": lambda z, y, impl: rk.crepa_loss(z, y, distance=1, impl=impl).loss,
    "manifold": lambda z, y, impl: rk.manifold_loss(z, y, impl=impl),
}


def way_out(impl):
    return rf"impl='{impl}'.*impl='reference'"


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("impl", KERNELS)
def test_second_order_derivatives_raise_naming_the_backend(impl, loss):
    """create_graph=True still gives the first derivative; a backward through it (hvp, hessian, a
    gradient penalty) raises, where the gradient saved by the kernels would make it silently zero."""
    fn = LOSSES[loss]
    z, y = randn(1, 3, 4, 6, seed=30), randn(1, 3, 4, 6, seed=31)
    z_grad = z.clone().requires_grad_()
    first, = torch.autograd.grad(fn(z_grad, y, impl), z_grad, create_graph=True)
    plain, = torch.autograd.grad(fn(z_grad, y, impl), z_grad)
    assert torch.equal(first.detach(), plain)
    with pytest.raises(RuntimeError, match="second-order derivatives through " + way_out(impl)):
        first.square().sum().backward()  # a gradient penalty
    with pytest.raises(RuntimeError, match="second-order derivatives through " + way_out(impl)):
        torch.autograd.functional.hvp(lambda z: fn(z, y, impl), z, torch.ones_like(z))
    reference = torch.autograd.functional.hvp(lambda z: fn(z, y, "reference"), z, torch.ones_like(z))[1]
    assert reference.abs().max() > 1e-3  # what the silent zero replaced


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("impl", KERNELS)
def test_forward_mode_and_torch_func_raise_naming_the_backend(impl, loss):
    fn = LOSSES[loss]
    z, y = randn(1, 3, 4, 6, seed=32), randn(1, 3, 4, 6, seed=33)
    tangent = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="torch.func transforms .*" + way_out(impl)):
        torch.func.jvp(lambda z: fn(z, y, impl), (z,), (tangent,))
    with pytest.raises(RuntimeError, match="torch.func transforms .*" + way_out(impl)):
        torch.func.grad(lambda z: fn(z, y, impl))(z)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(z, tangent)
        with pytest.raises(RuntimeError, match="forward-mode derivatives .*" + way_out(impl)):
            fn(dual, y, impl)
    # The reference handles all of them: the way out works.
    _, directional = torch.func.jvp(lambda z: fn(z, y, "reference"), (z,), (tangent,))
    gradient = torch.func.grad(lambda z: fn(z, y, "reference"))(z)
    assert torch.allclose(directional, (gradient * tangent).sum(), rtol=1e-4, atol=1e-7)


# ---- 64-bit offsets ----------------------------------------------------------------------------------

def check_far_tokens(device, impl, tokens, width, flip_from):
    """REPA/CREPA and manifold on tensors whose tail elements lie past `flip_from` tokens of frame 1.

    Z is one unit direction u everywhere; Y equals Z except frame 1 from token `flip_from` on, where it
    is -u. With a = (2·flip_from − N)/N the exact values are (distance 1, tau 1):
    total[0] = 1 + e⁻¹·a, total[1] = a + e⁻¹, loss = −(total[0] + total[1]) / 2. An index that wraps
    at 2^31 reads the wrong half and misses the flipped tokens.
    """
    u = torch.ones(width, device=device, dtype=torch.float16) / math.sqrt(width)
    z = u.expand(1, 2, tokens, width).contiguous()
    y = z.clone()
    y[0, 1, flip_from:] = -u
    a = (2 * flip_from - tokens) / tokens
    want = -((1 + math.exp(-1) * a) + (a + math.exp(-1))) / 2
    got = rk.crepa_loss(z, y, distance=1, impl=impl)
    assert abs(got.loss.item() - want) < 1e-4, (got.loss.item(), want)
    del y
    # Manifold: many (sample, frame) slices of a few tokens; only the last slice differs (G_z − G_y
    # has every entry ±2 where exactly one of two tokens is flipped in a slice of 4: 8 of 16 entries).
    slices = z.numel() // (4 * width)
    zm = z.reshape(slices, 1, 4, width)
    ym = zm.clone()
    ym[-1, 0, 2:] = -u
    manifold = rk.manifold_loss(zm, ym, impl=impl)
    want_manifold = 8 * 4.0 / (slices * 16)
    assert abs(manifold.item() - want_manifold) <= 1e-3 * want_manifold, (manifold.item(), want_manifold)


@pytest.mark.parametrize("impl", IMPLS)
def test_far_token_check_is_right_on_a_small_tensor(impl):
    check_far_tokens(CPU, impl, tokens=64, width=32, flip_from=40)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with > 12 GB free: tensors of > 2^31 elements")
@pytest.mark.parametrize("impl", ["triton"])
def test_more_than_2_31_elements(impl):
    width = 1024
    tokens = (1 << 20) + (1 << 16)  # 2 frames x N x D = 2.28e9 elements > 2^31
    flip_from = (1 << 20) - 1024  # frame 1 starts at element 1.07e9; the flipped tail reaches past 2^31
    assert 2 * tokens * width > 2**31
    check_far_tokens(torch.device("cuda"), impl, tokens, width, flip_from)
