"""The fused Triton CREPA kernel (impl="triton") against the reference (docs/contract.md §2.1).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no
CUDA device exists); with a GPU the same tests run the compiled kernels on CUDA as well. Accuracy rule
(tests/tolerance.py): |kernel − fp64 truth| <= |same-dtype reference − fp64 truth| + tol, on the loss,
the metrics and the gradients (relative to their largest entry).
"""

import math

import pytest
import torch

import repa_kernels as rk
from repa_kernels.ops import crepa_triton, utils
from hopper_compile import compile_reports, needs_cuda_toolchain
from tolerance import assert_within_reference_error

SHAPE = (2, 5, 37, 67)  # odd sizes: no block multiple anywhere

MODES = {
    "adjacent-d1": dict(distance=1),
    "adjacent-d2-tau0.5": dict(distance=2, tau=0.5),
    "cumulative-d2-neighboursum": dict(distance=2, cumulative=True, normalize_neighbour_sum=True),
    "adjacent-clamped-d7": dict(distance=7, normalize_by_frames=False),
    "cumulative-clamped-d7-tau2": dict(distance=7, tau=2.0, cumulative=True),
    "distance0": dict(distance=0, normalize_neighbour_sum=True),
}


def make_inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5 * z  # correlated, like a real pair
    return z.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def run(z, y, impl, grad_y=True, upstream=1.0, **mode):
    """(loss, alignment_score, similarity_self, dz, dy) of `upstream * loss`."""
    z = z.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(grad_y)
    result = rk.crepa_loss(z, y, impl=impl, **mode)
    (upstream * result.loss).backward()
    return (result.loss.detach(), result.alignment_score, result.similarity_self, z.grad,
            y.grad if grad_y else None)


def check_against_reference(z, y, grad_y=True, upstream=1.0, **mode):
    kernel = run(z, y, "triton", grad_y, upstream, **mode)
    reference = run(z, y, "reference", grad_y, upstream, **mode)
    truth = run(z.double(), y.double(), "reference", grad_y, upstream, **mode)
    names = ("loss", "alignment_score", "similarity_self", "dz", "dy")
    for name, k, r, t in zip(names, kernel, reference, truth):
        if t is None:
            continue
        if name in ("dz", "dy"):
            assert k.dtype == z.dtype, f"{name} dtype {k.dtype} != input dtype {z.dtype}"
        else:
            assert k.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
        assert_within_reference_error(k, r, t, z.dtype, name, relative=name in ("dz", "dy"))
    return kernel


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_modes_float32(device, mode):
    z, y = make_inputs(SHAPE, torch.float32, device, seed=1)
    check_against_reference(z, y, grad_y=True, upstream=1.0, **mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["adjacent-d1", "cumulative-d2-neighboursum"])
