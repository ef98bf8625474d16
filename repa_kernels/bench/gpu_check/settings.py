"""What the GPU check runs, at two sizes: `gpu` (the benchmark shapes on a CUDA device) and `dry` (tiny
shapes on CPU under the Triton interpreter: every phase's plumbing, in well under two minutes).

Budgets (seconds) are sized so that phases install..workloads end within 5 minutes on the H200
(a 15-minute lease must hold the machine's start, a first run and a rerun of what failed); e2e, an
opt-in, has its own. Their estimates are in benchmarks/GPU_CHECK.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...ops.utils import ManifoldBlocks, TokenBlocks
from ..workloads import WORKLOADS, Workload

@dataclass(frozen=True)
class SweepClass:
    """One kernel on one workload class: the launch configurations tried, the mode that times the kernel."""

    kernel: str  # token | manifold_forward | manifold_backward (utils.forced_launch's keys)
    workload: Workload
    mode: str
    grid: tuple


@dataclass(frozen=True)
class CheckSettings:
    name: str
    device: str
    budgets: dict
    workloads: tuple  # timed and checked, in order of priority (the budget may cut the tail)
    correctness: tuple
    providers: tuple
    compiled_dtypes: tuple  # the compiled reference only for these (each variant compiles once)
    warmup: int
    min_repeats: int
    max_repeats: int
    test_keyword: str  # pytest -k for the tests phase ("" = every selected test)
    test_files: tuple | None  # None: every test file that mentions cuda
    test_workers: int  # pytest-xdist processes when installed (parallel Triton compiles)
    sweep: tuple
    e2e_preset: str
    e2e_steps: int
    e2e_warmup: int
    e2e_cases: tuple | None  # None: every case of bench.e2e.cases


def with_dtype(workload: Workload, dtype: str) -> Workload:
    if workload.dtype == dtype:
        return workload
    suffix = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    return dataclasses.replace(workload, name=f"{workload.name}-{suffix}", dtype=dtype)


def shrunk(workload: Workload) -> Workload:
    """The same op and options at a size the Triton interpreter runs in a fraction of a second."""
    width = 24 if workload.width_z == workload.width_y else 20
    return dataclasses.replace(workload, name=f"{workload.name}-dry", batch=min(workload.batch, 2),
                               frames=min(workload.frames, 3), tokens=min(workload.tokens, 20), width_z=24,
                               width_y=width)


GPU_WORKLOADS = tuple(w for w in WORKLOADS.values() if w.device_class == "gpu" and not w.ci)
_BF16 = tuple(with_dtype(w, "bfloat16") for w in GPU_WORKLOADS)
# fp32 after bf16 (the training dtype), and the byte-bound CREPA kernels before the manifold ones: fp32
# manifold accumulates in float64 without tensor cores (a correctness path), the slowest case by far.
_FP32 = tuple(sorted((with_dtype(w, "float32") for w in GPU_WORKLOADS), key=lambda w: w.op != "crepa"))


# Wide teachers: a Qwen2.5-VL-7B vision tower (3584) and a self-teacher on Wan-14B (5120) at the Wan 480p
# clip shape, bf16, timed after the six benchmark workloads (the budget may cut them; correctness first).
_WIDE = tuple(dataclasses.replace(WORKLOADS["crepa-wan480p"], name=f"crepa-wan480p-d{width}", width_z=width,
                                  width_y=width, description=f"crepa-wan480p with {width}-wide rows ({teacher})")
              for width, teacher in ((3584, "Qwen2.5-VL-7B vision tower"), (5120, "Wan-14B self-teacher")))


def _token(*configs) -> tuple:
    return tuple(TokenBlocks(*c) for c in configs)


def _manifold(*configs) -> tuple:
    return tuple(ManifoldBlocks(*c) for c in configs)


# The first of each grid is the current default (utils.token_blocks / manifold_blocks at that shape);
# the sweep also adds the default when it is not listed. Every configuration compiles for sm_90 under
# Triton 3.6 without spills (`--compile-grid`; spilling ones were dropped). A configuration is chosen
# only when it ran in every class of its kernel and dtype, so the classes of one kernel share a grid.
# Each costs a Triton compile (1-3 s) on the device: 4-5 per class fit the budget.
_TOKEN_HALF = _token((8, 256, 4), (16, 128, 4), (4, 512, 4), (8, 256, 8), (32, 64, 4))
GPU_SWEEP = (
    SweepClass("token", WORKLOADS["crepa-wan480p"], "forward+backward", _TOKEN_HALF),
    SweepClass("token", WORKLOADS["repa-sit"], "forward+backward", _TOKEN_HALF),
    SweepClass("manifold_forward", WORKLOADS["manifold-video"], "forward",
               _manifold((128, 128, 64, 64, 8, 3), (128, 128, 64, 64, 8, 2), (64, 64, 64, 64, 4, 3),
                         (64, 64, 128, 64, 4, 2))),
    SweepClass("manifold_backward", WORKLOADS["manifold-video"], "backward",
               _manifold((64, 64, 64, 128, 8, 2), (64, 64, 64, 128, 8, 3), (128, 64, 64, 64, 8, 2),
                         (64, 128, 64, 64, 8, 2))),
    SweepClass("token", with_dtype(WORKLOADS["crepa-wan480p"], "float32"), "forward+backward",
               _token((8, 128, 4), (16, 64, 4), (4, 256, 4), (8, 128, 8))),
    SweepClass("manifold_forward", with_dtype(WORKLOADS["manifold-video"], "float32"), "forward",
               _manifold((16, 16, 16, 32, 4, 1), (16, 16, 32, 32, 4, 1), (32, 32, 8, 32, 4, 1))),
    SweepClass("manifold_backward", with_dtype(WORKLOADS["manifold-video"], "float32"), "backward",
               _manifold((16, 16, 16, 32, 4, 1), (16, 32, 16, 32, 4, 1), (32, 16, 16, 32, 8, 1))),
)

GPU = CheckSettings(
    name="gpu", device="cuda",
    budgets=dict(install=15, tests=95, correctness=30, peaks=10, sweep=55, workloads=90, e2e=240),
    workloads=_BF16 + _WIDE + _FP32, correctness=_BF16 + _WIDE + _FP32,
    providers=("triton", "reference", "compiled"), compiled_dtypes=("bfloat16",),
    warmup=2, min_repeats=5, max_repeats=50, test_keyword="", test_files=None, test_workers=4,
    sweep=GPU_SWEEP, e2e_preset="wan-1.3b", e2e_steps=3, e2e_warmup=1, e2e_cases=None,
)

_DRY_WORKLOADS = tuple(shrunk(w) for w in GPU_WORKLOADS)

DRY = CheckSettings(
    name="dry", device="cpu",
    budgets=dict(install=30, tests=60, correctness=20, peaks=15, sweep=20, workloads=30, e2e=40),
    workloads=_DRY_WORKLOADS[:1] + _DRY_WORKLOADS[3:4],
    correctness=_DRY_WORKLOADS + tuple(with_dtype(w, "float32") for w in _DRY_WORKLOADS[:1] + _DRY_WORKLOADS[4:5]),
    providers=("triton", "reference"), compiled_dtypes=(),
    warmup=1, min_repeats=1, max_repeats=1, test_keyword="opcheck", test_files=("tests/test_triton_crepa.py",),
    test_workers=0,
    sweep=(
        SweepClass("token", _DRY_WORKLOADS[0], "forward+backward", _token((16, 16, 4))),
        SweepClass("manifold_forward", _DRY_WORKLOADS[4], "forward", _manifold((16, 16, 16, 16, 4, 1))),
        SweepClass("manifold_backward", _DRY_WORKLOADS[4], "backward", _manifold((16, 16, 16, 32, 4, 1))),
    ),
    e2e_preset="tiny", e2e_steps=1, e2e_warmup=0, e2e_cases=(("baseline", ""), ("backbone", "triton")),
)
