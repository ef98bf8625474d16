"""Launch configurations of the Triton kernels measured on a GPU, which replace the fixed defaults of
`utils.token_blocks` / `utils.manifold_blocks` for one kernel and input dtype.

Keys: (kernel, dtype name) with kernel "token" (CREPA and inverse norms: block_n, block_d, num_warps),
"manifold_forward" or "manifold_backward" (block_m, block_n, block_k, block_out, num_warps,
num_stages). Written by `python -m repa_kernels.bench.gpu_check --write-defaults sweep.csv` from the
sweep of a GPU check (benchmarks/GPU_CHECK.md), only for configurations that beat the default there.
Empty: no GPU sweep has found a configuration faster than the defaults yet.
"""

TUNED: dict[tuple[str, str], dict[str, int]] = {
}
