"""The C++ CPU backend (`impl="cpp"`): loads the extension and exposes `crepa`, `manifold`, `status`.

The kernels live in csrc/ and register the dispatcher ops `repa_kernels::crepa` and
`repa_kernels::manifold` (CPU). Loading, first success wins, once per process:
1. the prebuilt module `repa_kernels._C` (compiled by `pip install --no-build-isolation .`);
2. a just-in-time build of the csrc/ sources with `torch.utils.cpp_extension.load` (cached under
   torch's extension directory, so only the first use in an environment compiles; logged).
If both fail, `status()` says why and how to build it; `impl="auto"` then falls back to the reference.

The loss is a scalar, so the kernels form d loss / d z (and d y) in the forward pass when a gradient is
needed, and the backward only scales them by the upstream gradient (`saved_gradients`: the fake kernels
that make both ops opaque single nodes under `torch.compile(fullgraph=True)`, the autograd, and the
errors for second-order and forward-mode derivatives, which the saved gradient cannot give).

Large gradients and scratch buffers come from a small cache in the extension (csrc/buffer_cache.h):
freed ones are kept for the next call of the same shapes, which then skips the page faults of fresh
memory (on crepa-cpu these cost more than the kernel pass). `release_cached_buffers()` frees them;
REPA_KERNELS_CPU_CACHE_MB bounds the cache (default 2048, 0 turns it off).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..options import CrepaOptions
from . import saved_gradients
from .availability import BackendUnavailableError

logger = logging.getLogger(__name__)

PREBUILT_MODULE = "repa_kernels._C"
JIT_NAME = "repa_kernels_cpp"
# Compiler flags of both builds; setup.py reads these two lists from this file.
EXTRA_CFLAGS = ["-O3", "-fopenmp", "-g0"]  # -g0: Python's own CFLAGS add -g (6 MB of debug info)
EXTRA_LDFLAGS = ["-fopenmp"]
SOURCE_FILES = ("buffer_cache.h", "common.h", "module.h", "crepa_cosine.cpp", "manifold.cpp")
HOW_TO_BUILD = ("build it ahead of time with `pip install --no-build-isolation -e .` (or without -e) in an "
                "environment that has torch, a C++20 compiler and ninja; or use impl='reference'")


@dataclass
class ExtensionState:
    """How the extension was loaded (`how`: "prebuilt", "jit" or "external"), or why not (`reason`)."""

    loaded: bool
    reason: str
    how: str | None = None
    path: str | None = None
    build_seconds: float | None = None
    flags: list[str] = field(default_factory=list)


def source_dir_candidates() -> list[Path]:
    """Where the csrc/ sources may be: inside an installed package, or next to it in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    return [package / "csrc", package.parent / "csrc"]


def find_sources(directories: list[Path]) -> Path | None:
    for directory in directories:
        if all((directory / name).is_file() for name in SOURCE_FILES):
            return directory
    return None


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else "... " + text[-limit:]


def ops_registered() -> bool:
    return hasattr(torch.ops.repa_kernels, "crepa")


def load_extension(prebuilt: str | None = PREBUILT_MODULE, source_dirs: list[Path] | None = None,
                   build_directory: str | None = None, name: str = JIT_NAME) -> ExtensionState:
    """Import the prebuilt module, else build the sources just in time. Never raises."""
    if ops_registered():  # a second copy would register the ops twice, which aborts the process
        return ExtensionState(True, "the repa_kernels ops were already registered in this process by another "
                                    "copy of the extension (e.g. loaded with torch.ops.load_library)",
                              how="external")
    not_built = "the C++ extension is not built"
    if prebuilt is not None:
        try:
            module = importlib.import_module(prebuilt)
            return ExtensionState(True, f"prebuilt extension {prebuilt} ({module.__file__})", how="prebuilt",
                                  path=module.__file__, flags=list(EXTRA_CFLAGS))
        except ImportError as exc:
            not_built += f" (importing {prebuilt}: {_short(exc, 300)})"
    directories = source_dir_candidates() if source_dirs is None else list(source_dirs)
    sources = find_sources(directories)
    if sources is None:
        return ExtensionState(False, (
            f"{not_built} and its sources "
            f"({', '.join(SOURCE_FILES)}) were not found in {', '.join(str(d) for d in directories)}; "
            + HOW_TO_BUILD))
    flags = [*EXTRA_CFLAGS, "-DREPA_BUILD_KIND=jit"]
    logger.warning("repa_kernels: building the C++ CPU kernels just in time from %s (compiles on first use "
                   "in this environment, about 20-60 s on 2 cores; cached afterwards)", sources)
    started = time.perf_counter()
    try:
        from torch.utils import cpp_extension
        library = cpp_extension.load(
            name=name, sources=[str(sources / f) for f in SOURCE_FILES if f.endswith(".cpp")],
            extra_cflags=flags, extra_ldflags=list(EXTRA_LDFLAGS), extra_include_paths=[str(sources)],
            build_directory=build_directory, is_python_module=False, verbose=False)
    except Exception as exc:  # a failed build must become a status, not a crash
        return ExtensionState(False, (
            f"{not_built} and the just-in-time "
            f"build from {sources} failed: {_short(exc)}; " + HOW_TO_BUILD))
    seconds = time.perf_counter() - started
    path = getattr(library, "__file__", None) or str(library)
    logger.warning("repa_kernels: C++ CPU kernels ready (%.1f s)", seconds)
    return ExtensionState(True, f"extension built just in time from {sources} ({path})", how="jit", path=path,
                          build_seconds=seconds, flags=flags)


