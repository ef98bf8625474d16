"""Count how often one regularizer call changes source file inside the package (a readability measure).

    PYTHONPATH=. python tools/trace_call_hops.py [--impl auto] [--path]

A `sys.setprofile` hook watches one `reg(latents=..., step=...)` call of a CrepaRegularizer on the tiny
Wan of tests/tiny_models.py (tiny Wan VAE, tiny Dinov2 encoder). Every Python call and return event is
mapped to the file of the package frame that runs after it (for a return: the caller's frame); frames
outside `repa_kernels/` (torch, diffusers, transformers) are skipped, so a hop is a move from one of the
package's files to another, as a reader following the call would make it. The call is traced after a
warm-up call, so module imports and one-time registrations are not counted.

Measured (default impl: the C++ backend on CPU), whole package / regularizer/ only (--within regularizer):
- before the regularizer was reshaped into model families, call inputs and teachers: 66 hops over 14
  files (crepa.py entered 19 times, base.py 13 times) / 50 hops over 9 files; with the kernel half of
  the later ops/ rework (saved_gradients.py): 70 hops over 15 files / the same 50 over 9;
- after (the call in base.forward, the grid in families.py, the teacher in teacher.py): 50 hops over
  17 files / 30 hops over 11 files (base.py entered 7 times, crepa.py 2). tests/test_call_hops.py
  keeps the regularizer's count at most 30.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class HopTrace:
    """The package files a call ran through, in order, each repeat of a file collapsed into one entry."""

    path: tuple[str, ...]

    @property
    def hops(self) -> int:
        """Changes of source file: one fewer than the entries of the path."""
        return max(0, len(self.path) - 1)

    @property
    def files(self) -> int:
        return len(set(self.path))

    def entries(self) -> Counter:
        """How many times each file is entered (the first entry counts)."""
        return Counter(self.path)


def trace_hops(call: Callable[[], object], package_dir: str) -> tuple[HopTrace, object]:
    """Run `call()` under a profile hook; returns (the trace over files under `package_dir`, its result)."""
    package_dir = os.path.abspath(package_dir) + os.sep
    path: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            filename = frame.f_code.co_filename
        elif event == "return":
            caller = frame.f_back
            if caller is None:
                return
            filename = caller.f_code.co_filename
        else:                   # c_call / c_return / c_exception: no Python frame changes
            return
        if filename.startswith(package_dir) and (not path or path[-1] != filename):
            path.append(filename)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(previous)
    relative = tuple(os.path.relpath(f, os.path.dirname(package_dir.rstrip(os.sep))) for f in path)
    return HopTrace(relative), result


def trace_tiny_wan_call(impl: str = "auto", within: str = "") -> HopTrace:
    """The trace of one `reg(latents=..., step=...)` call on the tiny Wan (after one warm-up call), over the
    package's files, or over those under its subfolder `within` (e.g. "regularizer")."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
    import torch

    import tiny_models as tm
    import repa_kernels
    from repa_kernels.regularizer import CrepaRegularizer

    transformer = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config(
        {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16},
        transformer=transformer, vae=tm.tiny_wan_vae(), encoder=tm.tiny_dinov2(), max_train_steps=1000, impl=impl)
    latents = torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    tm.tiny_forward(transformer, latents)
    reg(latents=latents, step=0)                         # warm-up: imports and op registration
    tm.tiny_forward(transformer, latents)
    trace, _ = trace_hops(lambda: reg(latents=latents, step=1),
                          os.path.join(os.path.dirname(repa_kernels.__file__), within))
    return trace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="auto", help="kernel backend of the traced call (default: auto)")
    parser.add_argument("--within", default="", help="count only files under this subfolder of the package "
                        "(e.g. regularizer); default: the whole package")
    parser.add_argument("--path", action="store_true", help="print the files in the order the call visits them")
    args = parser.parse_args(argv)
    trace = trace_tiny_wan_call(args.impl, args.within)
    print(f"{trace.hops} hops over {trace.files} files")
    for name, count in trace.entries().most_common():
        print(f"  {count:3d}  {name}")
    if args.path:
        print("path: " + " -> ".join(trace.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
