"""Issue 4 figures: the C++ CPU kernels against the reference (eager and torch.compile), fp32.

    python benchmarks/cpu_kernels_issue4.py [--rounds 7] [--out benchmarks/results/cpu_kernels_issue4.csv]

Time: one workload after the other (as in training, where the shapes repeat step after step); within
a workload every (provider, mode) case runs once per round, rounds interleaved so that load from other
processes spreads over the providers compared; median, p20, p80 and min of the rounds; 2 torch threads.
Memory: peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS just before one
forward+backward, after a warm-up call, in a fresh subprocess per case; the inputs are allocated before,
and the cpp backend's cache of freed buffers is emptied before, so its gradient buffers count.
The reference under torch.compile compiles `reference.crepa` / `reference.manifold` directly.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import repa_kernels as rk
from repa_kernels import reference
from repa_kernels.ops import cpp

THREADS = 2
WORKLOADS = {
    "crepa-cpu": dict(shape=(1, 13, 1024, 768), label="B=1 T=13 N=1024 D=768 d=1", kind="crepa"),
    "urepa-cpu": dict(shape=(4, 1024, 768), label="B=4 N=1024 D=768 manifold+align", kind="urepa"),
    "manifold-n4096": dict(shape=(1, 4096, 384), label="B=1 N=4096 D=384", kind="manifold"),
}
PROVIDERS = ("cpp", "reference", "reference-compiled")
MODES = ("forward", "forward+backward")
GOALS = {  # (workload, metric) -> (threshold, text)
    ("crepa-cpu", "speedup_vs_eager"): (3.0, ">= 3x faster than the eager reference"),
    ("crepa-cpu", "speedup_vs_compiled"): (1.5, ">= 1.5x faster than the compiled reference"),
    ("crepa-cpu", "memory_fraction_of_eager"): (1 / 3, "peak extra memory <= 1/3 of the eager reference's"),
    ("urepa-cpu", "speedup_vs_eager"): (1.5, ">= 1.5x faster than the eager reference"),
    ("manifold-n4096", "peak_extra_mb"): (64.0, "peak extra memory < 64 MB"),
}


def make_inputs(workload: str):
    generator = torch.Generator().manual_seed(0)
    shape = WORKLOADS[workload]["shape"]
    return torch.randn(shape, generator=generator).requires_grad_(), torch.randn(shape, generator=generator)


def objective(workload: str, provider: str):
    kind = WORKLOADS[workload]["kind"]
    if provider == "reference-compiled":
        def as4(t):
            return t if t.dim() == 4 else t.unsqueeze(1)
        if kind == "crepa":
            return torch.compile(lambda z, y: reference.crepa(as4(z), as4(y), rk.CrepaOptions())[0])
        if kind == "manifold":
            return torch.compile(lambda z, y: reference.manifold(as4(z), as4(y)))
        return torch.compile(lambda z, y: reference.crepa(as4(z), as4(y), rk.CrepaOptions(distance=0))[0]
                             + 3.0 * reference.manifold(as4(z), as4(y)))
    impl = "cpp" if provider == "cpp" else "reference"
    if kind == "crepa":
        return lambda z, y: rk.crepa_loss(z, y, distance=1, impl=impl).loss
    if kind == "manifold":
        return lambda z, y: rk.manifold_loss(z, y, impl=impl)
    return lambda z, y: rk.urepa_loss(z, y, impl=impl).loss


def step(fn, z, y, mode: str) -> None:
    z.grad = None
    if mode == "forward":
        with torch.no_grad():
            fn(z, y)
    else:
        fn(z, y).backward()


def read_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(workload: str, provider: str) -> float:
    """Run in its own process: MB of peak RSS above the RSS before one forward+backward."""
    z, y = make_inputs(workload)
    fn = objective(workload, provider)
    step(fn, z, y, "forward+backward")
    z.grad = None
    gc.collect()
    cpp.release_cached_buffers()
    before = read_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(fn, z, y, "forward+backward")
    return (read_kb("VmHWM:") - before) / 1024


def measure_time(rounds: int) -> dict:
    times: dict = {}
    for workload in WORKLOADS:
        z, y = make_inputs(workload)
        cases = []
        for provider in PROVIDERS:
            fn = objective(workload, provider)
            for mode in MODES:
                step(fn, z, y, mode)  # warm-up, compiles
                cases.append((provider, mode, fn))
        for _ in range(rounds):
            for provider, mode, fn in cases:
                gc.collect()
                start = time.perf_counter()
                step(fn, z, y, mode)
                times.setdefault((workload, provider, mode), []).append((time.perf_counter() - start) * 1e3)
    return times


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_kernels_issue4.csv"))
    parser.add_argument("--memory-case", nargs=2, metavar=("WORKLOAD", "PROVIDER"), help=argparse.SUPPRESS)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    ok, reason = cpp.status()
    if not ok:
        raise SystemExit(f"the C++ extension is unavailable: {reason}")
    if args.memory_case:
        print(json.dumps(measure_memory(*args.memory_case)))
        return 0

    load_before = os.getloadavg()[0]
    memory = {}
    for workload in WORKLOADS:
        for provider in PROVIDERS:
            done = subprocess.run([sys.executable, __file__, "--memory-case", workload, provider],
                                  capture_output=True, text=True, check=True)
            memory[workload, provider] = json.loads(done.stdout.strip().splitlines()[-1])
    times = measure_time(args.rounds)
    load_after = os.getloadavg()[0]

    medians = {key: sorted(values)[len(values) // 2] for key, values in times.items()}
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    notes = (f"2 cores shared with other jobs: load average {load_before:.1f} before, {load_after:.1f} after; "
             f"REPA_KERNELS_CPU_CACHE_MB={os.environ.get('REPA_KERNELS_CPU_CACHE_MB', 'unset')}; "
             f"{args.notes}").strip("; ")
    for (workload, provider, mode), values in times.items():
        values = sorted(values)
        row = dict(workload=workload, shape=WORKLOADS[workload]["label"], dtype="float32", provider=provider,
                   mode=mode, rounds=len(values), median_ms=round(medians[workload, provider, mode], 2),
                   p20_ms=round(percentile(values, 0.2), 2), p80_ms=round(percentile(values, 0.8), 2),
                   min_ms=round(values[0], 2), peak_extra_mb="", speedup_vs_eager="", speedup_vs_compiled="",
                   goal="", goal_met="")
        if mode == "forward+backward":
            row["peak_extra_mb"] = round(memory[workload, provider], 1)
        if provider == "cpp":
            eager = medians[workload, "reference", mode]
            compiled = medians[workload, "reference-compiled", mode]
            row["speedup_vs_eager"] = round(eager / medians[workload, provider, mode], 2)
            row["speedup_vs_compiled"] = round(compiled / medians[workload, provider, mode], 2)
            if mode == "forward+backward":
                metrics = dict(speedup_vs_eager=row["speedup_vs_eager"], speedup_vs_compiled=row["speedup_vs_compiled"],
                               memory_fraction_of_eager=memory[workload, "cpp"] / memory[workload, "reference"],
                               peak_extra_mb=memory[workload, "cpp"])
                goals, met = [], []
                for (goal_workload, metric), (threshold, text) in GOALS.items():
                    if goal_workload != workload:
                        continue
                    value = metrics[metric]
                    passed = value <= threshold if metric in ("memory_fraction_of_eager", "peak_extra_mb") \
                        else value >= threshold
                    goals.append(f"{text} (measured {value:.3g})")
                    met.append("yes" if passed else "no")
                row["goal"], row["goal_met"] = "; ".join(goals), "/".join(met)
        row.update(threads=THREADS, torch_version=torch.__version__, time=stamp,
                   memory_method="peak RSS (VmHWM) above the RSS before one fwd+bwd, own subprocess", notes=notes)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    with args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print({k: row[k] for k in ("workload", "provider", "mode", "median_ms", "peak_extra_mb", "speedup_vs_eager",
                                   "speedup_vs_compiled", "goal_met")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