_state: ExtensionState | None = None
_lock = threading.Lock()


def extension() -> ExtensionState:
    """The process-wide extension state (loaded on first call)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                state = load_extension()
                if state.loaded:
                    _register_python_parts()
                _state = state
    return _state


def status() -> tuple[bool, str]:
    """(True, how it was loaded) or (False, why not and how to build it)."""
    state = extension()
    return state.loaded, state.reason


def build_info() -> dict[str, str]:
    """The facts the compiled library reports about itself (compiler, OpenMP, SIMD), empty if not loaded."""
    if not extension().loaded:
        return {}
    lines = torch.ops.repa_kernels.build_info().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def is_loaded() -> bool:
    """Whether the extension is loaded already (never starts loading or building it)."""
    return _state is not None and _state.loaded


def buffer_cache_stats() -> dict[str, int]:
    """The C++ buffer cache's figures: limit_bytes, cached_bytes, cached_blocks, hits, misses."""
    _require()
    values = torch.ops.repa_kernels.buffer_cache_stats()
    return dict(zip(("limit_bytes", "cached_bytes", "cached_blocks", "hits", "misses"), values))


def release_cached_buffers() -> int:
    """Frees the large gradient and scratch buffers the C++ kernels keep for reuse; returns the bytes.

    The kernels keep up to REPA_KERNELS_CPU_CACHE_MB (default 2048; 0 turns it off) of freed buffers
    so that the next call of the same shapes skips the page faults of fresh memory; a call with new
    shapes frees the old ones. Call this to give that memory back to the OS now."""
    _require()
    return int(torch.ops.repa_kernels.buffer_cache_release())


def _require() -> None:
    ok, reason = status()
    if not ok:
        raise BackendUnavailableError(f"impl='cpp' is not available: {reason}")


def _needs_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def crepa(z4: torch.Tensor, y4: torch.Tensor, opts: CrepaOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CREPA/REPA term on validated (B, T, N, D) CPU tensors: (loss, alignment_score, similarity_self)."""
    _require()
    saved_gradients.check_derivative_mode("cpp", z4, y4)
    need_dz, need_dy = _needs_grad(z4), _needs_grad(y4)
    if torch.compiler.is_compiling():
        distance = min(opts.distance, z4.shape[1] - 1)  # what offsets() clamps to; keeps a SymInt in range
        loss, alignment, self_similarity = saved_gradients.run(
            crepa_traced, "cpp", z4, y4, distance, opts.tau, opts.cumulative, opts.normalize_by_frames,
            opts.normalize_neighbour_sum, need_dz, need_dy)
    else:
        loss, alignment, self_similarity = saved_gradients.run(
            torch.ops.repa_kernels.crepa.default, "cpp", z4, y4, *_frame_arguments(z4, opts), need_dz, need_dy)
    return loss, alignment.detach(), self_similarity.detach()


def _frame_arguments(z4: torch.Tensor, opts: CrepaOptions) -> tuple[list[float], float]:
    """The frame-weight table and loss scale the C++ op takes, for z4's (B, T)."""
    batch, frames = z4.shape[:2]
    return opts.frame_weight_list(frames), -1.0 / opts.loss_divisor(batch, frames)


@torch.library.custom_op("repa_kernels::crepa_cpp_traced", mutates_args=())
def crepa_traced(z: torch.Tensor, y: torch.Tensor, distance: int, tau: float, cumulative: bool,
                 normalize_by_frames: bool, normalize_neighbour_sum: bool, need_dz: bool, need_dy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ crepa op with the hyper-parameters in place of its T x T frame-weight table: what
    torch.compile records, so that the frame count may stay symbolic (torch._dynamo.mark_dynamic or
    dynamic=True); the table is built here, where T is a number. Eager calls skip this layer (a Python
    op costs tens of microseconds)."""
    opts = CrepaOptions(distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum)
    return tuple(torch.ops.repa_kernels.crepa.default(z, y, *_frame_arguments(z, opts), need_dz, need_dy))


saved_gradients.register("repa_kernels::crepa_cpp_traced", "cpp")


def manifold(z4: torch.Tensor, y4: torch.Tensor) -> torch.Tensor:
    """Gram-difference manifold loss on validated (B, T, N, Dz) / (B, T, N, Dy) CPU tensors."""
    _require()
    saved_gradients.check_derivative_mode("cpp", z4, y4)
    (loss,) = saved_gradients.run(torch.ops.repa_kernels.manifold.default, "cpp", z4, y4, _needs_grad(z4),
                                  _needs_grad(y4))
    return loss


_registered = False


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    saved_gradients.register("repa_kernels::crepa", "cpp")
    saved_gradients.register("repa_kernels::manifold", "cpp")
    _registered = True
