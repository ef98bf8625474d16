"""The tiled Triton manifold kernels (impl="triton") against the reference (docs/contract.md §2.2).

On CPU the kernels run in the Triton interpreter; with a GPU the same tests run on CUDA too. Accuracy
rule (tests/tolerance.py): |kernel − fp64 truth| <= |same-dtype reference − fp64 truth| + tol, on the
loss and on the gradients (relative to their largest entry).
"""

import pytest
import torch

import repa_kernels as rk
from repa_kernels.ops import manifold_triton, utils
from hopper_compile import compile_reports, needs_cuda_toolchain
from tolerance import assert_within_reference_error


def make_inputs(shape_z, shape_y, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape_z, generator=g, dtype=torch.float64)
    y = torch.randn(shape_y, generator=g, dtype=torch.float64)
    return z.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def run(z, y, impl, grad_y=True, upstream=1.0):
    """(loss, dz, dy) of `upstream * loss`."""
    z = z.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(grad_y)
    loss = rk.manifold_loss(z, y, impl=impl)
    (upstream * loss).backward()
    return loss.detach(), z.grad, (y.grad if grad_y else None)


def check_against_reference(z, y, grad_y=True, upstream=1.0):
    kernel = run(z, y, "triton", grad_y, upstream)
    reference = run(z, y, "reference", grad_y, upstream)
    truth = run(z.double(), y.double(), "reference", grad_y, upstream)
    for name, k, r, t in zip(("loss", "dz", "dy"), kernel, reference, truth):
        if t is None:
            continue
        expected_dtype = z.dtype if name != "loss" else (torch.float64 if z.dtype == torch.float64 else torch.float32)
        assert k.dtype == expected_dtype, f"{name} dtype {k.dtype} != {expected_dtype}"
        assert_within_reference_error(k, r, t, z.dtype, name, relative=name != "loss")
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes_odd_shape(device, dtype):
    z, y = make_inputs((2, 37, 67), (2, 37, 67), dtype, device, seed=1)
    check_against_reference(z, y, grad_y=True, upstream=2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_different_widths_per_frame(device, dtype):
    z, y = make_inputs((1, 3, 20, 24), (1, 3, 20, 40), dtype, device, seed=2)
    check_against_reference(z, y, grad_y=True, upstream=-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_near_convergence(device, dtype):
    # Z ≈ Y: the Gram difference is tiny, where a D x D identity would cancel catastrophically.
    z, _ = make_inputs((1, 48, 16), (1, 48, 16), torch.float64, device, seed=3)
    y = z + 1e-3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    loss, _, _ = check_against_reference(z.to(dtype), y.to(dtype), grad_y=True)
    assert loss.item() < 1e-4


def test_small_blocks_loop_over_tiles_and_channels(device):
    # 16-wide tiles: 3 row and column blocks, 2-3 channel chunks, 2-3 output chunks per slice.
    z, y = make_inputs((1, 2, 37, 40), (1, 2, 37, 24), torch.float32, device, seed=5)
    with utils.small_blocks():
        blocks = utils.manifold_blocks(37, 40, 24, torch.float32, backward=True)
        assert (blocks.block_m, blocks.block_k, blocks.block_out) == (16, 16, 16)
        check_against_reference(z, y, grad_y=True, upstream=1.5)


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 30, 3, 20, generator=g).to(device).transpose(1, 2)
    y = torch.randn(2, 3, 30, 64, generator=g).to(device)[..., 1::2]
    assert not z.is_contiguous() and not y.is_contiguous()
    check_against_reference(z, y, grad_y=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_tokens_have_zero_gradient(device, dtype):
    z, y = make_inputs((2, 20, 24), (2, 20, 12), dtype, device, seed=7)
    z[0, 3] = 0.0
    y[1, 7] = 0.0
    _, dz, dy = check_against_reference(z, y, grad_y=True, upstream=2.0)
    assert torch.isfinite(dz).all() and torch.isfinite(dy).all()
    assert (dz[0, 3] == 0).all() and (dy[1, 7] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e30, 1e-6], ids=["1e30", "1e-6"])
def test_huge_and_small_magnitudes(device, dtype, magnitude):
    # |x| ~ 1e30: squares and raw bf16 Gram products overflow float32; the token norms are taken of
    # x·2^-e and bf16 tiles of such rows are scaled before the tensor cores. |x| ~ 1e-6: plain path.
    z, y = make_inputs((1, 2, 20, 24), (1, 2, 20, 40), torch.float64, device, seed=14)
    check_against_reference((z * magnitude).to(dtype), (y * magnitude).to(dtype), grad_y=True, upstream=2.0)


MIXED_SCALES = {
    # 1e-11 tokens (||x|| ~ 5e-11) are kept; 1e-20 and below are zero tokens (||x|| < 1e-12).
    # No subnormal tokens: the reference's gradient is NaN there (see test_subnormal_tokens_are_zero_tokens).
    torch.float32: [3e37, 1e30, 1e20, 1e-11, 1e-20, 1e-37],
    torch.bfloat16: [3e37, 1e30, 1e20, 1e-11, 1e-20, 1e-37],
    torch.float64: [1e300, 1e200, 1e130, 1e-11, 1e-200, 1e-300],
}


@pytest.mark.parametrize("dtype", MIXED_SCALES.keys(), ids=str)
def test_mixed_magnitudes_extreme_and_moderate_tiles(device, dtype):
    # 16-token tiles: the extreme tokens sit in row block 0 (and token 20 of z), so tiles touching
    # them take the scaled branch (bf16, float64) and the others the plain one, within one slice and
    # one program's walk over column blocks; a later 16-channel chunk raises token 20's scale mid-row.
    z, y = make_inputs((1, 1, 37, 40), (1, 1, 37, 24), torch.float64, device, seed=15)
    scales = torch.ones(37, dtype=torch.float64, device=device)
    scales[:12] = torch.tensor(MIXED_SCALES[dtype] * 2, dtype=torch.float64, device=device)
    z = z * scales[:, None]
    y = y * scales.flip(0).roll(-25)[:, None]  # y's extreme tokens are rows 0-11 too, in another order
    z[0, 0, 20, 33] = MIXED_SCALES[dtype][1]
    z, y = z.to(dtype), y.to(dtype)
    scale_row = manifold_triton.inverse_norms(z)[2].view(1, 37)
    limit = 2.0 ** 400 if dtype == torch.float64 else 2.0 ** 40
    extreme = (scale_row > limit) | (scale_row < 1 / limit)
    assert extreme[0, :12].any() and extreme[0, 20] and extreme[0, 16:].sum() == 1  # row 20 only past 16
    with utils.small_blocks():
        check_against_reference(z, y, grad_y=True, upstream=1.5)


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-40), (torch.float64, 1e-310)], ids=["fp32", "fp64"])
def test_subnormal_tokens_are_zero_tokens(device, dtype, tiny):
    # Subnormal tokens (||x|| << 1e-12) are zero tokens: the same loss and gradients as exact zeros, and a
    # zero gradient. (The reference's gradient is NaN there: autograd through x / max|x| divides by
    # max|x|², which overflows.)
    z, y = make_inputs((1, 2, 9, 16), (1, 2, 9, 8), dtype, device, seed=16)
    z_zero, y_zero = z.clone(), y.clone()
    z_zero[0, 1, 2] = 0.0
    y_zero[0, 0, 7] = 0.0
    z[0, 1, 2] = tiny * torch.linspace(-1, 1, 16, dtype=dtype, device=device)
    y[0, 0, 7] = tiny
    assert z[0, 1, 2].abs().max() > 0 and y[0, 0, 7].abs().max() > 0
    tiny_run = run(z, y, "triton", grad_y=True)
    zero_run = run(z_zero, y_zero, "triton", grad_y=True)
    for a, b in zip(tiny_run, zero_run):
        assert torch.equal(a, b)
    assert (tiny_run[1][0, 1, 2] == 0).all() and (tiny_run[2][0, 0, 7] == 0).all()


