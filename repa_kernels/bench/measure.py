"""Timing, peak memory and the device's measured peaks.

Time: `repeats` timed calls after `warmup` untimed ones; median, p20 and p80 in ms. CUDA times with
events between synchronisations; CPU with perf_counter.
  forward            loss = fn(z, y) with z requiring grad (as in training), no backward
  backward           loss.backward() alone; the forward runs before each call, outside the timed region
  forward+backward   fn(z, y).backward()

Peak extra memory: the highest memory above a baseline that holds only the inputs (and the
process's libraries), over a mode's timed calls; for `backward` that includes the forward it needs.
  CUDA: torch.cuda.max_memory_allocated() above memory_allocated() with the inputs alive.
  CPU:  each (workload, provider) runs in its own subprocess (`run_isolated`); its peak RSS (VmHWM)
        is reset through /proc/self/clear_refs after warm-up and read after the timed calls, above the
        RSS at the reset. The cpp backend's cache of freed buffers is emptied before the reset, so a
        provider's peak includes every buffer it needs. glibc is told to return every block >= 64 KiB
        to the OS on free (MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS and cannot hide a later
        peak.

Device peaks (`device_peaks`): copy bandwidth from a large device-to-device copy (bytes read +
written), matmul throughput from a square matmul in the workload dtype; the best of a few runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .workloads import MODES, Workload

# Blocks this large or larger are mmapped and returned to the OS on free (bytes).
MALLOC_MMAP_THRESHOLD = 65536


@dataclass
class ModeResult:
    """One provider's figures for one mode of one workload."""

    mode: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    samples_ms: list[float] = field(default_factory=list)
    peak_extra_bytes: int | None = None
    memory_method: str = ""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None

    @property
    def p20_ms(self) -> float | None:
        return percentile(self.samples_ms, 20) if self.samples_ms else None

    @property
    def p80_ms(self) -> float | None:
        return percentile(self.samples_ms, 80) if self.samples_ms else None


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of a non-empty list."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- memory probes --------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} line")


def can_reset_peak_rss() -> bool:
    """Whether this kernel lets a process reset its peak RSS (writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class CudaMemoryProbe:
    method = "torch.cuda.max_memory_allocated above the inputs"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.baseline


class RssMemoryProbe:
    """Peak RSS of this process above its RSS at `start` (meant for an isolated worker process)."""

    method = "peak RSS (VmHWM) above the inputs, own subprocess"

    def start(self) -> None:
        # The cpp backend keeps freed large buffers for reuse: give them back first, so that the
        # baseline holds only the inputs and the buffers a call needs count towards its peak.
        release_cached_cpu_buffers()
        if not can_reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs")
        self.baseline_kib = _proc_status_kib("VmRSS")

    def stop(self) -> int:
        return (_proc_status_kib("VmHWM") - self.baseline_kib) * 1024


class NoMemoryProbe:
    """CPU memory in a shared process cannot be measured honestly: reported as absent."""

    method = "not measured (CPU run in the calling process)"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        return None


def release_cached_cpu_buffers() -> int:
    """Bytes freed from the cpp backend's buffer cache (0 when the extension was not loaded)."""
    from ..ops import cpp

    return cpp.release_cached_buffers() if cpp.is_loaded() else 0


def memory_probe(device: torch.device, isolated: bool):
    if device.type == "cuda":
        return CudaMemoryProbe(device)
    return RssMemoryProbe() if isolated else NoMemoryProbe()


# --- timing ---------------------------------------------------------------------------------------
class _Timer:
    """Elapsed ms of a region: CUDA events on a CUDA device, perf_counter otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return (time.perf_counter() - self.t0) * 1e3


def _one_call(fn: Callable, z: torch.Tensor, y: torch.Tensor, mode: str, timer: _Timer) -> float:
    z.grad = None
    if mode == "forward":
        timer.start()
        loss = fn(z, y)
        elapsed = timer.stop()
    elif mode == "backward":
        loss = fn(z, y)
        timer.start()
        loss.backward()
        elapsed = timer.stop()
    elif mode == "forward+backward":
        timer.start()
        loss = fn(z, y)
        loss.backward()
        elapsed = timer.stop()
    else:
        raise ValueError(f"mode={mode!r} is not valid; valid: {', '.join(MODES)}")
    del loss
    z.grad = None
    return elapsed


def time_mode(fn: Callable, z: torch.Tensor, y: torch.Tensor, mode: str, *, repeats: int, warmup: int,
              probe=None) -> ModeResult:
    """Warm up, then time `repeats` calls of `mode` while `probe` tracks the peak memory."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    probe = probe or NoMemoryProbe()
    timer = _Timer(z.device)
    for _ in range(warmup):
        _one_call(fn, z, y, mode, timer)
    probe.start()
    samples = [_one_call(fn, z, y, mode, timer) for _ in range(repeats)]
    peak = probe.stop()
    return ModeResult(mode, samples_ms=samples, peak_extra_bytes=peak, memory_method=probe.method)


