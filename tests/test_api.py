"""Functional API, nn.Module wrappers, backend switch and the input checks shared by every backend."""

import warnings

import pytest
import torch

import repa_kernels as rk
from repa_kernels import backends


def pair(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)


# ---- input checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [
    lambda z, y: rk.crepa_loss(z, y, impl="reference"),
    lambda z, y: rk.manifold_loss(z, y, impl="reference"),
    lambda z, y: rk.urepa_loss(z, y, impl="reference"),
], ids=["crepa", "manifold", "urepa"])
@pytest.mark.parametrize("z, y, error, message", [
    (torch.randn(2, 3), torch.randn(2, 3), ValueError, "3-D (B, N, D) or 4-D"),
    (torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 5), ValueError, "got 5-D"),
    (torch.randn(2, 0, 4), torch.randn(2, 0, 4), ValueError, "empty dimension"),
    (torch.randn(2, 3, 0, 4), torch.randn(2, 3, 0, 4), ValueError, "empty dimension"),
    (torch.randint(0, 3, (2, 3, 4)), torch.randint(0, 3, (2, 3, 4)), TypeError, "torch.int64"),
    (torch.randn(2, 3, 4, dtype=torch.complex64), torch.randn(2, 3, 4, dtype=torch.complex64), TypeError, "complex64"),
    (torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64), TypeError, "same dtype"),
    (torch.randn(2, 3, 4), [[1.0]], TypeError, "y must be a torch.Tensor"),
    (torch.randn(2, 3, 4), torch.randn(2, 5, 4), ValueError, "z (2, 3, 4) and y (2, 5, 4)"),
    (torch.randn(2, 3, 4), torch.randn(2, 1, 3, 4), ValueError, "y (2, 1, 3, 4)"),
    (torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta"), ValueError, "same device"),
])
def test_bad_inputs_are_named(fn, z, y, error, message):
    with pytest.raises(error, match=None) as info:
        fn(z, y)
    assert message in str(info.value)


def test_cosine_needs_equal_widths_manifold_does_not():
    z, y = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match="same shape"):
        rk.crepa_loss(z, y, impl="reference")
    assert torch.isfinite(rk.manifold_loss(z, y, impl="reference"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(distance=-1), ValueError, "distance must be an integer >= 0, got -1"),
    (dict(distance=1.5), TypeError, "distance must be an integer"),
    (dict(distance=True), TypeError, "distance must be an integer"),
    (dict(tau=0.0), ValueError, "tau must be a finite number > 0, got 0.0"),
    (dict(tau=float("inf")), ValueError, "tau must be a finite number > 0"),
    (dict(tau="1"), TypeError, "tau must be a finite number"),
    (dict(cumulative=1), TypeError, "cumulative must be a bool"),
    (dict(impl="cuda"), ValueError, "impl='cuda' is not valid; valid: auto, triton, cpp, reference"),
])
def test_bad_options(kwargs, error, message):
    z, y = pair(1, 2, 3, 4)
    with pytest.raises(error) as info:
        rk.crepa_loss(z, y, **{"impl": "reference", **kwargs})
    assert message in str(info.value)


def test_bad_manifold_weight():
    z, y = pair(1, 3, 4)
    with pytest.raises(ValueError, match="manifold_weight must be a finite number >= 0, got -1"):
        rk.urepa_loss(z, y, manifold_weight=-1)
    with pytest.raises(ValueError, match="manifold_weight"):
        rk.UrepaLoss(manifold_weight=float("nan"))
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        rk.ManifoldLoss(weight=-0.5)


# ---- backend switch -----------------------------------------------------------------------------

def test_env_var_overrides_impl(monkeypatch):
    z, y = pair(1, 2, 3, 4)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="REPA_KERNELS_IMPL='bogus' is not a valid impl"):
        rk.crepa_loss(z, y, impl="reference")
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("cpp", torch.device("cpu")) == "reference"


def test_auto_never_picks_the_triton_interpreter():
    # conftest sets TRITON_INTERPRET=1 when there is no GPU; auto must still not choose it for CPU.
    assert backends.resolve("auto", torch.device("cpu")) in ("cpp", "reference")


def test_auto_never_picks_the_triton_interpreter_for_cuda_either(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1 would run the kernels in the interpreter"):
        assert backends.resolve("auto", torch.device("cuda")) == "reference"
    assert backends.triton_status(torch.device("cuda")) == (True, "Triton interpreter")


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y = pair(1, 2, 3, 4)
    with pytest.raises(rk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        rk.crepa_loss(z, y, impl="triton")
    with pytest.raises(rk.BackendUnavailableError, match="CPU tensors only"):
        backends.resolve("cpp", torch.device("meta"))


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "cpp_status", lambda device: (False, "extension missing for this test"))
    monkeypatch.setattr(backends, "_warned", set())
    z, y = pair(1, 2, 3, 4)
    with pytest.warns(RuntimeWarning, match="extension missing for this test"):
        expected = rk.crepa_loss(z, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = rk.crepa_loss(z, y)
    assert torch.equal(expected.loss, again.loss)
    assert torch.equal(expected.loss, rk.crepa_loss(z, y, impl="reference").loss)


# ---- modules ------------------------------------------------------------------------------------

def test_modules_are_drop_in():
    z, y = pair(2, 3, 5, 4)
    z.requires_grad_()
    loss = rk.CrepaLoss(distance=2, tau=0.5, cumulative=True, impl="reference")(z, y)
    assert loss.dim() == 0
    expected = rk.crepa_loss(z, y, distance=2, tau=0.5, cumulative=True, impl="reference")
    assert torch.equal(loss, expected.loss)
    result = rk.CrepaLoss(distance=2, tau=0.5, cumulative=True, impl="reference")(z, y, return_metrics=True)
    assert isinstance(result, rk.CrepaResult) and torch.equal(result.alignment_score, expected.alignment_score)
    loss.backward()
    assert z.grad.shape == z.shape

    manifold = rk.ManifoldLoss(weight=2.0, impl="reference")(z, y)
    assert torch.allclose(manifold, 2.0 * rk.manifold_loss(z, y, impl="reference"))
    urepa = rk.UrepaLoss(manifold_weight=1.5, impl="reference")
    assert torch.equal(urepa(z, y), rk.urepa_loss(z, y, manifold_weight=1.5, impl="reference").loss)
    assert isinstance(urepa(z, y, return_metrics=True), rk.UrepaResult)


def test_module_constructor_validates():
    with pytest.raises(ValueError, match="distance"):
        rk.CrepaLoss(distance=-2)
    with pytest.raises(ValueError, match="tau"):
        rk.CrepaLoss(tau=-1.0)
    with pytest.raises(ValueError, match="impl='fast'"):
        rk.CrepaLoss(impl="fast")
    assert "distance=3" in repr(rk.CrepaLoss(distance=3))


def test_reference_compiles_fullgraph():
    z, y = pair(2, 3, 5, 4)
    fn = torch.compile(lambda a, b: rk.crepa_loss(a, b, impl="reference").loss, fullgraph=True, backend="eager")
    assert torch.allclose(fn(z, y), rk.crepa_loss(z, y, impl="reference").loss)
