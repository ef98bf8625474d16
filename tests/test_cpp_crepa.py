"""C++ CPU kernel of the CREPA / REPA cosine term: `impl="cpp"` against the reference and a
float64 ground truth (tests/tolerance.py), plus the op registration, determinism and extension loading."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import repa_kernels as rk
from repa_kernels import backends, reference
from repa_kernels.ops import cpp
from magnitudes import check_each_scale_group, scale_tokens, token_count
from tolerance import assert_within_reference_error

AVAILABLE, REASON = cpp.status()
needs_extension = pytest.mark.skipif(not AVAILABLE, reason=f"C++ extension unavailable: {REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MODES = {
    "adjacent-d1": rk.CrepaOptions(),
    "repa-d0": rk.CrepaOptions(distance=0),
    "cumulative-d2-normsum": rk.CrepaOptions(distance=2, tau=0.5, cumulative=True, normalize_neighbour_sum=True),
    "adjacent-clamped-d9-sum-frames": rk.CrepaOptions(distance=9, tau=2.0, normalize_by_frames=False),
    "cumulative-d3-normsum-sum-frames": rk.CrepaOptions(distance=3, cumulative=True, normalize_by_frames=False,
                                                        normalize_neighbour_sum=True),
}


def test_extension_is_available():
    """`make test` builds the extension: if it cannot load, say why instead of skipping every test."""
    assert AVAILABLE, REASON


def make_pair(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.5 * z  # correlated: non-trivial cosines
    return z.to(dtype), y.to(dtype)


def run(z, y, opts, impl, grad_y=True):
    z = z.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(grad_y)
    result = rk.crepa_loss_with_options(z, y, opts, impl=impl)
    result.loss.backward()
    return result, z.grad, y.grad


def check_against_reference(z, y, opts, grad_y=True):
    dtype = z.dtype
    kernel, kernel_dz, kernel_dy = run(z, y, opts, "cpp", grad_y)
    ref, ref_dz, ref_dy = run(z, y, opts, "reference", grad_y)
    truth, truth_dz, truth_dy = run(z.double(), y.double(), opts, "reference", grad_y)
    assert kernel.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert kernel_dz.dtype == dtype
    for field in ("loss", "alignment_score", "similarity_self"):
        assert_within_reference_error(getattr(kernel, field).detach(), getattr(ref, field).detach(),
                                      getattr(truth, field).detach(), dtype, field)
    assert_within_reference_error(kernel_dz, ref_dz, truth_dz, dtype, "dz", relative=True)
    if grad_y:
        assert kernel_dy.dtype == dtype
        assert_within_reference_error(kernel_dy, ref_dy, truth_dy, dtype, "dy", relative=True)
    else:
        assert kernel_dy is None


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_matches_reference_odd_shape(mode, dtype):
    z, y = make_pair((2, 5, 37, 67), dtype)
    check_against_reference(z, y, MODES[mode])


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_image_repa_three_dim_input_without_dy(dtype):
    z, y = make_pair((3, 70, 24), dtype, seed=1)
    check_against_reference(z, y, rk.CrepaOptions(), grad_y=False)


@needs_extension
def test_golden_value():
    """docs/contract.md §2.1: the same unit vector everywhere, T = 4, d = 1, tau = 1 -> 1 + 1.5 e^-1."""
    z = torch.zeros(2, 4, 6, 8)
    z[..., 3] = 1.0
    result = rk.crepa_loss(z, z.clone(), impl="cpp")
    expected = 1 + 1.5 * torch.exp(torch.tensor(-1.0)).item()
    assert result.alignment_score.item() == pytest.approx(expected, rel=1e-6)
    assert result.loss.item() == pytest.approx(-expected, rel=1e-6)
    normalized = rk.crepa_loss(z, z.clone(), normalize_neighbour_sum=True, impl="cpp")
    assert normalized.loss.item() == pytest.approx(-1.0, rel=1e-6)


@needs_extension
def test_non_contiguous_inputs_give_the_same_bits():
    z, y = make_pair((2, 6, 20, 48), torch.float32, seed=2)
    opts = rk.CrepaOptions(distance=2, cumulative=True)
    expected, expected_dz, expected_dy = run(z, y, opts, "cpp")
    # unit stride over D, permuted (B, T, N) strides: read in place
    z_t = z.transpose(1, 2).contiguous().transpose(1, 2)
    y_t = y.transpose(1, 2).contiguous().transpose(1, 2)
    # D with stride 2: copied to contiguous inside the op
    z_s = torch.stack([z, torch.zeros_like(z)], dim=-1).flatten(-2)[..., ::2]
    y_s = torch.stack([y, torch.zeros_like(y)], dim=-1).flatten(-2)[..., ::2]
    for zz, yy in ((z_t, y_t), (z_s, y_s)):
        assert not zz.is_contiguous()
        got, got_dz, got_dy = run(zz, yy, opts, "cpp")
        assert torch.equal(got.loss, expected.loss)
        assert torch.equal(got_dz, expected_dz) and torch.equal(got_dy, expected_dy)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_tokens_have_zero_gradient_and_no_inf(dtype):
    z, y = make_pair((2, 3, 16, 40), dtype, seed=3)
    z[0, 1, 3] = 0
    z[1, :, 5] = 0
    y[0, 2, 7] = 0
    y[1, 0, 5] = 0
    opts = rk.CrepaOptions(distance=1)
    kernel, dz, dy = run(z, y, opts, "cpp")
    assert torch.isfinite(dz).all() and torch.isfinite(dy).all()
    assert (dz[0, 1, 3] == 0).all() and (dz[1, :, 5] == 0).all()
    assert (dy[0, 2, 7] == 0).all() and (dy[1, 0, 5] == 0).all()
    check_against_reference(z, y, opts)


@needs_extension
def test_same_bits_for_one_and_two_threads():
    z, y = make_pair((2, 7, 100, 96), torch.float32, seed=4)
    opts = rk.CrepaOptions(distance=2, cumulative=True, normalize_neighbour_sum=True)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_dz, one_dy = run(z, y, opts, "cpp")
        torch.set_num_threads(2)
        two, two_dz, two_dy = run(z, y, opts, "cpp")
    finally:
        torch.set_num_threads(previous)
    for field in ("loss", "alignment_score", "similarity_self"):
        assert torch.equal(getattr(one, field), getattr(two, field)), field
    assert torch.equal(one_dz, two_dz) and torch.equal(one_dy, two_dy)


@needs_extension
def test_float64_gradcheck():
    z, y = make_pair((2, 4, 5, 6), torch.float64, seed=5)
    opts = rk.CrepaOptions(distance=2, tau=0.7, cumulative=True, normalize_neighbour_sum=True)

    def loss(z, y):
        return rk.crepa_loss_with_options(z, y, opts, impl="cpp").loss

    assert torch.autograd.gradcheck(loss, (z.requires_grad_(), y.requires_grad_()))


@needs_extension
def test_backward_twice_through_a_retained_graph_and_scaled_upstream():
    z, y = make_pair((1, 3, 8, 12), torch.float32, seed=6)
    _, expected_dz, expected_dy = run(z, y, rk.CrepaOptions(), "cpp")
    z.requires_grad_(True)
    y.requires_grad_(True)
    loss = rk.crepa_loss(z, y, impl="cpp").loss
    (2.5 * loss).backward(retain_graph=True)  # scaled in place on the first backward
    (-1.0 * loss).backward()  # recomputed on the second
    torch.testing.assert_close(z.grad, 1.5 * expected_dz)
    torch.testing.assert_close(y.grad, 1.5 * expected_dy)


@needs_extension
def test_no_gradient_work_without_grad():
    z, y = make_pair((1, 2, 4, 8), torch.float32)
    outputs = torch.ops.repa_kernels.crepa(z, y, rk.CrepaOptions().frame_weight_list(2), -0.5, False, False)
    assert outputs[3].shape == (0,) and outputs[4].shape == (0,)
    with torch.no_grad():
        result = rk.crepa_loss(z.requires_grad_(), y, impl="cpp")
    assert not result.loss.requires_grad


@needs_extension
def test_op_errors_name_the_problem():
    z = torch.randn(1, 2, 3, 4)
    weights = rk.CrepaOptions().frame_weight_list(2)
    with pytest.raises(RuntimeError, match="frame_weights must hold 4 values"):
        torch.ops.repa_kernels.crepa(z, z, weights[:3], -1.0, False, False)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.repa_kernels.crepa(z, torch.randn(1, 2, 3, 5), weights, -1.0, False, False)
    with pytest.raises(RuntimeError, match="dtype must be float16, bfloat16, float32 or float64"):
        torch.ops.repa_kernels.crepa(z.int(), z.int(), weights, -1.0, False, False)
    with pytest.raises(RuntimeError, match="frame_weights must be finite, got nan at index 1"):
        torch.ops.repa_kernels.crepa(z, z, [weights[0], float("nan"), *weights[2:]], -1.0, False, False)
    for shape in ((1, 2, 0, 4), (1, 2, 3, 0), (0, 2, 3, 4)):
        empty = torch.zeros(shape)
        with pytest.raises(RuntimeError, match="every dimension of z and y must be >= 1, got shapes"):
            torch.ops.repa_kernels.crepa(empty, empty, weights, -1.0, True, False)


@needs_extension
def test_opcheck():
    z, y = make_pair((2, 3, 5, 8), torch.float32, seed=7)
    weights = rk.CrepaOptions(distance=1).frame_weight_list(3)
    torch.library.opcheck(torch.ops.repa_kernels.crepa.default,
                          (z.requires_grad_(), y.requires_grad_(), weights, -1.0 / 6, True, True))
    torch.library.opcheck(torch.ops.repa_kernels.crepa.default, (z.detach(), y.detach(), weights, -1.0 / 6, False, False))
    # What torch.compile records: the hyper-parameters instead of the frame-weight table.
    torch.library.opcheck(cpp.crepa_traced, (z, y, 2, 0.5, True, True, True, True, True))
    torch.library.opcheck(cpp.crepa_traced, (z.detach(), y.detach(), 1, 1.0, False, False, False, False, False))


@needs_extension
@pytest.mark.slow
def test_torch_compile_fullgraph():
    z, y = make_pair((2, 3, 9, 16), torch.float32, seed=8)
    opts = rk.CrepaOptions(distance=2, cumulative=True)

    def objective(z, y):
        loss, alignment, similarity = cpp.crepa(z, y, opts)
        return 2.0 * loss, alignment, similarity

    compiled = torch.compile(objective, fullgraph=True)
    grads = []
    results = []
    for fn in (objective, compiled):
        zz, yy = z.clone().requires_grad_(), y.clone().requires_grad_()
        out = fn(zz, yy)
        out[0].backward()
        results.append(out)
        grads.append((zz.grad, yy.grad))
    for eager, traced in zip(results[0], results[1]):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)


# ---- huge and tiny magnitudes (docs/contract.md §2: norms must not overflow; tests/magnitudes.py) ---------------

def magnitude_pair(dtype, frames=3, seed=20):
    """(2, frames, S², 12) pairs with every pairing of token magnitudes (tests/magnitudes.py)."""
    return scale_tokens(*make_pair((2, frames, token_count(dtype), 12), torch.float64, seed), dtype)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_huge_and_tiny_magnitudes_match_the_float64_truth(dtype):
    z, y, z_scale, y_scale = magnitude_pair(dtype)
    opts = rk.CrepaOptions(distance=1, cumulative=True, normalize_neighbour_sum=True)
    check_against_reference(z, y, opts)
    kernel, kernel_dz, kernel_dy = run(z, y, opts, "cpp")
    _, ref_dz, ref_dy = run(z, y, opts, "reference")
    _, truth_dz, truth_dy = run(z.double(), y.double(), opts, "reference")
    assert torch.isfinite(kernel.loss) and torch.isfinite(kernel_dz).all() and torch.isfinite(kernel_dy).all()
    check_each_scale_group(kernel_dz, ref_dz, truth_dz, z_scale, dtype, "dz")
    check_each_scale_group(kernel_dy, ref_dy, truth_dy, y_scale, dtype, "dy")
    zero_z = z_scale * 12**0.5 * 6 < 1e-12  # |randn| < 6: ||z|| < 1e-12, a zero token
    assert zero_z.any() and (kernel_dz[:, :, zero_z] == 0).all()


@needs_extension
@pytest.mark.parametrize("dtype, z_shift, y_shift", [(torch.float32, 80, -38), (torch.bfloat16, -38, 80),
                                                     (torch.float64, 600, -36)], ids=str)
def test_power_of_two_scaling_gives_the_same_bits(dtype, z_shift, y_shift):
    """2^k z: rescaled rows (2^80 x squares past fp32's range; 2^-38 x is a real direction whose norm is
    below 2^-32) take the ordinary rows' arithmetic shifted by an exact power of two, so the cosines are
    the same bit for bit and the gradient is 2^-k times (the shifts keep every gradient entry normal)."""
    z, y = make_pair((2, 3, 20, 40), dtype, seed=21)
    weights = rk.CrepaOptions(distance=2, cumulative=True).frame_weight_list(3)
    plain = torch.ops.repa_kernels.crepa(z, y, weights, -0.2, True, True)
    shifted = torch.ops.repa_kernels.crepa(z * 2.0**z_shift, y * 2.0**y_shift, weights, -0.2, True, True)
    for field in range(3):
        assert torch.equal(plain[field], shifted[field]), field
    assert torch.equal(plain[3], shifted[3] * 2.0**z_shift)
    assert torch.equal(plain[4], shifted[4] * 2.0**y_shift)


@needs_extension
def test_huge_magnitudes_same_bits_for_one_and_two_threads():
    z, y, _, _ = magnitude_pair(torch.float32, frames=2, seed=22)
    opts = rk.CrepaOptions(distance=1)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(z, y, opts, "cpp")
        torch.set_num_threads(2)
        two = run(z, y, opts, "cpp")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0].loss, two[0].loss)
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])


# ---- extension loading: failures become a status, never a crash ----------------------------------

def test_csrc_holds_exactly_the_sources_both_builds_compile():
    csrc = cpp.find_sources(cpp.source_dir_candidates())
    assert csrc is not None, f"csrc/ not found in {cpp.source_dir_candidates()}"
    on_disk = {p.name for p in csrc.iterdir() if p.suffix in (".cpp", ".h")}
    assert on_disk == set(cpp.SOURCE_FILES)


def test_a_second_copy_is_never_loaded(tmp_path):
    if not AVAILABLE:
        pytest.skip(REASON)
    state = cpp.load_extension(prebuilt="repa_kernels._C", source_dirs=[tmp_path])
    assert state.loaded and state.how == "external" and "already registered" in state.reason


def test_missing_sources_give_a_reason_and_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(cpp, "ops_registered", lambda: False)
    state = cpp.load_extension(prebuilt="repa_kernels._not_built", source_dirs=[tmp_path])
    assert not state.loaded
    assert "were not found in" in state.reason and str(tmp_path) in state.reason
    assert "pip install --no-build-isolation" in state.reason


JIT_BUILD_SCRIPT = """
import sys, torch
import repa_kernels as rk
from repa_kernels.ops import cpp
state = cpp.load_extension(prebuilt=None, build_directory=sys.argv[1], name="repa_kernels_jit_for_test")
assert state.loaded and state.how == "jit", state.reason
cpp._state = state
cpp._register_python_parts()
z = torch.randn(2, 3, 37, 67, requires_grad=True)
y = torch.randn(2, 3, 37, 67)
kernel = rk.crepa_loss(z, y, impl="cpp").loss
kernel.backward()
dz = z.grad
z.grad = None
rk.crepa_loss(z, y, impl="reference").loss.backward()
torch.testing.assert_close(kernel, rk.crepa_loss(z, y, impl="reference").loss)
torch.testing.assert_close(dz, z.grad)
print("jit ok", torch.ops.repa_kernels.buffer_cache_stats()[0] > 0)
"""


def test_a_just_in_time_build_from_the_sources_loads_and_matches_the_reference(tmp_path):
    """The path of an install without the prebuilt module: compile csrc/ with cpp_extension.load in a fresh
    process (the ops cannot be registered twice in this one) and compute a loss and gradient with it."""
    if cpp.find_sources(cpp.source_dir_candidates()) is None:
        pytest.skip("csrc/ sources not found")
    completed = subprocess.run([sys.executable, "-c", JIT_BUILD_SCRIPT, str(tmp_path)], capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "jit ok True"


def test_failed_jit_build_gives_a_reason(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cpp, "ops_registered", lambda: False)
    sources = tmp_path / "csrc"
    sources.mkdir()
    for name in cpp.SOURCE_FILES:
        (sources / name).write_text("#error deliberately broken source for the test\n")
    with caplog.at_level(logging.WARNING, logger="repa_kernels.ops.cpp"):
        state = cpp.load_extension(prebuilt=None, source_dirs=[sources], build_directory=str(tmp_path),
                                   name="repa_kernels_broken_for_test")
    assert not state.loaded
    assert "just-in-time build" in state.reason and "failed" in state.reason
    assert "pip install --no-build-isolation" in state.reason
    assert any("building the C++ CPU kernels just in time" in r.message for r in caplog.records)


def test_unavailable_extension_impl_cpp_raises_and_auto_falls_back(monkeypatch):
    broken = cpp.ExtensionState(False, "extension missing for this test; build it with pip")
    monkeypatch.setattr(cpp, "_state", broken)
    monkeypatch.setattr(backends, "_warned", set())
    z, y = make_pair((1, 2, 3, 4), torch.float32)
    with pytest.raises(rk.BackendUnavailableError, match="extension missing for this test"):
        rk.crepa_loss(z, y, impl="cpp")
    with pytest.raises(rk.BackendUnavailableError, match="extension missing for this test"):
        cpp.crepa(z, y, rk.CrepaOptions())
    with pytest.warns(RuntimeWarning, match="extension missing for this test"):
        fallback = rk.crepa_loss(z, y, impl="auto")
    torch.testing.assert_close(fallback.loss, reference.crepa(z, y, rk.CrepaOptions())[0])
