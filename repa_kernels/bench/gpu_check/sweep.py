"""Phase sweep: a small prepared grid of launch configurations per kernel and workload class, timed on
the device; the best per (kernel, dtype) is what the workloads phase then launches with, and what
`--write-defaults` writes into repa_kernels/ops/tuned_launch.py (the fixed defaults, per dtype).

Each class (settings.GPU_SWEEP) times one kernel in the mode that isolates it: the CREPA kernel in
forward+backward (the training path: forward and dz in one launch; the backward only scales),
the manifold forward kernel in forward, its backward kernel in backward. Every candidate runs through
`utils.forced_launch` on the same inputs; its loss and gradient must agree with the default
configuration's (a different tiling changes only the order of sums) or it is disqualified. A
configuration the device cannot launch (shared memory, registers) is a failed row, not a crash. Each
class gets an even share of what is left of the budget, so a slow one cannot starve the rest.

A configuration is chosen over the default only when it is faster by more than CHOOSE_MARGIN on the
geometric mean of the classes that measured both: below that, a difference is within run-to-run noise.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

from ...ops import utils
from .. import measure
from ..providers import loss_function
from .correctness import fresh_inputs, relative_error
from .phases import Budget, PhaseResult

CHOOSE_MARGIN = 0.03
AGREEMENT = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
SWEEP_COLUMNS = ["kernel", "dtype", "workload", "shape", "mode", "config", "status", "reason", "median_ms",
                 "p20_ms", "p80_ms", "repeats", "speedup_vs_default", "difference_vs_default", "is_default", "chosen"]


def default_config(kernel: str, workload):
    """What the kernel launches with at the workload's shape without forcing (the default or a tuned one)."""
    if kernel == "token":
        return utils.token_blocks(workload.tokens, workload.width_z, workload.torch_dtype)
    return utils.manifold_blocks(workload.tokens, workload.width_z, workload.width_y, workload.torch_dtype,
                                 backward=kernel == "manifold_backward")


def config_text(config) -> str:
    return " ".join(f"{key}={value}" for key, value in dataclasses.asdict(config).items())


def parse_config(kernel: str, text: str):
    values = {key: int(value) for key, value in (item.split("=") for item in text.split())}
    return (utils.TokenBlocks if kernel == "token" else utils.ManifoldBlocks)(**values)


def _outputs(fn, z, y):
    zz = z.detach().clone().requires_grad_(True)
    loss = fn(zz, y)
    loss.backward()
    return loss.detach(), zz.grad


