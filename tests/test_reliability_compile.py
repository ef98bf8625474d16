"""torch.compile(fullgraph=True) over the losses.

A function that calls every loss (functional API and modules, both ops, gradients to Z and Y) compiles
as one graph with the default Inductor backend for each backend: the reference, the C++ ops and the
Triton ops (under the interpreter on CPU, compiled kernels on CUDA), and gives the same values and
gradients as the same backend in eager mode (the reference with the aot_eager backend: see below). Each case costs ~10-20 s of compilation here, so there
are few of them.

The regularizer attached to a compiled tiny transformer is in test_reliability_regularizer.py.
"""

from __future__ import annotations

import pytest
import torch

import torch._dynamo.testing

import repa_kernels as rk
from backend_params import impl_param

CPU = torch.device("cpu")


CASES = [impl_param(name, "cpu") for name in ("reference", "cpp", "triton")]
if torch.cuda.is_available():
    CASES.append(impl_param("triton", "cuda"))


def make_objective(impl):
    crepa_module = rk.CrepaLoss(distance=2, tau=0.5, cumulative=True, normalize_neighbour_sum=True, impl=impl)
    manifold_module = rk.ManifoldLoss(weight=0.5, impl=impl)

    def objective(z, y):
        adjacent = rk.crepa_loss(z, y, distance=1, impl=impl)
        urepa = rk.urepa_loss(z, y, manifold_weight=3.0, impl=impl)
        total = adjacent.loss + crepa_module(z, y) + urepa.loss + manifold_module(z, y)
        return total, adjacent.alignment_score, adjacent.similarity_self, urepa.manifold
    return objective


def values_and_grads(fn, z, y):
    z = z.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_(y.requires_grad)
    outputs = fn(z, y)
    wrt = (z, y) if y.requires_grad else (z,)
    grads = torch.autograd.grad(2.0 * outputs[0], wrt)  # a non-unit upstream gradient
    return [o.detach() for o in outputs], list(grads)


@pytest.mark.slow
@pytest.mark.parametrize("impl, device", CASES)
def test_fullgraph_compile_matches_eager(impl, device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 6, 8, generator=g).to(device)
    y = torch.randn(2, 3, 6, 8, generator=g).to(device)
    objective = make_objective(impl)
    # Inductor (the default) for the kernels, as users run them. The reference is plain PyTorch whose
    # Inductor compile takes 30-80 s here; aot_eager still traces it fully (Dynamo + AOTAutograd).
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager" if impl == "reference" else "inductor")

    for y_requires_grad in (True, False):  # the second call recompiles for the frozen-teacher case
        y.requires_grad_(y_requires_grad)
        eager_out, eager_grads = values_and_grads(objective, z, y)
        compiled_out, compiled_grads = values_and_grads(compiled, z, y)
        for name, a, b in zip(("total", "alignment_score", "similarity_self", "manifold"), compiled_out, eager_out):
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-7), (name, a.item(), b.item())
        assert len(compiled_grads) == (2 if y_requires_grad else 1)
        for name, a, b in zip(("dz", "dy"), compiled_grads, eager_grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (name, (a - b).abs().max().item())



def crepa_and_urepa(impl, tau=0.5, manifold_weight=2.0):
    # The hyper-parameters are closure variables, as in a training script: with dynamic=True Dynamo
    # traces such floats as symbols, so the option checks see symbolic values.
    def objective(z, y):
        crepa = rk.crepa_loss(z, y, distance=2, tau=tau, cumulative=True, impl=impl)
        return crepa.loss + rk.urepa_loss(z, y, manifold_weight=manifold_weight, impl=impl).loss, crepa.alignment_score
    return objective


def check_matches_eager(compiled, eager, shape, seed, mark_frames_dynamic=False):
    g = torch.Generator().manual_seed(seed)
    z, y = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    results = []
    for fn in (compiled, eager):
        leaf = z.clone().requires_grad_()
        if mark_frames_dynamic:
            torch._dynamo.mark_dynamic(leaf, 1)
            torch._dynamo.mark_dynamic(y, 1)
        loss, alignment = fn(leaf, y)
        (2.0 * loss).backward()
        results.append((loss.detach(), alignment, leaf.grad))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", [impl_param(name) for name in ("reference", "cpp", "triton")])
def test_dynamic_shapes_compile(impl):
    """fullgraph=True with dynamic=True: the option checks trace (no math.isfinite), and one graph gives
    the eager values for a new batch size and token count. aot_eager: Dynamo and AOTAutograd trace
    everything, without Inductor's code generation time."""
    torch._dynamo.reset()
    objective = crepa_and_urepa(impl)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(objective, fullgraph=True, dynamic=True, backend=counter)
    check_matches_eager(compiled, objective, (2, 3, 4, 8), seed=0)
    compiles = counter.frame_count
    check_matches_eager(compiled, objective, (3, 3, 6, 8), seed=1)
    assert counter.frame_count == compiles, "a new batch size and token count recompiled"


def test_a_dynamic_frame_dimension_on_the_cpp_backend():
    """torch._dynamo.mark_dynamic on T: the traced C++ op takes the hyper-parameters, not a T x T table,
    so T stays symbolic (marking it raises if anything specialises it) and one graph serves every T."""
    if not rk.backends.status("cpp", CPU)[0]:
        pytest.skip("the C++ extension is not available")
    torch._dynamo.reset()
    objective = crepa_and_urepa("cpp")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(objective, fullgraph=True, backend=counter)
    check_matches_eager(compiled, objective, (2, 3, 4, 8), seed=0, mark_frames_dynamic=True)
    compiles = counter.frame_count
    for seed, frames in enumerate((5, 6), start=1):
        check_matches_eager(compiled, objective, (2, frames, 4, 8), seed, mark_frames_dynamic=True)
    assert counter.frame_count == compiles, "a new frame count recompiled"
