"""C++ CPU kernel of the manifold (Gram difference) term: both forms (tiled Gram tiles and
the fp64 D x D identity) against the reference and a float64 ground truth (tests/tolerance.py)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import repa_kernels as rk
from repa_kernels import reference
from repa_kernels.ops import cpp
from magnitudes import check_each_scale_group, scale_tokens, token_count
from tolerance import assert_within_reference_error

AVAILABLE, REASON = cpp.status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"C++ extension unavailable: {REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
AUTO, TILED, IDENTITY = 0, 1, 2
PATHS = {"tiled": TILED, "identity": IDENTITY}


def make_pair(shape_z, width_y, dtype, seed=0, noise=None):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape_z, generator=generator, dtype=torch.float64)
    if noise is None:
        y = torch.randn(*shape_z[:-1], width_y, generator=generator, dtype=torch.float64)
    else:  # near convergence: y = z + small noise
        y = z + noise * torch.randn(shape_z, generator=generator, dtype=torch.float64)
    return z.to(dtype), y.to(dtype)


def kernel_run(z, y, path, grad_z=True, grad_y=True):
    """The op with an explicit path; gradients as the autograd backward returns them (upstream 1)."""
    z = z.detach().clone().requires_grad_(grad_z)
    y = y.detach().clone().requires_grad_(grad_y)
    loss = torch.ops.repa_kernels.manifold(z, y, grad_z, grad_y, path)[0]
    loss.backward()
    return loss.detach(), z.grad, y.grad


def reference_run(z, y, grad_z=True, grad_y=True):
    z = z.detach().clone().requires_grad_(grad_z)
    y = y.detach().clone().requires_grad_(grad_y)
    loss = reference.manifold(z, y)
    loss.backward()
    return loss.detach(), z.grad, y.grad


def check_against_reference(z, y, path, grad_z=True, grad_y=True):
    dtype = z.dtype
    kernel = kernel_run(z, y, path, grad_z, grad_y)
    ref = reference_run(z, y, grad_z, grad_y)
    truth = reference_run(z.double(), y.double(), grad_z, grad_y)
    assert kernel[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within_reference_error(kernel[0], ref[0], truth[0], dtype, "loss")
    for index, (name, wanted) in enumerate((("dz", grad_z), ("dy", grad_y)), start=1):
        if wanted:
            assert kernel[index].dtype == dtype
            assert_within_reference_error(kernel[index], ref[index], truth[index], dtype, name, relative=True)
        else:
            assert kernel[index] is None
    return kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference_odd_shape_different_widths(path, dtype):
    z, y = make_pair((2, 5, 37, 67), 29, dtype)  # 10 slices, Dz != Dy
    check_against_reference(z, y, PATHS[path])


@pytest.mark.parametrize("path", PATHS)
def test_several_row_tiles(path):
    """N = 600 spans three 256-row tiles, so off-diagonal tiles and their transposed update run."""
    z, y = make_pair((1, 1, 600, 24), 40, torch.float32, seed=1)
    check_against_reference(z, y, PATHS[path])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wanted", ["dz", "dy"])
def test_one_sided_gradient(path, wanted):
    z, y = make_pair((2, 1, 45, 20), 12, torch.float32, seed=2)
    check_against_reference(z, y, PATHS[path], grad_z=wanted == "dz", grad_y=wanted == "dy")


@pytest.mark.parametrize("path", PATHS)
def test_near_convergence_precision(path):
    """Y = Z + 1e-4 noise: the loss is ~1e-9; both forms stay within 1e-3 relative of the fp64 truth
    (the identity form runs in fp64 because in fp32 it was 40 % off here)."""
    z, y = make_pair((2, 1, 512, 24), 24, torch.float32, seed=3, noise=1e-4)
    kernel = check_against_reference(z, y, PATHS[path])
    truth = reference.manifold(z.double(), y.double())
    assert abs(kernel[0].double() - truth) <= 1e-3 * truth


def test_auto_path_through_the_functional_api():
    for shape, width in (((2, 3, 40, 48), 48), ((1, 2, 300, 16), 16)):  # tiled, then identity (N >> D)
        z, y = make_pair(shape, width, torch.float32, seed=4)
        zz, yy = z.clone().requires_grad_(), y.clone().requires_grad_()
        loss = rk.manifold_loss(zz, yy, impl="cpp")
        loss.backward()
        expected = kernel_run(z, y, AUTO)
        assert torch.equal(loss.detach(), expected[0])
        assert torch.equal(zz.grad, expected[1]) and torch.equal(yy.grad, expected[2])
        truth = reference_run(z.double(), y.double())
        torch.testing.assert_close(loss.double(), truth[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_inputs_give_the_same_bits(path):
    z, y = make_pair((2, 3, 30, 20), 12, torch.float32, seed=5)
    expected = kernel_run(z, y, PATHS[path])
    z_t = z.transpose(1, 2).contiguous().transpose(1, 2)  # unit stride over D, permuted (T, N)
    y_s = torch.stack([y, y], dim=-1).flatten(-2)[..., ::2]  # D with stride 2
    got = kernel_run(z_t, y_s, PATHS[path])
    assert not z_t.is_contiguous() and not y_s.is_contiguous()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_zero_tokens_have_zero_gradient_and_no_inf(path, dtype):
    z, y = make_pair((2, 1, 20, 16), 16, dtype, seed=6)
    z[0, 0, 3] = 0
    y[1, 0, 5] = 0
    y[0, 0, 3] = 0
    kernel = check_against_reference(z, y, PATHS[path])
    assert torch.isfinite(kernel[1]).all() and torch.isfinite(kernel[2]).all()
    assert (kernel[1][0, 0, 3] == 0).all() and (kernel[2][1, 0, 5] == 0).all() and (kernel[2][0, 0, 3] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("slices", [1, 4])  # one slice with threaded BLAS, slices spread over threads
def test_same_bits_for_one_and_two_threads(path, slices):
    """Our reductions run in a fixed order; the GEMMs are MKL's, which gave the same bits for 1 and
    2 threads on this machine (not promised by MKL in general)."""
    z, y = make_pair((slices, 1, 520, 48), 40, torch.float32, seed=7)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel_run(z, y, PATHS[path])
        torch.set_num_threads(2)
        two = kernel_run(z, y, PATHS[path])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_float64_gradcheck(path):
    z, y = make_pair((2, 1, 5, 4), 3, torch.float64, seed=8)

    def loss(z, y):
        return torch.ops.repa_kernels.manifold(z, y, z.requires_grad, y.requires_grad, PATHS[path])[0]

    assert torch.autograd.gradcheck(loss, (z.requires_grad_(), y.requires_grad_()))
    if path == "tiled":  # also the eager wrapper that hands the forward's gradients over
        assert torch.autograd.gradcheck(lambda z, y: rk.manifold_loss(z, y, impl="cpp"), (z, y))


# ---- huge and tiny magnitudes (docs/contract.md §2: norms must not overflow; tests/magnitudes.py) ---------------
# The identity form accumulates in fp64, which holds every fp32 square; the tiled form rescales rows
# whose squared norm leaves the fp32 range, as the cosine kernel does.

def magnitude_pair(dtype, width_y=10, seed=20):
    """(2, 1, S², 12) and (2, 1, S², width_y) with every pairing of token magnitudes."""
    return scale_tokens(*make_pair((2, 1, token_count(dtype), 12), width_y, torch.float64, seed), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_huge_and_tiny_magnitudes_match_the_float64_truth(path, dtype):
    z, y, z_scale, y_scale = magnitude_pair(dtype)
    kernel = check_against_reference(z, y, PATHS[path])
    ref = reference_run(z, y)
    truth = reference_run(z.double(), y.double())
    assert all(torch.isfinite(t).all() for t in kernel)
    check_each_scale_group(kernel[1], ref[1], truth[1], z_scale, dtype, "dz")
    check_each_scale_group(kernel[2], ref[2], truth[2], y_scale, dtype, "dy")
    zero_z = z_scale * 12**0.5 * 6 < 1e-12  # |randn| < 6: ||z|| < 1e-12, a zero token
    assert zero_z.any() and (kernel[1][:, :, zero_z] == 0).all()


@pytest.mark.parametrize("dtype, z_shift, y_shift", [(torch.float32, 80, -38), (torch.bfloat16, -38, 80),
                                                     (torch.float64, 600, -36)], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_power_of_two_scaling_gives_the_same_bits(path, dtype, z_shift, y_shift):
    """2^k z: rescaled rows take the ordinary rows' arithmetic shifted by an exact power of two: the
    normalised rows, hence the loss, are the same bit for bit and the gradient is 2^-k times."""
    z, y = make_pair((2, 3, 20, 40), 24, dtype, seed=21)
    plain = torch.ops.repa_kernels.manifold(z, y, True, True, PATHS[path])
    shifted = torch.ops.repa_kernels.manifold(z * 2.0**z_shift, y * 2.0**y_shift, True, True, PATHS[path])
    assert torch.equal(plain[0], shifted[0])
    assert torch.equal(plain[1], shifted[1] * 2.0**z_shift)
    assert torch.equal(plain[2], shifted[2] * 2.0**y_shift)


def test_never_allocates_n_by_n():
    tokens = 600
    z, y = make_pair((1, 1, tokens, 16), 16, torch.float32, seed=9)
    for path in (TILED, IDENTITY):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.ops.repa_kernels.manifold(z, y, True, True, path)
        largest = max(e.cpu_memory_usage for e in prof.events())
        assert 0 < largest < tokens * tokens * 4, f"path {path}: an allocation of {largest} bytes"


def test_op_errors_name_the_problem():
    z = torch.randn(1, 1, 3, 4)
    with pytest.raises(RuntimeError, match="must share \\(B, T, N\\)"):
        torch.ops.repa_kernels.manifold(z, torch.randn(1, 1, 4, 4), False, False)
    with pytest.raises(RuntimeError, match="path must be 0 \\(auto\\), 1 \\(tiled\\) or 2 \\(identity\\), got 3"):
        torch.ops.repa_kernels.manifold(z, z, False, False, 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.repa_kernels.manifold(z, z.double(), False, False)
    with pytest.raises(RuntimeError, match="every dimension of z and y must be >= 1, got shapes \\[1, 1, 3, 0\\]"):
        torch.ops.repa_kernels.manifold(torch.zeros(1, 1, 3, 0), z, True, False)
    with pytest.raises(RuntimeError, match="every dimension of z and y must be >= 1"):
        torch.ops.repa_kernels.manifold(torch.zeros(1, 1, 0, 4), torch.zeros(1, 1, 0, 4), False, False)


def test_opcheck():
    z, y = make_pair((2, 3, 5, 8), 6, torch.float32, seed=10)
    torch.library.opcheck(torch.ops.repa_kernels.manifold.default, (z.requires_grad_(), y.requires_grad_(), True, True))
    torch.library.opcheck(torch.ops.repa_kernels.manifold.default, (z.detach(), y.detach(), False, False, IDENTITY))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    z, y = make_pair((2, 1, 40, 16), 16, torch.float32, seed=11)

    def objective(z, y):
        return 3.0 * cpp.manifold(z, y)

    compiled = torch.compile(objective, fullgraph=True)
    outputs = []
    for fn in (objective, compiled):
        zz, yy = z.clone().requires_grad_(), y.clone().requires_grad_()
        loss = fn(zz, yy)
        loss.backward()
        outputs.append((loss.detach(), zz.grad, yy.grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1][1:], outputs[0][1:], rtol=1e-6, atol=0)