def test_bitwise_deterministic(device):
    z, y = make_inputs((1, 2, 37, 40), (1, 2, 37, 24), torch.bfloat16, device, seed=8)
    first = run(z, y, "triton", grad_y=True, upstream=0.7)
    second = run(z, y, "triton", grad_y=True, upstream=0.7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_only_z_gradient_and_no_grad(device):
    z, y = make_inputs((2, 16, 8), (2, 16, 8), torch.float32, device, seed=9)
    with torch.no_grad():
        plain = rk.manifold_loss(z, y, impl="triton")
    assert not plain.requires_grad
    kernel = run(z, y, "triton", grad_y=False)
    assert kernel[2] is None
    assert kernel[0].item() == pytest.approx(plain.item(), abs=1e-9)


def test_opcheck(device):
    z, y = make_inputs((1, 2, 9, 16), (1, 2, 9, 8), torch.float32, device, seed=10)
    z.requires_grad_(True)
    y.requires_grad_(True)
    torch.library.opcheck(manifold_triton.manifold_triton_forward, (z, y))
    loss, inv_z, inv_y = manifold_triton.manifold_triton_forward(z.detach(), y.detach())
    torch.library.opcheck(manifold_triton.manifold_triton_backward,
                          (torch.tensor(1.5, device=device), z.detach(), y.detach(), inv_z, inv_y, True, False))


def test_torch_compile_fullgraph(device):
    z, y = make_inputs((2, 12, 32), (2, 12, 32), torch.float32, device, seed=11)

    def objective(z, y):
        result = rk.urepa_loss(z, y, manifold_weight=3.0, impl="triton")
        return result.loss, result.manifold

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    outputs = []
    for fn in (objective, compiled):
        zz = z.clone().requires_grad_(True)
        yy = y.clone().requires_grad_(True)
        loss, manifold = fn(zz, yy)
        loss.backward()
        outputs.append((loss.detach(), manifold.detach(), zz.grad, yy.grad))
    for eager, traced in zip(*outputs):
        torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak CUDA memory is measured on a GPU only")
def test_never_materialises_n_by_n():
    # N >> D: one N x N fp32 Gram would be 256 MB; the inputs are 2 MB.
    tokens, dim = 8192, 64
    z, y = make_inputs((1, tokens, dim), (1, tokens, dim), torch.bfloat16, "cuda", seed=12)
    z.requires_grad_(True)
    y.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    rk.manifold_loss(z, y, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert extra < 16 * tokens * dim * 2, f"peak extra memory {extra} bytes is not O(N·D)"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="64-bit offsets need a tensor of more than 2^31 elements (4 GB in bf16), which "
                           "the CPU interpreter cannot run in test time; runs on CUDA")
def test_int64_offsets_beyond_2_31_elements():
    # 2^19 + 8 slices of 64 tokens x 64 channels: the last slices' elements lie past 2^31.
    slices, tokens, dim = (1 << 19) + 8, 64, 64
    g = torch.Generator(device="cuda").manual_seed(13)
    z = torch.randn(slices, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randn(slices, tokens, 16, device="cuda", dtype=torch.bfloat16, generator=g)
    assert z.numel() > 2 ** 31
    z.requires_grad_(True)
    loss = rk.manifold_loss(z, y, impl="triton")
    loss.backward()
    # The loss is a mean over slices: the last slice alone (x 1/slices) checks the far elements.
    last_z = z.detach()[-1:].float().requires_grad_(True)
    last = rk.manifold_loss(last_z, y[-1:].float(), impl="reference")
    last.backward()
    scale = last_z.grad.abs().max() / slices
    assert ((z.grad[-1].float() - last_z.grad[0] / slices).abs().max() / scale).item() < 2e-2


@needs_cuda_toolchain
def test_gpu_code_path_compiles_for_hopper():
    # the bf16 Gram kernels must use the Hopper tensor cores (wgmma)
    bf16, fp32 = compile_reports("manifold_triton")
    by_name = {r["name"]: r for r in bf16}
    assert by_name["_manifold_forward_kernel"]["uses_wgmma"] and by_name["_manifold_backward_kernel"]["uses_wgmma"]
    assert all(r["stack_bytes"] == 0 for r in bf16), bf16
    assert len(fp32) == 5
