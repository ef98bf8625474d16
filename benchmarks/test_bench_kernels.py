"""pytest-benchmark suite over the docs/contract.md §8 workloads: workloads x providers x modes.

    pytest benchmarks                              # 3 timed rounds each
    pytest benchmarks --benchmark-disable          # each case once (a smoke run)
    pytest benchmarks --bench-compiled=all --bench-full-cpu --bench-rounds 10

GPU workloads skip without a CUDA device; the triton provider skips on CPU (the interpreter is never
benchmarked); cpp skips off CPU or when the extension cannot build. Each case also checks that the
loss is finite and that backward produced a gradient, so a broken provider fails instead of timing
nothing. `repa-kernels bench` measures the same cases with peak memory and bounds.
"""

import math

import pytest
import torch

from repa_kernels.bench.providers import PROVIDERS, availability, loss_function
from repa_kernels.bench.workloads import MODES, WORKLOADS

HAS_CUDA = torch.cuda.is_available()


def _device_for(workload):
    return torch.device("cuda" if workload.device_class == "gpu" else "cpu")


def _skip_reason(workload, provider, settings):
    if workload.device_class == "gpu" and not HAS_CUDA:
        return "GPU workload: no CUDA device"
    if workload.device_class == "cpu" and not workload.ci and not settings["full_cpu"]:
        return "full-size CPU workload: pass --bench-full-cpu (its CI variant runs by default)"
    if provider == "compiled":
        if settings["compiled"] == "none":
            return "torch.compile disabled by --bench-compiled=none"
        capped = settings["compiled_by_default"]
        if settings["compiled"] == "default" and workload.name not in capped:
            return f"torch.compile capped to {', '.join(capped)}; pass --bench-compiled=all"
    ok, reason = availability(provider, workload, _device_for(workload))
    return None if ok else reason


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", list(WORKLOADS.values()), ids=list(WORKLOADS))
def test_kernel(benchmark, bench_settings, workload, provider, mode):
    reason = _skip_reason(workload, provider, bench_settings)
    if reason:
        pytest.skip(reason)
    device = _device_for(workload)
    z, y = workload.make_inputs(device)
    fn = loss_function(provider, workload)
    losses = []

    def forward():
        z.grad = None
        loss = fn(z, y)
        _sync(device)
        losses.append(loss.detach())  # read after the timed calls

    def forward_backward():
        z.grad = None
        loss = fn(z, y)
        loss.backward()
        _sync(device)
        losses.append(loss.detach())  # read after the timed calls

    def setup_backward():
        z.grad = None
        loss = fn(z, y)
        _sync(device)
        losses.append(loss.detach())  # read after the timed calls
        return (loss,), {}

    def backward(loss):
        loss.backward()
        _sync(device)

    benchmark.group = workload.name
    benchmark.extra_info.update(shape=workload.shape_text(), dtype=workload.dtype, mode=mode,
                                bytes_moved=workload.bytes_moved(mode), flops=workload.flops(mode))
    if mode == "forward":
        benchmark.pedantic(forward, rounds=bench_settings["rounds"], warmup_rounds=1)
    elif mode == "backward":
        benchmark.pedantic(backward, setup=setup_backward, rounds=bench_settings["rounds"], warmup_rounds=1)
    else:
        benchmark.pedantic(forward_backward, rounds=bench_settings["rounds"], warmup_rounds=1)

    assert losses and all(math.isfinite(float(value)) for value in losses), losses
    if mode != "forward":
        assert z.grad is not None and bool(torch.isfinite(z.grad).all())
