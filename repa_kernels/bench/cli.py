"""`repa-kernels bench`: the docs/contract.md §8 workloads outside pytest, written as CSV, PNG plots and a table.

    repa-kernels bench [--workload NAME ...] [--device cpu|cuda] [--out DIR] [--modes ...]
                       [--providers ...] [--repeats N] [--warmup N] [--list]

Files: <out>/<device>-<model>.csv, <out>/<device>-<model>-time.png, <out>/<device>-<model>-memory.png.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

from .. import __version__
from . import measure, report
from .providers import PROVIDERS, availability
from .workloads import DTYPES, MODES, WORKLOADS, default_workloads, get_workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", nargs="+", metavar="NAME", choices=list(WORKLOADS),
                        help="workloads to run (default: the full-size ones of the device's class); "
                             f"choices: {', '.join(WORKLOADS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: all")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None, help="default: all")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls per mode (default 10)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls per mode (default 2)")
    parser.add_argument("--name", default=None,
                        help="file name prefix (default: <device>-<model>, e.g. cpu-amd-epyc)")
    parser.add_argument("--notes", default="", help="free text added to the CSV's notes column")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (and OMP_NUM_THREADS of the worker processes); default: "
                             "torch's. On a small shared machine --threads 1 steadies tiny models")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--e2e", action="store_true",
                        help="instead of the kernel workloads, time training steps of a diffusers Wan transformer "
                             "with and without CREPA (encoder and backbone mode); --repeats = timed steps")
    parser.add_argument("--e2e-preset", choices=("tiny", "wan-1.3b"), default=None,
                        help="model sizes for --e2e (default: tiny on CPU, wan-1.3b on CUDA)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def check_combination(args: argparse.Namespace) -> str | None:
    """Why the options do not go together, or None. --e2e times whole training steps of its preset, so
    the kernel-workload options would be silently ignored there."""
    if args.e2e:
        ignored = [f"--{name}" for name in ("workload", "modes", "providers") if getattr(args, name) is not None]
        if ignored:
            return f"{', '.join(ignored)} select kernel workloads; --e2e times training steps of its preset instead"
    elif args.e2e_preset is not None:
        return f"--e2e-preset {args.e2e_preset} needs --e2e"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_combination(args)
    if problem is not None:
        print(f"repa-kernels bench: {problem}", file=sys.stderr)
        return 2
    args.modes = args.modes or list(MODES)
    args.providers = args.providers or list(PROVIDERS)
    if args.list:
        for workload in WORKLOADS.values():
            tag = " (CI size)" if workload.ci else ""
            print(f"{workload.name:18s} {workload.device_class}  {workload.op:8s} {workload.dtype:9s} "
                  f"{workload.shape_text()}{tag}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("repa-kernels bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the worker subprocesses' torch
        torch.set_num_threads(args.threads)
    context = run_context(device, args.notes)
    prefix = args.out / (args.name or file_prefix(device, context["device_name"]))
    if args.e2e:
        return run_e2e(args, device, context, prefix)
    workloads = [get_workload(name) for name in args.workload] if args.workload else default_workloads(device.type)

    from tqdm import tqdm

    print(f"measuring the peaks of {context['device_name']} ...", file=sys.stderr)
    peaks = {dtype: measure.device_peaks(device, DTYPES[dtype])
             for dtype in dict.fromkeys(w.dtype for w in workloads)}
    measured = []
    tasks = [(w, p) for w in workloads for p in args.providers]
    with tqdm(tasks, desc="bench", unit="case", file=sys.stderr) as progress:
        for workload, provider in progress:
            progress.set_postfix_str(f"{workload.name} / {provider}")
            results = measure_case(workload, provider, device, args)
            measured += [(workload, provider, result) for result in results]
            if any(r.status == "ok" for r in results):
                # a busy moment depresses a measurement of the peaks: the bounds use the best of all,
                # sampled between cases so they see the machine in the same states as the cases
                peaks = {dtype: measure.best_peaks(peak, measure.device_peaks(device, DTYPES[dtype]))
                         for dtype, peak in peaks.items()}
    rows = [report.make_row(workload, provider, result, peaks[workload.dtype], context)
            for workload, provider, result in measured]
    csv_path = Path(f"{prefix}.csv")
    report.write_csv(rows, csv_path)
    plots = report.write_plots(rows, prefix)
    print(report.format_table(rows))
    for dtype, peak in peaks.items():
        print(f"{context['device_name']} peaks ({dtype}): copy {peak.copy_bytes_per_s / 1e9:.1f} GB/s, "
              f"matmul {peak.matmul_flops_per_s / 1e9:.1f} GFLOP/s")
    print("wrote " + ", ".join(str(p) for p in [csv_path, *plots]))
    return 0


def run_e2e(args, device: torch.device, context: dict, prefix: Path) -> int:
    from tqdm import tqdm

    from . import e2e

    preset = e2e.PRESETS[args.e2e_preset or ("wan-1.3b" if device.type == "cuda" else "tiny")]
    if preset.device_class != ("gpu" if device.type == "cuda" else "cpu"):
        print(f"repa-kernels bench: --e2e-preset {preset.name} is sized for a {preset.device_class}, not "
              f"{device.type}", file=sys.stderr)
        return 2
    with tqdm(total=len(e2e.cases(device)), desc=f"e2e {preset.name}", unit="config", file=sys.stderr) as progress:
        results = e2e.run_all(preset, device, steps=args.repeats, warmup=args.warmup, progress=progress)
    rows = e2e.result_rows(preset, results, context)
    csv_path = Path(f"{prefix}-e2e.csv")
    plot_path = Path(f"{prefix}-e2e.png")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, csv_path, e2e.E2E_COLUMNS)
    e2e.write_plot(rows, plot_path)
    print(f"{preset.name}: {preset.description}; latents {tuple(preset.latent_shape)}")
    print(e2e.format_rows(rows))
    print(f"wrote {csv_path}, {plot_path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def measure_case(workload, provider: str, device: torch.device, args) -> list[measure.ModeResult]:
    ok, reason = availability(provider, workload, device)
    if not ok:
        return [measure.ModeResult(mode, status="skipped", reason=reason) for mode in args.modes]
    if device.type == "cpu":
        return measure.run_isolated(workload, provider, args.modes, repeats=args.repeats, warmup=args.warmup)
    return measure.run_modes(workload, provider, device, args.modes, repeats=args.repeats, warmup=args.warmup)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def file_prefix(device: torch.device, name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}" if slug else device.type


def source_revision() -> str:
    """`git describe --always --dirty` of the package's checkout, or "" when it is not one."""
    import subprocess

    try:
        completed = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return completed.stdout.strip() if completed.returncode == 0 else ""


def run_context(device: torch.device, extra_notes: str = "") -> dict:
    """The columns every row shares: device, versions, time and notes on how noisy the machine was."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    notes = []
    if device.type == "cpu":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        notes.append(f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average "
                     f"{load:.1f} at start; a shared machine gives noisy timings")
    if extra_notes:
        notes.append(extra_notes)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "package_version": __version__,
        "source_revision": source_revision(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": "; ".join(notes),
    }
