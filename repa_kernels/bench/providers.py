"""Who computes a workload's loss: `reference` (eager PyTorch), `compiled` (the reference under
torch.compile), `cpp` and `triton` (through the functional API's `impl=`).

`loss_function(provider, workload)` returns `fn(z, y) -> scalar loss` on 4-D (B, T, N, D) tensors;
`availability(provider, workload, device)` says whether it can run there, and why not.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .. import backends, reference
from ..functional import crepa_loss_with_options, manifold_loss, urepa_loss
from ..options import CrepaOptions
from .workloads import Workload

PROVIDERS = ("reference", "compiled", "cpp", "triton")

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def availability(provider: str, workload: Workload, device: torch.device) -> tuple[bool, str]:
    """(True, what runs) or (False, why it is skipped)."""
    device = torch.device(device)
    if provider == "reference":
        return True, "eager PyTorch"
    if provider == "compiled":
        return _compile_status(device)
    if provider == "triton" and device.type == "cpu":
        return False, "Triton on CPU tensors is the interpreter (a debugging aid); never benchmarked"
    if provider in ("cpp", "triton"):
        return backends.status(provider, device)
    raise ValueError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")


def loss_function(provider: str, workload: Workload) -> LossFunction:
    """The loss of `workload` as computed by `provider` (call `availability` first)."""
    if provider == "compiled":
        return _compiled_reference(workload)
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")
    return functools.partial(_functional_loss, workload, provider)


def reference_loss(workload: Workload, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The workload's loss straight from `repa_kernels.reference` (no checks, no dispatch): what
    `compiled` hands to torch.compile."""
    if workload.op == "crepa":
        return reference.crepa(z, y, workload.options)[0]
    if workload.op == "manifold":
        return reference.manifold(z, y)
    alignment = reference.crepa(z, y, CrepaOptions(distance=0))[0]
    return alignment + workload.manifold_weight * reference.manifold(z, y)


def _functional_loss(workload: Workload, impl: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if workload.op == "crepa":
        return crepa_loss_with_options(z, y, workload.options, impl=impl).loss
    if workload.op == "manifold":
        return manifold_loss(z, y, impl=impl)
    return urepa_loss(z, y, manifold_weight=workload.manifold_weight, impl=impl).loss


# One compiled function per workload in a process: every mode reuses it (the inputs always require
# grad, so forward, backward and forward+backward run the same compiled graph), and each new
# compilation costs seconds.
@functools.lru_cache(maxsize=None)
def _compiled_reference(workload: Workload) -> LossFunction:
    return torch.compile(functools.partial(reference_loss, workload), dynamic=False)


def _compile_status(device: torch.device) -> tuple[bool, str]:
    try:
        import torch._inductor  # noqa: F401
    except Exception as exc:  # inductor is optional in some torch builds
        return False, f"torch.compile's inductor backend is not importable: {exc}"
    if device.type == "cpu":
        from torch._inductor import cpp_builder
        try:
            compiler = cpp_builder.get_cpp_compiler()
        except Exception as exc:
            return False, f"torch.compile on CPU needs a C++ compiler: {exc}"
        return True, f"torch.compile (inductor, {compiler})"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return False, f"torch.compile on CUDA needs triton: {exc}"
        return True, "torch.compile (inductor, Triton)"
    return False, f"torch.compile is not benchmarked on {device.type}"
