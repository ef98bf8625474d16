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

import repa_kernels as rk
from backend_params import impl_param


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