def run_modes(workload: Workload, provider: str, device: torch.device, modes: list[str], *,
              repeats: int, warmup: int, isolated: bool = False, seed: int = 0) -> list[ModeResult]:
    """Every mode of one (workload, provider) in this process; a failure marks the remaining modes."""
    from .providers import loss_function

    device = torch.device(device)
    z, y = workload.make_inputs(device, seed)
    probe = memory_probe(device, isolated)
    results = []
    try:
        fn = loss_function(provider, workload)
        for mode in modes:
            results.append(time_mode(fn, z, y, mode, repeats=repeats, warmup=warmup, probe=probe))
    except Exception as exc:  # a backend that fails is a result to report, not a crash of the whole run
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        done = {r.mode for r in results}
        results += [ModeResult(m, status="failed", reason=reason) for m in modes if m not in done]
    return results


# --- CPU isolation: one subprocess per (workload, provider) ---------------------------------------
def run_worker(module: str, request: dict, timeout_s: float):
    """`python -m <module> <request as JSON>` in a fresh process set up for honest CPU figures; returns
    (the JSON of its last stdout line, "") or (None, why it failed)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD))
    env.pop("TRITON_INTERPRET", None)
    # inductor's pool of compile workers would keep importing torch in the background right after the
    # compile, stealing CPU from the first timed calls
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        completed = subprocess.run([sys.executable, "-m", module, json.dumps(request)], capture_output=True,
                                   text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"worker timed out after {timeout_s:.0f} s"
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return None, f"worker exited {completed.returncode}: {tail}"
    return json.loads(lines[-1]), ""


def run_isolated(workload: Workload, provider: str, modes: list[str], *, repeats: int, warmup: int,
                 seed: int = 0, timeout_s: float = 3600.0) -> list[ModeResult]:
    """run_modes on CPU in a fresh subprocess, so its peak RSS belongs to this provider alone.

    When the kernel cannot reset peak RSS, each mode gets its own process instead (warm-up then
    counts towards the peak, which the memory_method says)."""
    batches = [modes] if can_reset_peak_rss() else [[m] for m in modes]
    results = []
    for batch in batches:
        request = {"workload": workload.to_dict(), "provider": provider, "modes": batch,
                   "repeats": repeats, "warmup": warmup, "seed": seed}
        items, failure = run_worker("repa_kernels.bench.measure", request, timeout_s)
        if items is None:
            results += [ModeResult(m, status="failed", reason=failure) for m in batch]
        else:
            results += [ModeResult(**item) for item in items]
    return results


def _worker(request_json: str) -> int:
    request = json.loads(request_json)
    workload = Workload.from_dict(request["workload"])
    results = run_modes(workload, request["provider"], torch.device("cpu"), request["modes"],
                        repeats=request["repeats"], warmup=request["warmup"], isolated=True,
                        seed=request["seed"])
    print(json.dumps([asdict(r) for r in results]))
    return 0


# --- device peaks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePeaks:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    dtype: str


def best_peaks(first: DevicePeaks, second: DevicePeaks) -> DevicePeaks:
    """The higher of two measurements of each peak (a bound must not be slowed by a busy moment)."""
    return DevicePeaks(max(first.copy_bytes_per_s, second.copy_bytes_per_s),
                       max(first.matmul_flops_per_s, second.matmul_flops_per_s), first.dtype)


def _best_ms(action: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    timer = _Timer(device)
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        timer.start()
        action()
        times.append(timer.stop())
    return min(times)


def device_peaks(device: torch.device, dtype: torch.dtype) -> DevicePeaks:
    """Measured copy bandwidth (bytes/s) and matmul throughput (FLOP/s, in `dtype`) of `device`."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    # the copied buffers are several times any CPU's last-level cache per core complex
    copy_bytes = (1 << 30) if cuda else (128 << 20)
    source = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_ms = _best_ms(lambda: target.copy_(source), device, repeats=10 if cuda else 4, warmup=2)
    del source, target
    size = 8192 if cuda else 1536
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    matmul_ms = _best_ms(lambda: torch.mm(a, b), device, repeats=10 if cuda else 5, warmup=1)
    return DevicePeaks(copy_bytes_per_s=2 * copy_bytes / (copy_ms * 1e-3),
                       matmul_flops_per_s=2 * size ** 3 / (matmul_ms * 1e-3),
                       dtype=str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
