"""Determinism: the same inputs give bitwise-equal losses, metrics and gradients.

Across two runs in one process (also after the heap was filled with NaN garbage, which exposes reads
of uninitialised accumulators), across a fresh process, and, for the C++ kernels, across thread counts
(the C++ kernels reduce in a fixed order). Checked for `impl="auto"` (what users get: cpp on CPU when the
extension loads) and for every explicit backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import repa_kernels as rk
from backend_params import impl_param

CPU = torch.device("cpu")


IMPLS = [impl_param(name) for name in ("auto", "reference", "cpp", "triton")]
# The interpreter is slow: Triton gets a smaller problem; the others one large enough for several threads.
SHAPES = {"triton": (2, 3, 24, 16)}
DEFAULT_SHAPE = (2, 6, 257, 96)
DTYPES = [torch.float32, torch.bfloat16]


def inputs(impl, dtype, seed=0):
    shape = SHAPES.get(impl, DEFAULT_SHAPE)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g).to(dtype)
    y = (torch.randn(*shape, generator=g) + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    z[0, 1, 3] = 0  # a zero token takes its own branch
    return z, y


def run_all(z, y, impl):
    """Every op, forward and backward (dz and dy), with neighbours in both modes: one flat dict."""
    z = z.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    adjacent = rk.crepa_loss(z, y, distance=2, tau=0.7, impl=impl)
    cumulative = rk.crepa_loss(z, y, distance=3, cumulative=True, normalize_neighbour_sum=True, impl=impl)
    urepa = rk.urepa_loss(z, y, manifold_weight=2.0, impl=impl)
    total = adjacent.loss + 0.5 * cumulative.loss + urepa.loss
    dz, dy = torch.autograd.grad(total, (z, y))
    out = {f"adjacent.{k}": v for k, v in adjacent._asdict().items()}
    out.update({f"cumulative.{k}": v for k, v in cumulative._asdict().items()})
    out.update({f"urepa.{k}": v for k, v in urepa._asdict().items()})
    out.update(dz=dz, dy=dy)
    return {k: v.detach() for k, v in out.items()}


def assert_bitwise_equal(first, second, what):
    assert first.keys() == second.keys()
    for key in first:
        a, b = first[key], second[key]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {key}"
        # Compare the bits, so that -0.0 vs 0.0 or two different NaN payloads would show too.
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), (
            f"{what}: {key} differs, max |diff| {(a.double() - b.double()).abs().max().item():.3e}")


def dirty_the_heap():
    """Allocate, fill with NaN and free many buffers of the sizes a kernel would allocate."""
    junk = [torch.full((size,), float("nan")) for size in (7, 64, 257, 1024, 4096, 24672, 148032) for _ in range(4)]
    junk += [torch.full((size,), float("nan"), dtype=torch.bfloat16) for size in (96, 24672, 148032)]
    del junk


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_two_runs_are_bitwise_equal(impl, dtype):
    z, y = inputs(impl, dtype)
    first = run_all(z, y, impl)
    dirty_the_heap()
    second = run_all(z, y, impl)
    assert_bitwise_equal(first, second, f"impl={impl} {dtype}")


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.values[0] in ("auto", "cpp")])
def test_thread_count_does_not_change_the_bits(impl):
    """The C++ reductions run in a fixed order, so 1 and 2 threads agree bitwise."""
    z, y = inputs(impl, torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(z, y, impl)
        torch.set_num_threads(2)
        two = run_all(z, y, impl)
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(one, two, f"impl={impl}, 1 vs 2 threads")


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    from test_reliability_determinism import inputs, run_all
    z, y = inputs(sys.argv[1], torch.float32, seed=2)
    torch.save(run_all(z, y, sys.argv[1]), sys.argv[2])
""")


@pytest.mark.slow
@pytest.mark.parametrize("impl", [IMPLS[0]])
def test_a_fresh_process_gives_the_same_bits(impl, tmp_path):
    z, y = inputs(impl, torch.float32, seed=2)
    here = run_all(z, y, impl)
    out = tmp_path / "result.pt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, impl, str(out), tests_dir], check=True, timeout=120,
                   cwd=os.path.dirname(tests_dir), env=dict(os.environ))
    assert_bitwise_equal(here, torch.load(out), f"impl={impl}, this process vs a fresh one")
