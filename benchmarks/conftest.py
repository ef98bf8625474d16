"""pytest-benchmark suite settings: rounds, and which workloads may pay for a torch.compile.

Unlike tests/, nothing here turns on the Triton interpreter: on CPU the triton provider is skipped.
"""

import os

# On a small CPU machine inductor's pool of compile workers keeps importing torch in the background
# right after a compile, stealing the cores from the first timed calls.
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("REPA_KERNELS_IMPL", None)  # the providers choose backends explicitly

import pytest  # noqa: E402

# Each torch.compile of a new shape costs ~10-30 s on the 2-core CI machine: by default only these
# workloads benchmark the `compiled` provider (one CPU, one GPU); --bench-compiled=all lifts the cap.
COMPILED_BY_DEFAULT = ("crepa-cpu-ci", "crepa-wan480p")


def pytest_addoption(parser):
    group = parser.getgroup("repa_kernels benchmarks")
    group.addoption("--bench-rounds", type=int, default=3, help="timed rounds per benchmark (default 3)")
    group.addoption("--bench-compiled", choices=("none", "default", "all"), default="default",
                    help=f"which workloads benchmark torch.compile: none, default ({', '.join(COMPILED_BY_DEFAULT)}) "
                         "or all")
    group.addoption("--bench-full-cpu", action="store_true",
                    help="also run the full-size CPU workloads (crepa-cpu, urepa-cpu, manifold-4k-cpu); "
                         "by default only their reduced CI variants run")


@pytest.fixture(scope="session")
def bench_settings(request):
    rounds = request.config.getoption("--bench-rounds")
    if rounds < 1:
        raise pytest.UsageError(f"--bench-rounds must be >= 1, got {rounds}")
    return {
        "rounds": rounds,
        "compiled": request.config.getoption("--bench-compiled"),
        "full_cpu": request.config.getoption("--bench-full-cpu"),
        "compiled_by_default": COMPILED_BY_DEFAULT,
    }