def test_dtypes_with_upstream_gradient(device, dtype, mode):
    z, y = make_inputs(SHAPE, dtype, device, seed=2)
    check_against_reference(z, y, grad_y=True, upstream=2.5, **MODES[mode])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_image_repa_three_dimensional_input(device, dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 50, 40, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(3, 50, 40, generator=g).to(device=device, dtype=dtype)
    kernel = check_against_reference(z, y, grad_y=False, upstream=-0.75, distance=3, cumulative=True)
    assert kernel[3].shape == z.shape


def test_small_blocks_loop_over_tokens_and_channels(device):
    # 16-token, 16-channel blocks: 3 token blocks and 3 channel chunks per frame.
    z, y = make_inputs((1, 4, 37, 40), torch.float32, device, seed=4)
    with utils.small_blocks():
        assert utils.token_blocks(37, 67, torch.float32).block_n == 16
        check_against_reference(z, y, grad_y=True, upstream=1.5, **MODES["cumulative-d2-neighboursum"])


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(5)
    # z: frames and tokens swapped in memory; y: every other channel of a wider tensor.
    z = torch.randn(2, 37, 5, 67, generator=g).to(device).transpose(1, 2)
    y = torch.randn(2, 5, 37, 134, generator=g).to(device)[..., ::2]
    assert not z.is_contiguous() and not y.is_contiguous()
    check_against_reference(z, y, grad_y=True, distance=2, cumulative=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_tokens_have_zero_gradient(device, dtype):
    z, y = make_inputs((2, 4, 9, 24), dtype, device, seed=6)
    z[0, 1, 3] = 0.0
    z[1, 3, :] = 0.0  # a whole zero frame
    y[1, 2, 5] = 0.0
    kernel = check_against_reference(z, y, grad_y=True, upstream=3.0, distance=1)
    _, _, _, dz, dy = kernel
    assert torch.isfinite(dz).all() and torch.isfinite(dy).all()
    assert (dz[0, 1, 3] == 0).all() and (dz[1, 3] == 0).all()
    assert (dy[1, 2, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e30, 1e-6], ids=["1e30", "1e-6"])
def test_huge_and_small_magnitudes(device, dtype, magnitude):
    # |x| ~ 1e30: x² overflows float32 (1e60 > 3.4e38), the per-token power-of-two scaling must not;
    # |x| ~ 1e-6: squares ~1e-12, far from the zero-token threshold ||x|| < 1e-12.
    z, y = make_inputs((1, 3, 9, 40), torch.float64, device, seed=13)
    check_against_reference((z * magnitude).to(dtype), (y * magnitude).to(dtype), grad_y=True, upstream=1.5,
                            **MODES["cumulative-d2-neighboursum"])


MIXED_SCALES = {
    # 1e-11 tokens (||x|| ~ 6e-11) are kept; 1e-20 and below are zero tokens (||x|| < 1e-12).
    # No subnormal tokens: the reference's gradient is NaN there (see test_subnormal_tokens_are_zero_tokens).
    torch.float32: [3e37, 1e30, 1e20, 1.0, 1e-3, 1e-11, 1e-20, 1e-37],
    torch.bfloat16: [3e37, 1e30, 1e20, 1.0, 1e-3, 1e-11, 1e-20, 1e-37],
    torch.float64: [1e300, 1e200, 1e100, 1.0, 1e-3, 1e-11, 1e-200, 1e-300],
}


@pytest.mark.parametrize("dtype", MIXED_SCALES.keys(), ids=str)
def test_mixed_magnitudes_rescale_within_a_token(device, dtype):
    # Tokens of very different magnitudes side by side (frames and neighbours), and tokens whose
    # largest entry lies in a later 16-channel chunk, so the running scale rises mid-token.
    z, y = make_inputs((1, 3, 8, 40), torch.float64, device, seed=14)
    scales = torch.tensor(MIXED_SCALES[dtype], dtype=torch.float64, device=device)
    z = z * scales[:, None]
    y = y * scales.roll(3)[:, None]
    z[0, 1, 3, 35] = scales[0] * 3  # later chunk ~ 3e37 (1e300) in a token of ~1
    y[0, 2, 0, 20] = scales[1]
    with utils.small_blocks():
        check_against_reference(z.to(dtype), y.to(dtype), grad_y=True, upstream=1.0,
                                **MODES["cumulative-d2-neighboursum"])


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-40), (torch.float64, 1e-310)], ids=["fp32", "fp64"])
def test_subnormal_tokens_are_zero_tokens(device, dtype, tiny):
    # Subnormal tokens (||x|| << 1e-12) are zero tokens: the same loss and gradients as exact zeros, and a
    # zero gradient. (The reference's gradient is NaN there: autograd through x / max|x| divides by
    # max|x|², which overflows.)
    z, y = make_inputs((1, 3, 6, 24), dtype, device, seed=15)
    z_zero, y_zero = z.clone(), y.clone()
    z_zero[0, 1, 2] = 0.0
    y_zero[0, 2, 4] = 0.0
    z[0, 1, 2] = tiny * torch.linspace(-1, 1, 24, dtype=dtype, device=device)
    y[0, 2, 4] = tiny
    assert z[0, 1, 2].abs().max() > 0 and y[0, 2, 4].abs().max() > 0
    mode = MODES["cumulative-d2-neighboursum"]
    tiny_run = run(z, y, "triton", grad_y=True, **mode)
    zero_run = run(z_zero, y_zero, "triton", grad_y=True, **mode)
    for a, b in zip(tiny_run, zero_run):
        assert torch.equal(a, b)
    assert (tiny_run[3][0, 1, 2] == 0).all() and (tiny_run[4][0, 2, 4] == 0).all()


def test_golden_value(device):
    v = torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (v / v.norm()).expand(2, 4, 3, 8).to(device=device, dtype=torch.float32)
    result = rk.crepa_loss(z, z, distance=1, tau=1.0, impl="triton")
    assert result.alignment_score.item() == pytest.approx(1 + 1.5 * math.exp(-1), abs=1e-6)
    assert result.loss.item() == pytest.approx(-(1 + 1.5 * math.exp(-1)), abs=1e-6)
    normalised = rk.crepa_loss(z, z, distance=1, tau=1.0, normalize_neighbour_sum=True, impl="triton")
    assert normalised.loss.item() == pytest.approx(-1.0, abs=1e-6)


def test_a_distance_beyond_any_int_is_the_clamped_distance(device):
    """distance >= T - 1 means every other frame: the op gets the clamped value, so a distance past what a
    SymInt can hold still runs (it raised an opaque pybind error before)."""
    z, y = make_inputs((1, 3, 5, 8), torch.float32, device, seed=3)
    clamped = rk.crepa_loss(z, y, distance=2, impl="triton")
    huge = rk.crepa_loss(z, y, distance=2**70, impl="triton")
    assert torch.equal(clamped.loss, huge.loss)