def sweep_one_class(sweep_class, device: torch.device, budget_s: float, settings, seed: int, log) -> list[dict]:
    workload = sweep_class.workload
    started = time.monotonic()
    default = default_config(sweep_class.kernel, workload)
    grid = [default] + [c for c in sweep_class.grid if c != default]
    z, y = fresh_inputs(workload, device, seed)
    z.requires_grad_(True)
    fn = loss_function("triton", workload)
    rows, baseline = [], None
    for config in grid:
        row = {"kernel": sweep_class.kernel, "dtype": workload.dtype, "workload": workload.name,
               "shape": workload.shape_text(), "mode": sweep_class.mode, "config": config_text(config),
               "is_default": config == default, "status": "ok", "reason": ""}
        rows.append(row)
        left = budget_s - (time.monotonic() - started)
        if left <= 0:
            row.update(status="skipped", reason="class budget reached")
            continue
        try:
            with utils.forced_launch(**{sweep_class.kernel: config}):
                first = time.monotonic()
                loss, grad = _outputs(fn, z, y)  # compiles this configuration
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                call_s = time.monotonic() - first
                if baseline is None:
                    baseline = (loss, grad)
                    difference = 0.0
                else:
                    difference = max(relative_error(loss, baseline[0]), relative_error(grad, baseline[1]))
                row["difference_vs_default"] = difference
                if not difference <= AGREEMENT[workload.dtype]:
                    row.update(status="wrong", reason=f"differs from the default by {difference:.2e}")
                    continue
                repeats = settings.max_repeats if call_s <= 0 else int(max(0.0, left - call_s) / 3 / max(call_s, 1e-4))
                repeats = max(settings.min_repeats, min(settings.max_repeats, repeats))
                timed = measure.time_mode(fn, z, y, sweep_class.mode, repeats=repeats, warmup=1)
        except Exception as exc:  # an unlaunchable configuration is a row, not the end of the sweep
            row.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            log(f"sweep {sweep_class.kernel} {workload.name} {row['config']}: {row['reason']}")
            continue
        row.update(median_ms=timed.median_ms, p20_ms=timed.p20_ms, p80_ms=timed.p80_ms, repeats=len(timed.samples_ms))
        log(f"sweep {sweep_class.kernel} {workload.name} {row['config']}: {timed.median_ms:.3f} ms "
            f"(p20-p80 {timed.p20_ms:.3f}-{timed.p80_ms:.3f}, diff {difference:.1e})")
    default_ms = rows[0].get("median_ms")
    for row in rows:
        if default_ms and row.get("median_ms"):
            row["speedup_vs_default"] = default_ms / row["median_ms"]
    del z, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def choose(rows: list[dict]) -> dict[tuple[str, str], str]:
    """{(kernel, dtype): config text} of the configurations that beat the default by CHOOSE_MARGIN on the
    geometric mean of their speedups over the classes where they ran; marks those rows chosen."""
    chosen = {}
    for key in dict.fromkeys((r["kernel"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["kernel"], r["dtype"]) == key]
        classes = set(r["workload"] for r in group)
        best, best_speedup = None, 1.0 + CHOOSE_MARGIN
        for config in dict.fromkeys(r["config"] for r in group if not r["is_default"]):
            speedups = [r.get("speedup_vs_default") for r in group if r["config"] == config and r["status"] == "ok"]
            if len(speedups) != len(classes) or not all(speedups):
                continue  # must have run in every class of this kernel and dtype
            mean = math.exp(statistics.fmean(math.log(s) for s in speedups))
            if mean > best_speedup:
                best, best_speedup = config, mean
        if best is not None:
            chosen[key] = best
    for row in rows:
        row["chosen"] = chosen.get((row["kernel"], row["dtype"])) == row["config"]
    return chosen


def forced_for(chosen: dict, dtype: str) -> dict:
    """utils.forced_launch arguments of the chosen configurations for inputs of `dtype`."""
    return {kernel: parse_config(kernel, config) for (kernel, chosen_dtype), config in chosen.items()
            if chosen_dtype == dtype}


def run(budget: Budget, result: PhaseResult, *, settings, device: torch.device, seed: int, log, rows: list,
        state: dict) -> None:
    classes = settings.sweep
    for index, sweep_class in enumerate(classes):
        if budget.left() <= 0:
            result.status = "partial"
            result.lines.append(f"budget reached: {len(classes) - index} classes not swept")
            break
        rows += sweep_class_safe(sweep_class, device, budget, len(classes) - index, settings, seed + index, log)
    state["chosen"] = choose(rows)
    for key in dict.fromkeys((r["kernel"], r["dtype"], r["workload"]) for r in rows):
        group = [r for r in rows if (r["kernel"], r["dtype"], r["workload"]) == key]
        ok = [r for r in group if r["status"] == "ok" and r.get("median_ms")]
        if not ok:
            result.lines.append(f"{key[0]:17s} {key[2]:22s} nothing ran: {group[0]['reason'][:80]}")
            continue
        default = next((r for r in group if r["is_default"]), None)
        fastest = min(ok, key=lambda r: r["median_ms"])
        default_text = f"{default['median_ms']:.3f} ms" if default and default.get("median_ms") else "n/a"
        result.lines.append(f"{key[0]:17s} {key[2]:22s} default {default_text}; fastest {fastest['median_ms']:.3f} ms "
                            f"x{fastest.get('speedup_vs_default') or 0:.2f} [{fastest['config']}] "
                            f"({len(ok)}/{len(group)} ran)")
    for (kernel, dtype), config in state["chosen"].items():
        result.lines.append(f"chosen for {kernel} {dtype}: {config}")
    if not state["chosen"]:
        result.lines.append("no configuration beat the defaults by more than "
                            f"{100 * CHOOSE_MARGIN:.0f}%: the workloads use the defaults")


def sweep_class_safe(sweep_class, device, budget: Budget, classes_left: int, settings, seed: int, log) -> list[dict]:
    try:
        return sweep_one_class(sweep_class, device, budget.share(classes_left), settings, seed, log)
    except Exception as exc:  # e.g. inputs that do not fit: the other classes still run
        log(f"sweep {sweep_class.kernel} {sweep_class.workload.name}: {type(exc).__name__}: {exc}")
        return [{"kernel": sweep_class.kernel, "dtype": sweep_class.workload.dtype,
                 "workload": sweep_class.workload.name, "shape": sweep_class.workload.shape_text(),
                 "mode": sweep_class.mode, "config": "", "is_default": False, "status": "failed",
                 "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}]


def write_csv(rows: list[dict], path: Path) -> None:
    from ..report import write_csv as write

    write(rows, path, SWEEP_COLUMNS)


# --- write back ------------------------------------------------------------------------------------
TUNED_HEADER = '''"""Launch configurations of the Triton kernels measured on a GPU, which replace the fixed defaults of
`utils.token_blocks` / `utils.manifold_blocks` for one kernel and input dtype.

Keys: (kernel, dtype name) with kernel "token" (CREPA and inverse norms: block_n, block_d, num_warps),
"manifold_forward" or "manifold_backward" (block_m, block_n, block_k, block_out, num_warps,
num_stages). Written by `python -m repa_kernels.bench.gpu_check --write-defaults sweep.csv` from the
sweep of a GPU check (benchmarks/GPU_CHECK.md), only for configurations that beat the default there.
{status}
"""

TUNED: dict[tuple[str, str], dict[str, int]] = {{
{entries}}}
'''


def read_chosen(sweep_csv: Path) -> list[dict]:
    with open(sweep_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [c for c in ("kernel", "dtype", "config", "chosen", "speedup_vs_default") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"--write-defaults {sweep_csv}: not a sweep CSV (no column {', '.join(missing)})")
    chosen = {}
    for row in rows:
        if row["chosen"] == "True":
            chosen.setdefault((row["kernel"], row["dtype"]), row)
    return list(chosen.values())


def write_defaults(sweep_csv: Path, target: Path) -> list[str]:
    """Rewrite `target` (tuned_launch.py) with the configurations chosen in `sweep_csv`; returns its entries."""
    chosen = read_chosen(sweep_csv)
    lines, entries = [], []
    for row in chosen:
        config = parse_config(row["kernel"], row["config"])
        values = ", ".join(f"{key}={value}" for key, value in dataclasses.asdict(config).items())
        speedups = [r for r in [row.get("speedup_vs_default")] if r]
        lines.append(f"    # {row['workload']} ({row['shape']}): x{float(speedups[0]):.2f} over the default\n"
                     if speedups else "")
        lines.append(f"    ({row['kernel']!r}, {row['dtype']!r}): dict({values}),\n")
        entries.append(f"{row['kernel']} {row['dtype']}: {values}")
    status = (f"Entries from {sweep_csv.name}." if chosen else
              "Empty: no GPU sweep has found a configuration faster than the defaults yet.")
    target.write_text(TUNED_HEADER.format(status=status, entries="".join(lines)))
    return entries


# --- the grid, compiled here ------------------------------------------------------------------------
def compile_grid(sweep_classes, arch: int = 90) -> list[tuple[str, str, object, object]]:
    """Compile each configuration's kernel for sm_`arch` with the local Triton, without a GPU (the
    kernels' cuda_compile_reports under forced_launch): [(kernel, dtype, config, report or exception)].
    Needs TRITON_INTERPRET unset."""
    from ...ops import crepa_triton, manifold_triton

    found = []
    for sweep_class in sweep_classes:
        workload = sweep_class.workload
        for config in sweep_class.grid:
            try:
                with utils.forced_launch(**{sweep_class.kernel: config}):
                    if sweep_class.kernel == "token":  # the training path: forward + dz
                        report = crepa_triton.cuda_compile_reports(workload.torch_dtype, workload.z_shape,
                                                                   workload.options.distance, arch)[1]
                    else:
                        name = {"manifold_forward": "_manifold_forward_kernel",
                                "manifold_backward": "_manifold_backward_kernel"}[sweep_class.kernel]
                        reports = manifold_triton.cuda_compile_reports(
                            workload.torch_dtype, (workload.batch, workload.frames, workload.tokens),
                            workload.width_z, workload.width_y, arch)
                        report = next(r for r in reports if r.name == name)
            except Exception as exc:  # a configuration that does not compile is a finding, not a crash
                report = exc
            found.append((sweep_class.kernel, workload.dtype, config, report))
    return found
