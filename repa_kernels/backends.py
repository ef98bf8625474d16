"""Backend selection: the `impl=` switch of docs/contract.md §1.

Every backend module exposes
    crepa(z, y, opts: CrepaOptions) -> (loss, alignment_score, similarity_self)
    manifold(z, y) -> loss
on validated 4-D (B, T, N, D) tensors, differentiable to z and y.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, NamedTuple

import torch

from .ops.availability import BackendUnavailableError, triton_interpreter_enabled

ENV_VAR = "REPA_KERNELS_IMPL"
BACKENDS = ("triton", "cpp", "reference")
IMPL_CHOICES = ("auto",) + BACKENDS

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on `device`, and why not."""
    if device.type not in ("cuda", "cpu"):
        return False, f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), not {device.type}"
    if device.type == "cpu" and not triton_interpreter_enabled():
        return False, ("CPU tensors run Triton kernels only in the interpreter: set TRITON_INTERPRET=1 "
                       "before anything imports triton (slow; meant for tests)")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable ({exc}); install it with `pip install 'repa-kernels[triton]'`"
    try:
        ops("triton")
    except Exception as exc:  # an import error in our kernels must say what it is
        return False, f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    return True, "Triton interpreter" if triton_interpreter_enabled() else "compiled Triton kernels"


def cpp_status(device: torch.device) -> tuple[bool, str]:
    """Whether the C++ extension can run on `device`, and why not."""
    if device.type != "cpu":
        return False, f"the C++ kernels run on CPU tensors only, not {device.type}"
    try:
        module = importlib.import_module(".ops.cpp", __package__)
    except ImportError as exc:
        return False, f"the C++ backend module failed to import: {exc}"
    return module.status()


def status(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "triton":
        return triton_status(device)
    if name == "cpp":
        return cpp_status(device)
    if name == "reference":
        return True, "plain PyTorch"
    raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")


def _override() -> str | None:
    """REPA_KERNELS_IMPL when set (validated), else None."""
    override = os.environ.get(ENV_VAR)
    if override and override not in IMPL_CHOICES:
        raise ValueError(f"{ENV_VAR}={override!r} is not a valid impl; valid: {', '.join(IMPL_CHOICES)}")
    return override or None


def check_impl(impl: str) -> str:
    """`impl` as given, once it and any REPA_KERNELS_IMPL override are valid (a ValueError naming the value
    and the valid choices otherwise). Modules and regularizers call it when they are built, so a bad value
    fails there and not at the first call; the override still applies at call time (`requested_impl`)."""
    if not isinstance(impl, str) or impl not in IMPL_CHOICES:
        raise ValueError(f"impl={impl!r} is not valid; valid: {', '.join(IMPL_CHOICES)}")
    _override()
    return impl


def requested_impl(impl: str) -> str:
    """The impl that applies: REPA_KERNELS_IMPL when set, else `impl`; both validated."""
    check_impl(impl)
    return _override() or impl


def resolve(impl: str, device: torch.device) -> str:
    """The backend that runs for `impl` on `device`: auto picks triton on CUDA, cpp on CPU, else reference.

    Under torch.compile this runs once at trace time (availability checks import modules, which Dynamo
    cannot trace) and its answer is baked into the graph.
    """
    impl = requested_impl(impl)
    if impl != "auto":
        ok, reason = status(impl, device)
        if not ok:
            raise BackendUnavailableError(f"impl={impl!r} is not available for {device.type} tensors: {reason}")
        ops(impl)
        return impl
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    if preferred is None:
        return "reference"
    ok, reason = status(preferred, device)
    if ok and preferred == "triton" and triton_interpreter_enabled():  # docs/contract.md §1: never the interpreter
        ok, reason = False, ("TRITON_INTERPRET=1 would run the kernels in the interpreter; ask for "
                             "impl='triton' for that")
    if ok:
        ops(preferred)
        return preferred
    _warn_once(f"auto-{device.type}", f"repa_kernels: impl='auto' falls back to the reference path on "
                                      f"{device.type} because {preferred} is unavailable: {reason}")
    return "reference"


# What torch.compiler.assume_constant_result(resolve) does, without importing torch._dynamo (and with it
# triton) at package import: ~3 s, and triton would read TRITON_INTERPRET before a caller could set it.
# tests/test_reliability_compile.py fails if a torch release stops honouring the flag.
resolve._dynamo_marked_constant = True


class BackendOps(NamedTuple):
    crepa: Callable
    manifold: Callable


def _load(name: str) -> BackendOps:
    if name == "reference":
        from . import reference
        return BackendOps(reference.crepa, reference.manifold)
    if name == "triton":
        from .ops import crepa_triton, manifold_triton
        return BackendOps(crepa_triton.crepa, manifold_triton.manifold)
    if name == "cpp":
        from .ops import cpp
        return BackendOps(cpp.crepa, cpp.manifold)
    raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")


_ops_cache: dict[str, BackendOps] = {}


def ops(name: str) -> BackendOps:
    """The backend's functions; `resolve` has loaded the module already, so this is a dict lookup."""
    if name not in _ops_cache:
        _ops_cache[name] = _load(name)
    return _ops_cache[name]
