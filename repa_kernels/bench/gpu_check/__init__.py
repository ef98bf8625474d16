"""The GPU check: everything a lent GPU must prove, in one command that fits a 15-minute lease.

    python -m repa_kernels.bench.gpu_check [--phases install,tests,...] [--e2e] [--out DIR]   # make gpu-check
    python -m repa_kernels.bench.gpu_check --dry                                              # make gpu-check-dry
    python -m repa_kernels.bench.gpu_check --write-defaults sweep.csv

Phases, in order (one module each): install (wheels the device image lacks), tests (the device tests
in a pytest subprocess), correctness (the kernels at the benchmark shapes against float64, outputs
NaN-poisoned), peaks (copy bandwidth, matmul rate), sweep (launch configurations), workloads (the
benchmark workloads, launched with the sweep's choice), e2e (opt-in: Wan2.1-1.3B training steps).
benchmarks/GPU_CHECK.md says what each measures, how to run it with the device tool and how to read
the results back.
"""
