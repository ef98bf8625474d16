"""Compile a Triton op's kernels for sm_90 without a GPU (the interpreter never compiles the GPU path),
in a clean process without TRITON_INTERPRET, so compile errors and register spills show up here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_toolchain_available() -> bool:
    import triton
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


needs_cuda_toolchain = pytest.mark.skipif(not cuda_toolchain_available(),
                                          reason="Triton's NVIDIA backend tools are not installed")


def compile_reports(module: str) -> tuple[list[dict], list[dict]]:
    """`repa_kernels.ops.<module>.cuda_compile_reports` for bf16 and fp32, as dicts."""
    code = ("import dataclasses, json, torch\n"
            f"from repa_kernels.ops import {module}\n"
            "for dtype in (torch.bfloat16, torch.float32):\n"
            f"    print(json.dumps([dataclasses.asdict(r) for r in {module}.cuda_compile_reports(dtype)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPOSITORY, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    bf16, fp32 = (json.loads(line) for line in done.stdout.strip().splitlines())
    return bf16, fp32
