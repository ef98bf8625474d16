"""The C++ CPU kernels against the reference (eager and torch.compile), fp32, with the speed and memory goals.

    python benchmarks/cpu_kernels_speed.py [--rounds 7] [--out benchmarks/results/cpu_kernels_speed.csv]

Built on `repa_kernels.bench` (the workloads crepa-cpu, urepa-cpu and manifold-4k-cpu, the providers'
loss functions, the timing and the memory probe) and adds what `repa-kernels bench` does not: the
providers of a workload run interleaved, one call each per round, so that load from other processes
spreads over the providers compared, and the rows say whether the CPU kernels' goals (GOALS below) are met.

Time: one workload after the other (as in training, where the shapes repeat step after step); within a
workload every (provider, mode) case runs once per round after a warm-up call; median, p20, p80 and min
of the rounds; 2 torch threads. Memory: `measure.run_isolated` (peak RSS above the inputs in a fresh
process, the cpp backend's buffer cache emptied first), forward+backward only.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import statistics
from pathlib import Path

import torch

from repa_kernels.bench import measure
from repa_kernels.bench.cli import positive_int
from repa_kernels.bench.providers import loss_function
from repa_kernels.bench.workloads import get_workload
from repa_kernels.ops import cpp

THREADS = 2
WORKLOADS = ("crepa-cpu", "urepa-cpu", "manifold-4k-cpu")
PROVIDERS = ("cpp", "reference", "compiled")
MODES = ("forward", "forward+backward")
GOALS = {  # (workload, metric) -> (threshold, text)
    ("crepa-cpu", "speedup_vs_eager"): (3.0, ">= 3x faster than the eager reference"),
    ("crepa-cpu", "speedup_vs_compiled"): (1.5, ">= 1.5x faster than the compiled reference"),
    ("crepa-cpu", "memory_fraction_of_eager"): (1 / 3, "peak extra memory <= 1/3 of the eager reference's"),
    ("urepa-cpu", "speedup_vs_eager"): (1.5, ">= 1.5x faster than the eager reference"),
    ("manifold-4k-cpu", "peak_extra_mb"): (64.0, "peak extra memory < 64 MB"),
}
UPPER_BOUNDS = ("memory_fraction_of_eager", "peak_extra_mb")


def measure_memory() -> dict:
    """MB of peak extra memory of one forward+backward per (workload, provider), each in its own process."""
    memory = {}
    for name in WORKLOADS:
        for provider in PROVIDERS:
            (result,) = measure.run_isolated(get_workload(name), provider, ["forward+backward"], repeats=1, warmup=1)
            if result.status != "ok":
                raise SystemExit(f"{name} / {provider}: {result.reason}")
            memory[name, provider] = result.peak_extra_bytes / 2**20
    return memory


def measure_time(rounds: int) -> dict:
    """ms per call of every (workload, provider, mode), providers interleaved round by round."""
    times: dict = {}
    for name in WORKLOADS:
        workload = get_workload(name)
        z, y = workload.make_inputs("cpu")
        cases = [(provider, mode, loss_function(provider, workload)) for provider in PROVIDERS for mode in MODES]
        for provider, mode, fn in cases:
            measure.time_mode(fn, z, y, mode, repeats=1, warmup=1)  # compiles
        for _ in range(rounds):
            for provider, mode, fn in cases:
                gc.collect()
                (sample,) = measure.time_mode(fn, z, y, mode, repeats=1, warmup=0).samples_ms
                times.setdefault((name, provider, mode), []).append(sample)
    return times


def goal_columns(name: str, metrics: dict) -> tuple[str, str]:
    goals, met = [], []
    for (goal_workload, metric), (threshold, text) in GOALS.items():
        if goal_workload == name:
            value = metrics[metric]
            passed = value <= threshold if metric in UPPER_BOUNDS else value >= threshold
            goals.append(f"{text} (measured {value:.3g})")
            met.append("yes" if passed else "no")
    return "; ".join(goals), "/".join(met)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_kernels_speed.csv"))
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    ok, reason = cpp.status()
    if not ok:
        raise SystemExit(f"the C++ extension is unavailable: {reason}")

    load_before = os.getloadavg()[0]
    memory = measure_memory()
    times = measure_time(args.rounds)
    load_after = os.getloadavg()[0]

    medians = {key: statistics.median(values) for key, values in times.items()}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    notes = (f"2 cores shared with other jobs: load average {load_before:.1f} before, {load_after:.1f} after; "
             f"REPA_KERNELS_CPU_CACHE_MB={os.environ.get('REPA_KERNELS_CPU_CACHE_MB', 'unset')}; "
             f"{args.notes}").strip("; ")
    rows = []
    for (name, provider, mode), values in times.items():
        workload = get_workload(name)
        row = dict(workload=name, shape=workload.shape_text(), dtype=workload.dtype, provider=provider, mode=mode,
                   rounds=len(values), median_ms=round(medians[name, provider, mode], 2),
                   p20_ms=round(measure.percentile(values, 20), 2), p80_ms=round(measure.percentile(values, 80), 2),
                   min_ms=round(min(values), 2), peak_extra_mb="", speedup_vs_eager="", speedup_vs_compiled="",
                   goal="", goal_met="")
        if mode == "forward+backward":
            row["peak_extra_mb"] = round(memory[name, provider], 1)
        if provider == "cpp":
            row["speedup_vs_eager"] = round(medians[name, "reference", mode] / medians[name, provider, mode], 2)
            row["speedup_vs_compiled"] = round(medians[name, "compiled", mode] / medians[name, provider, mode], 2)
            if mode == "forward+backward":
                metrics = dict(speedup_vs_eager=row["speedup_vs_eager"], speedup_vs_compiled=row["speedup_vs_compiled"],
                               memory_fraction_of_eager=memory[name, "cpp"] / memory[name, "reference"],
                               peak_extra_mb=memory[name, "cpp"])
                row["goal"], row["goal_met"] = goal_columns(name, metrics)
        row.update(threads=THREADS, torch_version=torch.__version__, time=stamp,
                   memory_method=measure.RssMemoryProbe.method, notes=notes)
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
    raise SystemExit(main())
