"""Phase e2e (opt-in, --e2e): training steps of the Wan2.1-1.3B transformer config (random weights,
480p x 81 frames, bf16 autocast, gradient checkpointing) with and without CREPA, via bench.e2e.

Each configuration (baseline; CREPA in encoder mode and in backbone mode, each with the reference loss
and with the fused backend) builds its models, warms up and times a few steps in this process; the
CSV and plot are `repa-kernels bench --e2e`'s. A configuration that would start with less than
MIN_START_S of the budget left is skipped with that reason. Needs diffusers (phase install).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import e2e
from .phases import Budget, PhaseResult

MIN_START_S = 20.0  # on the GPU; the dry run's tiny steps take a second or two


def run(budget: Budget, result: PhaseResult, *, settings, device: torch.device, context: dict, prefix: Path,
        log) -> list[Path]:
    preset = e2e.PRESETS[settings.e2e_preset]
    cases = list(settings.e2e_cases) if settings.e2e_cases is not None else e2e.cases(device)
    results = []
    for configuration, impl in cases:
        if budget.left() < (MIN_START_S if device.type == "cuda" else 0.0):
            results.append(e2e.E2EResult(configuration, impl, status="skipped",
                                         reason=f"budget: {budget.left():.0f} s left"))
            result.status = "partial"
            continue
        try:
            found = e2e.run_configuration(preset, configuration, impl or "reference", device,
                                          steps=settings.e2e_steps, warmup=settings.e2e_warmup, isolated=False)
        except Exception as exc:  # one configuration failing must not hide the others
            found = e2e.E2EResult(configuration, impl, status="failed",
                                  reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            result.status = "failed"
            result.error = found.reason
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(found)
        log(f"e2e {configuration} {impl}: {found.status} {found.reason}"
            + (f" median {sorted(found.samples_ms)[len(found.samples_ms) // 2]:.1f} ms" if found.samples_ms else ""))
    rows = e2e.result_rows(preset, results, context)
    csv_path, plot_path = Path(f"{prefix}-e2e.csv"), Path(f"{prefix}-e2e.png")
    from ..report import write_csv

    write_csv(rows, csv_path, e2e.E2E_COLUMNS)
    paths = [csv_path]
    if any(r["status"] == "ok" for r in rows):
        e2e.write_plot(rows, plot_path)
        paths.append(plot_path)
    for row in rows:
        if row["status"] == "ok":
            ratio = f" x{row['step_time_vs_baseline']:.2f} baseline" if row["step_time_vs_baseline"] else ""
            result.lines.append(f"{row['configuration']:9s} {row['impl'] or '-':10s} {row['median_ms']:9.1f} ms"
                                f"{ratio}; step peak {row['peak_step_extra_mb'] or 0:.0f} MB")
        else:
            result.lines.append(f"{row['configuration']:9s} {row['impl'] or '-':10s} {row['status']}: {row['reason'][:90]}")
    return paths
