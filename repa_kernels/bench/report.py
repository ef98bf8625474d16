"""Rows of the long-format results table, and the CSV, PNG plots and console table made from them.

One row per (workload, provider, mode). A skipped or failed provider keeps its rows, with the reason,
so nothing disappears from the results.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .measure import DevicePeaks, ModeResult
from .workloads import MODES, Workload

COLUMNS = [
    "workload", "op", "shape", "provider", "mode", "dtype", "status", "reason", "repeats",
    "median_ms", "p20_ms", "p80_ms", "peak_extra_mb", "memory_method",
    "bytes_moved", "bytes_moved_stretch", "flops", "flops_form", "achieved_bytes_per_s", "achieved_flops_per_s",
    "bound_kind", "bound_ms", "fraction_of_bound", "bound_stretch_ms", "fraction_of_stretch",
    "copy_bandwidth_bytes_per_s", "matmul_flops_per_s",
    "device", "device_name", "threads", "torch_version", "triton_version", "package_version",
    "source_revision", "timestamp", "notes",
]


def make_row(workload: Workload, provider: str, result: ModeResult, peaks: DevicePeaks,
             context: dict) -> dict:
    """One CSV row; `context` carries the device, versions, timestamp and notes columns."""
    mode = result.mode
    moved = workload.bytes_moved(mode)
    stretch = workload.bytes_moved_stretch(mode)
    flops = workload.flops(mode)
    bytes_ms = moved / peaks.copy_bytes_per_s * 1e3
    flops_ms = flops / peaks.matmul_flops_per_s * 1e3
    # backward alone has no bound (see workloads.py): a fused forward may leave it only a scale
    bounded = mode != "backward"
    bound_ms = max(bytes_ms, flops_ms) if bounded else None
    stretch_ms = max(stretch / peaks.copy_bytes_per_s * 1e3, flops_ms) if stretch is not None else None
    median = result.median_ms
    rate = median and bounded
    row = {
        "workload": workload.name, "op": workload.op, "shape": workload.shape_text(), "provider": provider,
        "mode": mode, "dtype": workload.dtype, "status": result.status, "reason": result.reason,
        "repeats": len(result.samples_ms),
        "median_ms": median, "p20_ms": result.p20_ms, "p80_ms": result.p80_ms,
        "peak_extra_mb": None if result.peak_extra_bytes is None else result.peak_extra_bytes / 2**20,
        "memory_method": result.memory_method,
        "bytes_moved": moved, "bytes_moved_stretch": stretch, "flops": flops,
        "flops_form": workload.flops_form(),
        "achieved_bytes_per_s": moved / (median * 1e-3) if rate else None,
        "achieved_flops_per_s": flops / (median * 1e-3) if rate and flops else None,
        "bound_kind": ("bytes" if bytes_ms >= flops_ms else "flops") if bounded else "",
        "bound_ms": bound_ms, "fraction_of_bound": bound_ms / median if rate else None,
        "bound_stretch_ms": stretch_ms,
        "fraction_of_stretch": stretch_ms / median if median and stretch_ms is not None else None,
        "copy_bandwidth_bytes_per_s": peaks.copy_bytes_per_s, "matmul_flops_per_s": peaks.matmul_flops_per_s,
    }
    row.update(context)
    return row


def write_csv(rows: list[dict], path: Path, columns: list[str] = COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in columns})


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows (skipped and failed ones with their reason)."""
    header = ["workload", "provider", "mode", "median ms", "p20-p80 ms", "peak MB", "achieved", "of bound"]
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append([row["workload"], row["provider"], row["mode"], row["status"], row["reason"][:60],
                          "", "", ""])
            continue
        if row["fraction_of_bound"] is None:
            achieved, fraction = "", ""
        else:
            if row["bound_kind"] == "flops":
                achieved = f"{row['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"
            else:
                achieved = f"{row['achieved_bytes_per_s'] / 1e9:.2f} GB/s"
            fraction = f"{100 * row['fraction_of_bound']:.1f}%"
            if row["fraction_of_stretch"] is not None:
                fraction += f" ({100 * row['fraction_of_stretch']:.1f}% of 3-pass)"
        peak = "" if row["peak_extra_mb"] is None else f"{row['peak_extra_mb']:.1f}"
        lines.append([row["workload"], row["provider"], row["mode"], f"{row['median_ms']:.2f}",
                      f"{row['p20_ms']:.2f}-{row['p80_ms']:.2f}", peak, achieved, fraction])
    return fixed_width(header, lines)


def fixed_width(header: list[str], lines: list[list]) -> str:
    """A plain-text table: columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(str(item)) for item in column) for column in zip(header, *lines)]
    out = ["  ".join(str(item).ljust(width) for item, width in zip(header, widths))]
    out.append("  ".join("-" * width for width in widths))
    out += ["  ".join(str(item).ljust(width) for item, width in zip(line, widths)) for line in lines]
    return "\n".join(out)


def write_plots(rows: list[dict], prefix: Path) -> list[Path]:
    """<prefix>-time.png and <prefix>-memory.png: one panel per workload, bars per mode and provider."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    device_name = rows[0]["device_name"] if rows else ""
    paths = []
    for metric, label, filename in (("median_ms", "median time (ms), bars p20-p80", "time"),
                                    ("peak_extra_mb", "peak extra memory (MiB)", "memory")):
        figure, axes = plt.subplots(len(workloads), 1, figsize=(8, 2.8 * len(workloads) + 0.6), squeeze=False)
        for axis, workload in zip(axes[:, 0], workloads):
            _bar_panel(axis, [r for r in rows if r["workload"] == workload], providers, metric, label)
            shape = next(r["shape"] for r in rows if r["workload"] == workload)
            axis.set_title(f"{workload} ({shape})", fontsize=9)
        figure.suptitle(f"repa_kernels bench on {device_name}", fontsize=10)
        figure.tight_layout()
        path = Path(f"{prefix}-{filename}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def _bar_panel(axis, rows: list[dict], providers: list[str], metric: str, label: str) -> None:
    ran = [p for p in providers if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
    skipped = [p for p in providers if p not in ran and any(r["provider"] == p for r in rows)]
    width = 0.8 / max(1, len(ran))
    for index, provider in enumerate(ran):
        by_mode = {r["mode"]: r for r in rows if r["provider"] == provider}
        xs, heights, low, high = [], [], [], []
        for position, mode in enumerate(MODES):
            row = by_mode.get(mode)
            value = row.get(metric) if row and row["status"] == "ok" else None
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            xs.append(position + (index - (len(ran) - 1) / 2) * width)
            heights.append(value)
            if metric == "median_ms":
                low.append(value - row["p20_ms"])
                high.append(row["p80_ms"] - value)
        errors = [low, high] if metric == "median_ms" and xs else None
        axis.bar(xs, heights, width, yerr=errors, capsize=2, label=provider, color=f"C{providers.index(provider)}")
    axis.set_xticks(range(len(MODES)))
    axis.set_xticklabels(MODES, fontsize=8)
    axis.set_ylabel(label, fontsize=8)
    axis.tick_params(axis="y", labelsize=8)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    if skipped:
        axis.text(0.01, 0.97, "not run: " + ", ".join(skipped), transform=axis.transAxes, fontsize=7,
                  va="top", color="gray")