def test_bitwise_deterministic(device):
    z, y = make_inputs(SHAPE, torch.bfloat16, device, seed=7)
    first = run(z, y, "triton", grad_y=True, upstream=1.3, distance=2, cumulative=True)
    second = run(z, y, "triton", grad_y=True, upstream=1.3, distance=2, cumulative=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradient_paths_and_detached_metrics(device):
    z, y = make_inputs((2, 3, 10, 16), torch.float32, device, seed=8)
    with torch.no_grad():
        plain = rk.crepa_loss(z, y, impl="triton")
    assert not plain.loss.requires_grad
    # Only y requires grad: dz is neither computed nor returned.
    y_grad = y.clone().requires_grad_(True)
    result = rk.crepa_loss(z, y_grad, impl="triton")
    assert not result.alignment_score.requires_grad and not result.similarity_self.requires_grad
    result.loss.backward()
    truth_y = y.double().requires_grad_(True)
    rk.crepa_loss(z.double(), truth_y, impl="reference").loss.backward()
    torch.testing.assert_close(y_grad.grad.double(), truth_y.grad, atol=1e-6, rtol=1e-5)
    assert result.loss.item() == pytest.approx(plain.loss.item(), abs=1e-7)
    # The same graph backpropagated twice (retain_graph) gives the same gradient twice.
    z_grad = z.clone().requires_grad_(True)
    loss = rk.crepa_loss(z_grad, y, impl="triton").loss
    first, = torch.autograd.grad(2 * loss, z_grad, retain_graph=True)
    second, = torch.autograd.grad(2 * loss, z_grad)
    assert torch.equal(first, second)


def test_opcheck(device):
    z, y = make_inputs((1, 3, 6, 16), torch.float32, device, seed=9)
    z.requires_grad_(True)
    y.requires_grad_(True)
    torch.library.opcheck(crepa_triton.crepa_triton_forward, (z, y, 2, 0.5, True, True, True, True, True))
    torch.library.opcheck(crepa_triton.crepa_triton_forward,
                          (z.detach(), y.detach(), 1, 1.0, False, False, False, False, False))


def test_torch_compile_fullgraph(device):
    z, y = make_inputs((2, 4, 12, 32), torch.float32, device, seed=10)

    def objective(z, y):
        result = rk.crepa_loss(z, y, distance=2, cumulative=True, impl="triton")
        return 0.5 * result.loss, result.alignment_score

    compiled = torch.compile(objective, fullgraph=True, backend="inductor")
    outputs = []
    for fn in (objective, compiled):
        zz = z.clone().requires_grad_(True)
        yy = y.clone().requires_grad_(True)
        loss, alignment = fn(zz, yy)
        loss.backward()
        outputs.append((loss.detach(), alignment, zz.grad, yy.grad))
    for eager, traced in zip(*outputs):
        torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-6)


def test_fp64_computes_in_fp64(device):
    z, y = make_inputs((1, 3, 7, 9), torch.float64, device, seed=11)
    kernel = run(z, y, "triton", grad_y=True, distance=1)
    truth = run(z, y, "reference", grad_y=True, distance=1)
    for k, t in zip(kernel, truth):
        assert k.dtype == torch.float64
        torch.testing.assert_close(k, t, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="64-bit offsets need a tensor of more than 2^31 elements (z, y and dz: 13 GB "
                           "in bf16), which the CPU interpreter cannot run in test time; runs on CUDA")
def test_int64_offsets_beyond_2_31_elements():
    # Two samples of 2^20 + 16 tokens x 1024 channels: the second sample's elements lie past 2^31.
    tokens, dim = (1 << 20) + 16, 1024
    g = torch.Generator(device="cuda").manual_seed(12)
    z = torch.randn(2, 1, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randn(2, 1, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    assert z.numel() > 2 ** 31
    z.requires_grad_(True)
    result = rk.crepa_loss(z, y, distance=0, impl="triton")
    result.loss.backward()
    dz = z.grad
    z.grad = None
    # REPA with distance 0 is a mean over samples: sample 1 alone gives its own share (x 1/2).
    last_z = z.detach()[1:].float().requires_grad_(True)
    last = rk.crepa_loss(last_z, y[1:].float(), distance=0, impl="reference")
    last.loss.backward()
    tail_error = (dz[1].float() - last_z.grad[0] / 2).abs().max() / (last_z.grad.abs().max() / 2)
    assert tail_error < 1e-2
    assert result.similarity_self.item() == pytest.approx(
        (last.similarity_self.item() + rk.crepa_loss(z.detach()[:1].float(), y[:1].float(), distance=0,
                                                      impl="reference").similarity_self.item()) / 2, abs=1e-5)


@needs_cuda_toolchain
def test_gpu_code_path_compiles_for_hopper():
    # compile errors and register spills of the GPU path show up on a CPU-only machine
    bf16, fp32 = compile_reports("crepa_triton")
    assert [r["name"] for r in bf16] == ["_crepa_fused_kernel"] * 3 + ["_crepa_finalize_kernel"]
    # Forward and forward + dz (the training path) keep everything in registers.
    for report in bf16[:2] + fp32[:2]:
        assert report["stack_bytes"] == 0, report
