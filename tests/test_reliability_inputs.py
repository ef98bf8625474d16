"""Bad-input matrix over every public loss entry point and every available backend.

Each case either raises a clear error (the right type, a message naming the argument, the value and
what is valid) or gives a documented result (NaN/Inf propagate to the loss, docs/contract.md §2; a
distance past the clip is clamped; any memory layout computes the same loss as a contiguous copy).
The input checks are shared by all backends, so every backend must raise the same error; the
documented results are checked on every backend too, because that is where a kernel would differ
(strides, storage offsets, expanded tensors, inference mode).

Bad inputs to the regularizers and configs are in test_reliability_regularizer.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import repa_kernels as rk
from repa_kernels.options import CrepaOptions
from backend_params import impl_param

CPU = torch.device("cpu")


IMPLS = [impl_param(name) for name in ("reference", "cpp", "triton")]

# ---- entry points -------------------------------------------------------------------------------
# Each takes (z, y, impl, **options) and returns the scalar loss.

ENTRY_POINTS = {
    "crepa_loss": lambda z, y, impl, **kw: rk.crepa_loss(z, y, impl=impl, **kw).loss,
    "crepa_loss_with_options": lambda z, y, impl, **kw: rk.crepa_loss_with_options(z, y, CrepaOptions(**kw), impl=impl).loss,
    "manifold_loss": lambda z, y, impl, **kw: rk.manifold_loss(z, y, impl=impl, **kw),
    "urepa_loss": lambda z, y, impl, **kw: rk.urepa_loss(z, y, impl=impl, **kw).loss,
    "CrepaLoss": lambda z, y, impl, **kw: rk.CrepaLoss(impl=impl, **kw)(z, y),
    "CrepaLoss_metrics": lambda z, y, impl, **kw: rk.CrepaLoss(impl=impl, **kw)(z, y, return_metrics=True).loss,
    "ManifoldLoss": lambda z, y, impl, **kw: rk.ManifoldLoss(impl=impl, **kw)(z, y),
    "UrepaLoss": lambda z, y, impl, **kw: rk.UrepaLoss(impl=impl, **kw)(z, y),
}
COSINE_ENTRY_POINTS = ["crepa_loss", "crepa_loss_with_options", "CrepaLoss", "CrepaLoss_metrics"]
ALL_ENTRY_POINTS = list(ENTRY_POINTS)
# The entry points that need equal widths (the cosine term is part of U-REPA too).
SAME_WIDTH_ENTRY_POINTS = COSINE_ENTRY_POINTS + ["urepa_loss", "UrepaLoss"]
MANIFOLD_ONLY_ENTRY_POINTS = ["manifold_loss", "ManifoldLoss"]


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- bad tensors: an error for every entry point and backend --------------------------------------
# (id, z, y, error type, substrings the message must contain)

BAD_TENSORS = [
    ("z_0d", torch.tensor(1.0), randn(2, 3, 4), ValueError, ["z must be 3-D (B, N, D) or 4-D", "got 0-D"]),
    ("z_1d", randn(4), randn(2, 3, 4), ValueError, ["z must be 3-D", "got 1-D with shape (4,)"]),
    ("y_2d", randn(2, 3, 4), randn(3, 4), ValueError, ["y must be 3-D", "got 2-D with shape (3, 4)"]),
    ("y_5d", randn(1, 2, 3, 4), randn(1, 1, 2, 3, 4), ValueError, ["y must be 3-D", "got 5-D"]),
    ("batch_0", randn(0, 3, 4), randn(0, 3, 4), ValueError, ["z has an empty dimension", "(0, 3, 4)"]),
    ("frames_0", randn(2, 0, 3, 4), randn(2, 0, 3, 4), ValueError, ["z has an empty dimension", "(2, 0, 3, 4)"]),
    ("tokens_0", randn(2, 1, 0, 4), randn(2, 1, 0, 4), ValueError, ["empty dimension", "(2, 1, 0, 4)"]),
    ("width_0", randn(2, 3, 0), randn(2, 3, 0), ValueError, ["empty dimension", "(2, 3, 0)"]),
    ("y_tokens_0", randn(2, 3, 4), randn(2, 0, 4), ValueError, ["y has an empty dimension"]),
    ("int32", torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(2, 3, 4, dtype=torch.int32), TypeError,
     ["z has dtype torch.int32", "float16, bfloat16, float32 or float64"]),
    ("int64_y", randn(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.int64), TypeError, ["y has dtype torch.int64"]),
    ("bool", torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, 3, 4, dtype=torch.bool), TypeError,
     ["z has dtype torch.bool"]),
    ("uint8", torch.ones(2, 3, 4, dtype=torch.uint8), torch.ones(2, 3, 4, dtype=torch.uint8), TypeError,
     ["torch.uint8"]),
    ("complex128", randn(2, 3, 4).to(torch.complex128), randn(2, 3, 4).to(torch.complex128), TypeError,
     ["z has dtype torch.complex128"]),
    ("float8", randn(2, 3, 4).to(torch.float8_e4m3fn), randn(2, 3, 4).to(torch.float8_e4m3fn), TypeError,
     ["z has dtype torch.float8_e4m3fn"]),
    ("mixed_fp32_fp16", randn(2, 3, 4), randn(2, 3, 4, dtype=torch.float16), TypeError,
     ["same dtype", "z torch.float32 and y torch.float16"]),
    ("mixed_bf16_fp64", randn(2, 3, 4, dtype=torch.bfloat16), randn(2, 3, 4, dtype=torch.float64), TypeError,
     ["same dtype"]),
    ("mixed_devices", randn(2, 3, 4), torch.empty(2, 3, 4, device="meta"), ValueError,
     ["same device", "z on cpu and y on meta"]),
    ("z_none", None, randn(2, 3, 4), TypeError, ["z must be a torch.Tensor, got NoneType"]),
    ("z_numpy", np.zeros((2, 3, 4), dtype=np.float32), randn(2, 3, 4), TypeError, ["z must be a torch.Tensor, got ndarray"]),
    ("y_list", randn(2, 3, 4), [[[0.0] * 4] * 3] * 2, TypeError, ["y must be a torch.Tensor, got list"]),
    ("batch_mismatch", randn(2, 3, 4), randn(3, 3, 4), ValueError, ["(2, 3, 4)", "(3, 3, 4)"]),
    ("tokens_mismatch", randn(2, 2, 3, 4), randn(2, 2, 5, 4), ValueError, ["(2, 2, 3, 4)", "(2, 2, 5, 4)"]),
    ("frames_mismatch", randn(2, 2, 3, 4), randn(2, 4, 3, 4), ValueError, ["(2, 2, 3, 4)", "(2, 4, 3, 4)"]),
    ("rank_mismatch", randn(2, 3, 4), randn(2, 1, 3, 4), ValueError, ["(2, 3, 4)", "(2, 1, 3, 4)"]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", ALL_ENTRY_POINTS)
@pytest.mark.parametrize("case_id, z, y, error, fragments", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensors_raise_a_named_error(entry, impl, case_id, z, y, error, fragments):
    with pytest.raises(error) as info:
        ENTRY_POINTS[entry](z, y, impl)
    for fragment in fragments:
        assert fragment in str(info.value), f"{entry}/{impl}: {fragment!r} missing from: {info.value}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", SAME_WIDTH_ENTRY_POINTS)
def test_width_mismatch_is_an_error_for_the_cosine_term(entry, impl):
    with pytest.raises(ValueError, match=r"same shape, got z \(2, 3, 4\) and y \(2, 3, 5\)"):
        ENTRY_POINTS[entry](randn(2, 3, 4), randn(2, 3, 5), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", MANIFOLD_ONLY_ENTRY_POINTS)
def test_width_mismatch_is_allowed_for_the_manifold_term(entry, impl):
    z, y = randn(2, 2, 5, 3, seed=1), randn(2, 2, 5, 7, seed=2)
    loss = ENTRY_POINTS[entry](z, y, impl)
    expected = rk.manifold_loss(z, y, impl="reference")
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("entry", ["crepa_loss", "manifold_loss", "urepa_loss"])
def test_unsupported_device_is_an_error_naming_the_backend(entry, impl):
    """Meta tensors (as a stand-in for any device a kernel does not serve) never reach a kernel."""
    z, y = torch.empty(2, 3, 4, device="meta"), torch.empty(2, 3, 4, device="meta")
    with pytest.raises(rk.BackendUnavailableError, match=f"impl='{impl}' is not available for meta tensors"):
        ENTRY_POINTS[entry](z, y, impl)


# ---- bad options ---------------------------------------------------------------------------------
# (id, keyword arguments, error, substrings)

BAD_COSINE_OPTIONS = [
    ("distance_negative", dict(distance=-1), ValueError, ["distance must be an integer >= 0, got -1"]),
    ("distance_float", dict(distance=1.5), TypeError, ["distance must be an integer", "1.5"]),
    ("distance_str", dict(distance="1"), TypeError, ["distance must be an integer", "'1'"]),
    ("distance_none", dict(distance=None), TypeError, ["distance must be an integer", "None"]),
    ("distance_bool", dict(distance=True), TypeError, ["distance must be an integer", "True"]),
    ("tau_zero", dict(tau=0.0), ValueError, ["tau must be a finite number > 0, got 0.0"]),
    ("tau_negative", dict(tau=-2), ValueError, ["tau must be a finite number > 0, got -2"]),
    ("tau_nan", dict(tau=math.nan), ValueError, ["tau must be a finite number > 0, got nan"]),
    ("tau_inf", dict(tau=math.inf), ValueError, ["tau must be a finite number > 0, got inf"]),
    ("tau_str", dict(tau="1.0"), TypeError, ["tau must be a finite number", "'1.0'"]),
    ("tau_tensor", dict(tau=torch.tensor([1.0, 2.0])), TypeError, ["tau must be a finite number"]),
    ("cumulative_int", dict(cumulative=1), TypeError, ["cumulative must be a bool, got 1"]),
    ("cumulative_str", dict(cumulative="yes"), TypeError, ["cumulative must be a bool, got 'yes'"]),
    ("normalize_by_frames_none", dict(normalize_by_frames=None), TypeError, ["normalize_by_frames must be a bool"]),
    ("normalize_neighbour_sum_str", dict(normalize_neighbour_sum="true"), TypeError,
     ["normalize_neighbour_sum must be a bool"]),
    # numpy scalars and 0-d tensors: the type named as the user wrote it, and how to pass a tensor
    ("distance_numpy_bool", dict(distance=np.True_), TypeError, ["distance must be an integer", "np.True_ (numpy.bool)"]),
    ("distance_0d_tensor", dict(distance=torch.tensor(2)), TypeError,
     ["distance must be an integer >= 0, got tensor(2) (torch.Tensor)", "tensor.item()"]),
    ("tau_numpy_nan", dict(tau=np.float32("nan")), ValueError, ["tau must be a finite number > 0, got nan"]),
    ("tau_numpy_bool", dict(tau=np.False_), TypeError, ["tau must be a finite number > 0, got np.False_ (numpy.bool)"]),
    ("tau_0d_tensor", dict(tau=torch.tensor(0.5)), TypeError, ["tau must be a finite number > 0", "tensor.item()"]),
    ("cumulative_numpy_int", dict(cumulative=np.int64(1)), TypeError, ["cumulative must be a bool", "(numpy.int64)"]),
    ("cumulative_0d_tensor", dict(cumulative=torch.tensor(True)), TypeError,
     ["cumulative must be a bool, got tensor(True) (torch.Tensor)", "tensor.item()"]),
]

BAD_IMPLS = [
    ("impl_unknown", "gpu", ["impl='gpu' is not valid; valid: auto, triton, cpp, reference"]),
    ("impl_case", "Triton", ["impl='Triton' is not valid"]),
    ("impl_none", None, ["impl=None is not valid"]),
]


@pytest.mark.parametrize("entry", COSINE_ENTRY_POINTS)
@pytest.mark.parametrize("case_id, kwargs, error, fragments", BAD_COSINE_OPTIONS, ids=[c[0] for c in BAD_COSINE_OPTIONS])
def test_bad_cosine_options_raise_a_named_error(entry, case_id, kwargs, error, fragments):
    with pytest.raises(error) as info:
        ENTRY_POINTS[entry](randn(1, 2, 3, 4), randn(1, 2, 3, 4), "reference", **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{entry}: {fragment!r} missing from: {info.value}"


@pytest.mark.parametrize("entry", ALL_ENTRY_POINTS)
@pytest.mark.parametrize("case_id, impl, fragments", BAD_IMPLS, ids=[c[0] for c in BAD_IMPLS])
def test_bad_impl_raises_a_named_error(entry, case_id, impl, fragments):
    with pytest.raises(ValueError) as info:
        ENTRY_POINTS[entry](randn(1, 2, 3, 4), randn(1, 2, 3, 4), impl)
    for fragment in fragments:
        assert fragment in str(info.value), f"{entry}: {fragment!r} missing from: {info.value}"


BAD_WEIGHTS = [
    ("negative", -1.0, ValueError, "must be a finite number >= 0, got -1.0"),
    ("nan", math.nan, ValueError, "must be a finite number >= 0, got nan"),
    ("inf", math.inf, ValueError, "must be a finite number >= 0, got inf"),
    ("str", "3", TypeError, "must be a finite number >= 0, got '3' (str)"),
    ("bool", True, TypeError, "must be a finite number >= 0, got True (bool)"),
    ("none", None, TypeError, "must be a finite number >= 0, got None"),
    ("numpy_bool", np.True_, TypeError, "must be a finite number >= 0, got np.True_ (numpy.bool)"),
    ("numpy_inf", np.float32("inf"), ValueError, "must be a finite number >= 0, got inf"),
    ("tensor", torch.tensor(3.0), TypeError, "must be a finite number >= 0, got tensor(3.) (torch.Tensor)"),
]


@pytest.mark.parametrize("where", ["urepa_loss", "UrepaLoss", "ManifoldLoss"])
@pytest.mark.parametrize("case_id, value, error, fragment", BAD_WEIGHTS, ids=[c[0] for c in BAD_WEIGHTS])
def test_bad_loss_weights_raise_a_named_error(where, case_id, value, error, fragment):
    z, y = randn(1, 3, 4), randn(1, 3, 4)
    name = "weight" if where == "ManifoldLoss" else "manifold_weight"
    with pytest.raises(error) as info:
        if where == "urepa_loss":
            rk.urepa_loss(z, y, manifold_weight=value, impl="reference")
        elif where == "UrepaLoss":
            rk.UrepaLoss(manifold_weight=value)
        else:
            rk.ManifoldLoss(weight=value)
    assert f"{name} {fragment}" in str(info.value)


@pytest.mark.parametrize("entry", COSINE_ENTRY_POINTS)
def test_numpy_scalars_are_accepted_where_python_ones_are(entry):
    """np.bool_ wherever a bool is (a config read through numpy gives them), numpy integers and floats
    wherever numbers are: the same loss as the Python values."""
    z, y = randn(1, 3, 3, 4, seed=1), randn(1, 3, 3, 4, seed=2)
    python = dict(distance=2, tau=0.5, cumulative=True, normalize_by_frames=False, normalize_neighbour_sum=True)
    numpy = dict(distance=np.int64(2), tau=np.float32(0.5), cumulative=np.True_, normalize_by_frames=np.False_,
                 normalize_neighbour_sum=np.bool_(True))
    want = ENTRY_POINTS[entry](z, y, "reference", **python)
    assert torch.equal(ENTRY_POINTS[entry](z, y, "reference", **numpy), want)
    options = CrepaOptions(**numpy)
    assert options == CrepaOptions(**python) and type(options.cumulative) is bool


@pytest.mark.parametrize("where", ["urepa_loss", "UrepaLoss", "ManifoldLoss"])
def test_numpy_loss_weights_are_accepted(where):
    z, y = randn(1, 3, 4, seed=3), randn(1, 3, 4, seed=4)
    losses = []
    for weight in (2.0, np.float32(2.0), np.int64(2)):
        if where == "urepa_loss":
            losses.append(rk.urepa_loss(z, y, manifold_weight=weight, impl="reference").loss)
        elif where == "UrepaLoss":
            losses.append(rk.UrepaLoss(manifold_weight=weight, impl="reference")(z, y))
        else:
            losses.append(rk.ManifoldLoss(weight=weight, impl="reference")(z, y))
    assert all(torch.equal(loss, losses[0]) for loss in losses)


def test_crepa_options_must_be_crepa_options():
    with pytest.raises(TypeError, match="opts must be a repa_kernels.CrepaOptions, got dict"):
        rk.crepa_loss_with_options(randn(1, 2, 3, 4), randn(1, 2, 3, 4), {"distance": 1}, impl="reference")


# ---- documented results -------------------------------------------------------------------------

NON_FINITE = [("nan_z", "z", math.nan), ("inf_z", "z", math.inf), ("neg_inf_y", "y", -math.inf), ("nan_y", "y", math.nan)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", ALL_ENTRY_POINTS)
@pytest.mark.parametrize("case_id, where, value", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_inputs_propagate_to_the_loss(entry, impl, case_id, where, value):
    """Documented: NaN/Inf inside Z or Y give a NaN loss; no silent finite number, no crash."""
    z, y = randn(2, 3, 4, 8, seed=3), randn(2, 3, 4, 8, seed=4)
    (z if where == "z" else y)[1, 2, 3, 5] = value
    loss = ENTRY_POINTS[entry](z, y, impl)
    assert loss.dim() == 0 and torch.isnan(loss), f"{entry}/{impl}: loss {loss} for a {value} in {where}"


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_token_leaves_gradients_of_other_samples_finite(impl):
    """The NaN stays where it is: samples without one still get finite gradients (per-sample math)."""
    z, y = randn(2, 3, 4, 8, seed=3), randn(2, 3, 4, 8, seed=4)
    z[1, 2, 3, 5] = math.nan
    z.requires_grad_()
    (rk.crepa_loss(z, y, impl=impl).loss + rk.manifold_loss(z, y, impl=impl)).backward()
    assert torch.isfinite(z.grad[0]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cumulative", [False, True], ids=["adjacent", "cumulative"])
def test_distance_past_the_clip_is_clamped(impl, cumulative):
    z, y = randn(2, 3, 4, 5, seed=5), randn(2, 3, 4, 5, seed=6)
    at_clip = rk.crepa_loss(z, y, distance=2, cumulative=cumulative, impl=impl)
    for distance in (3, 10**12):
        far = rk.crepa_loss(z, y, distance=distance, cumulative=cumulative, impl=impl)
        assert torch.equal(far.loss, at_clip.loss) and torch.equal(far.alignment_score, at_clip.alignment_score)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_frame_and_single_token_and_width_one(impl):
    """Degenerate but valid shapes: T = 1 with a distance, N = 1, D = 1 all give the reference's values."""
    for shape, distance in (((3, 1, 4, 5), 4), ((2, 3, 1, 5), 1), ((2, 3, 4, 1), 2), ((1, 1, 1, 1), 1)):
        z, y = randn(*shape, seed=7), randn(*shape, seed=8)
        got = rk.crepa_loss(z, y, distance=distance, impl=impl)
        want = rk.crepa_loss(z, y, distance=distance, impl="reference")
        assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6), shape
        assert torch.allclose(rk.manifold_loss(z, y, impl=impl), rk.manifold_loss(z, y, impl="reference"),
                              rtol=1e-5, atol=1e-6), shape


def _layouts(shape, seed):
    """The same values as randn(*shape) in several memory layouts a trainer can hand over."""
    base = randn(*shape, seed=seed)
    b, t, n, d = shape
    yield "contiguous", base
    yield "transposed_channels", base.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield "frames_last", base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    padded = torch.zeros(b + 1, t, n + 2, d + 3)
    padded[1:, :, 1:n + 1, 2:d + 2] = base
    yield "storage_offset_and_padding", padded[1:, :, 1:n + 1, 2:d + 2]
    yield "every_other_token", torch.stack([base, torch.full_like(base, 9.0)], dim=3).reshape(b, t, n * 2, d)[:, :, 0::2]


@pytest.mark.parametrize("impl", IMPLS)
def test_any_memory_layout_gives_the_contiguous_result(impl):
    shape = (2, 3, 5, 6)
    z_ref, y_ref = randn(*shape, seed=9).requires_grad_(), randn(*shape, seed=10).requires_grad_()
    want = rk.crepa_loss(z_ref, y_ref, distance=1, impl=impl).loss + rk.manifold_loss(z_ref, y_ref, impl=impl)
    want.backward()
    for (z_name, z), (y_name, y) in zip(_layouts(shape, 9), _layouts(shape, 10)):
        assert torch.equal(z.detach(), z_ref.detach()) and torch.equal(y.detach(), y_ref.detach())
        z, y = z.detach().requires_grad_(), y.detach().requires_grad_()
        got = rk.crepa_loss(z, y, distance=1, impl=impl).loss + rk.manifold_loss(z, y, impl=impl)
        got.backward()
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (z_name, got.item(), want.item())
        assert torch.allclose(z.grad, z_ref.grad, rtol=1e-5, atol=1e-7), z_name
        assert torch.allclose(y.grad, y_ref.grad, rtol=1e-5, atol=1e-7), y_name


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_teacher_with_zero_strides(impl):
    """A teacher broadcast over frames (stride 0), e.g. one image's features for every frame."""
    z = randn(2, 4, 5, 6, seed=11).requires_grad_()
    one_frame = randn(2, 1, 5, 6, seed=12)
    expanded = one_frame.expand(2, 4, 5, 6)
    assert expanded.stride(1) == 0
    got = rk.crepa_loss(z, expanded, distance=1, impl=impl).loss + rk.manifold_loss(z, expanded, impl=impl)
    (dz,) = torch.autograd.grad(got, z)
    z2 = z.detach().clone().requires_grad_()
    want = rk.crepa_loss(z2, expanded.contiguous(), distance=1, impl="reference").loss \
        + rk.manifold_loss(z2, expanded.contiguous(), impl="reference")
    (dz2,) = torch.autograd.grad(want, z2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dz, dz2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_teacher_that_requires_grad_gets_the_summed_gradient(impl):
    one_frame = randn(1, 1, 3, 4, seed=13).requires_grad_()
    z = randn(1, 3, 3, 4, seed=14)
    rk.crepa_loss(z, one_frame.expand(1, 3, 3, 4), distance=1, impl=impl).loss.backward()
    one_ref = one_frame.detach().clone().requires_grad_()
    rk.crepa_loss(z, one_ref.expand(1, 3, 3, 4).contiguous(), distance=1, impl="reference").loss.backward()
    assert torch.allclose(one_frame.grad, one_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_losses_run_without_autograd(impl, context):
    z, y = randn(2, 2, 3, 4, seed=15), randn(2, 2, 3, 4, seed=16)
    want = rk.urepa_loss(z, y, impl="reference").loss
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        z_req = z.clone().requires_grad_() if context == "no_grad" else z.clone()
        got = rk.urepa_loss(z_req, y, impl=impl).loss
        crepa = rk.crepa_loss(z_req, y, distance=1, impl=impl).loss
    assert not got.requires_grad and not crepa.requires_grad
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_only_requires_grad(impl):
    """A trainable teacher and a frozen student: the gradient reaches y, and z has none."""
    z = randn(1, 3, 4, 5, seed=17)
    y = randn(1, 3, 4, 5, seed=18).requires_grad_()
    rk.urepa_loss(z, y, impl=impl).loss.backward()
    y_ref = y.detach().clone().requires_grad_()
    rk.urepa_loss(z, y_ref, impl="reference").loss.backward()
    assert z.grad is None
    assert torch.allclose(y.grad, y_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_requires_grad(impl):
    z, y = randn(1, 3, 4, 5, seed=19), randn(1, 3, 4, 5, seed=20)
    for loss in (rk.crepa_loss(z, y, impl=impl).loss, rk.manifold_loss(z, y, impl=impl),
                 rk.urepa_loss(z, y, impl=impl).loss):
        assert not loss.requires_grad and torch.isfinite(loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_made_under_inference_mode_with_a_trainable_student(impl):
    """A frozen teacher's features computed under torch.inference_mode() (as trainers do) and a trainable
    student: every backend gives the reference gradient, also on a second backward through a retained
    graph (which recomputes the kernels' gradient from the inputs the first backward kept)."""
    z = randn(2, 3, 4, 6, seed=21).requires_grad_()
    with torch.inference_mode():
        y = randn(2, 3, 4, 6, seed=22)
    assert y.is_inference()
    z_ref = z.detach().clone().requires_grad_()
    total = rk.crepa_loss(z, y, distance=1, impl=impl).loss + rk.urepa_loss(z, y, impl=impl).loss
    want = rk.crepa_loss(z_ref, y.clone(), distance=1, impl="reference").loss \
        + rk.urepa_loss(z_ref, y.clone(), impl="reference").loss
    total.backward(retain_graph=True)
    want.backward()
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-4, atol=1e-7)
    (2 * total).backward()
    assert torch.allclose(z.grad, 3 * z_ref.grad, rtol=1e-4, atol=1e-7)
