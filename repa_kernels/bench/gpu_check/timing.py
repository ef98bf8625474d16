"""Phases peaks and workloads: the device's two ceilings, then the benchmark workloads timed against them.

peaks: `measure.device_peaks` for each workload dtype (a 1 GiB device-to-device copy counting bytes read
plus written; an 8192³ matmul on random data in that dtype), the best of a few runs each.

workloads: every (workload, provider, mode) of settings.workloads with `measure.time_mode` and the
CUDA allocator's peak above the inputs, rows in `report`'s format (bytes and FLOPs bounds, fraction
of the bound), so the CSV and plots are the `repa-kernels bench` ones and go straight to
benchmarks/results/. Differences from `repa-kernels bench`:
- the Triton kernels launch with the sweep's chosen configurations (utils.forced_launch), when the
  sweep ran in this process;
- the first call of each (workload, provider) is timed apart and reported in the notes column: for
  `compiled` it is the torch.compile time (each variant compiles once and is reused by every mode);
- repeats adapt to the budget (between min_repeats and max_repeats per mode), and a case whose
  remaining calls cannot fit is skipped with that reason; the compiled reference runs only for the
  dtypes of settings.compiled_dtypes (each compile costs 10-40 s of the budget).
"""

from __future__ import annotations

import contextlib
import time

import torch

from ...ops import utils
from .. import measure, report
from ..providers import availability, loss_function
from ..workloads import DTYPES, MODES
from .phases import Budget, PhaseResult
from .sweep import forced_for

# What one compile of the reference (forward and backward graphs) is expected to take on the device
# before one has been measured in the run: measured here on CPU inductor, 10-25 s per workload
# (benchmarks/GPU_CHECK.md); CUDA inductor also compiles its generated Triton kernels.
COMPILE_ESTIMATE_S = 20.0


def run_peaks(budget: Budget, result: PhaseResult, *, workloads, device: torch.device, state: dict) -> None:
    peaks = state.setdefault("peaks", {})
    for dtype in dict.fromkeys(w.dtype for w in workloads):
        if budget.left() <= 0:
            result.status = "partial"
            break
        peak = measure.device_peaks(device, DTYPES[dtype])
        peak = measure.best_peaks(peak, measure.device_peaks(device, DTYPES[dtype]))
        peaks[dtype] = peak
        result.lines.append(f"{dtype:9s} copy {peak.copy_bytes_per_s / 1e9:8.1f} GB/s   matmul "
                            f"{peak.matmul_flops_per_s / 1e12:7.2f} TFLOP/s")


def _available(provider: str, workload, device: torch.device, settings) -> tuple[bool, str]:
    if provider == "compiled" and workload.dtype not in settings.compiled_dtypes:
        return False, (f"compiled reference timed for {', '.join(settings.compiled_dtypes) or 'no dtype'} only "
                       "(each variant compiles once, 10-40 s of the budget)")
    if provider == "triton" and device.type == "cpu" and utils.is_interpreter():
        return True, "Triton interpreter (dry run: plumbing only, times mean nothing)"
    return availability(provider, workload, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward_ms(fn, z, y, device: torch.device) -> float:
    started = time.perf_counter()
    z.grad = None
    fn(z, y).backward()
    _sync(device)
    z.grad = None
    return (time.perf_counter() - started) * 1e3


def time_case(workload, provider: str, device: torch.device, settings, budget: Budget, cases_left: int, seed: int
              ) -> tuple[list[measure.ModeResult], float]:
    """Every mode of one (workload, provider): ([results], first call in ms). The modes share an even
    share of the phase budget left after the first calls (a compile must not eat the timing's share)."""
    z, y = workload.make_inputs(device, seed)
    fn = loss_function(provider, workload)
    first_ms = _forward_backward_ms(fn, z, y, device)  # compiles (torch.compile, Triton): every mode's kernels
    warm_s = max(_forward_backward_ms(fn, z, y, device) / 1e3, 1e-5)  # what a call costs from now on
    deadline = time.monotonic() + budget.share(cases_left)
    results, probe = [], measure.memory_probe(device, isolated=False)
    for index, mode in enumerate(MODES):
        left = deadline - time.monotonic()
        ran = [r for r in results if r.status == "ok"]
        per_call_s = max(ran[-1].median_ms / 1e3, 1e-5) if ran else warm_s
        repeats = int(left / (len(MODES) - index) / per_call_s) - settings.warmup
        if repeats < settings.min_repeats:
            results.append(measure.ModeResult(mode, status="skipped",
                                              reason=f"budget: {left:.1f} s left for {len(MODES) - index} modes "
                                                     f"at {per_call_s * 1e3:.1f} ms a call"))
            continue
        results.append(measure.time_mode(fn, z, y, mode, repeats=min(repeats, settings.max_repeats),
                                         warmup=settings.warmup, probe=probe))
    return results, first_ms


def run_workloads(budget: Budget, result: PhaseResult, *, settings, device: torch.device, seed: int, log,
                  state: dict, context: dict, rows: list) -> None:
    peaks = state.setdefault("peaks", {})
    chosen = state.get("chosen", {})
    # the compiled reference last: its compiles take most of the budget, the other cases a second or two
    cases = ([(w, p) for w in settings.workloads for p in settings.providers if p != "compiled"]
             + [(w, p) for w in settings.workloads for p in settings.providers if p == "compiled"])
    compile_estimate_s = COMPILE_ESTIMATE_S
    for index, (workload, provider) in enumerate(cases):
        if workload.dtype not in peaks:  # the peaks phase did not run (or not for this dtype)
            peaks[workload.dtype] = measure.device_peaks(device, workload.torch_dtype)
        ok, reason = _available(provider, workload, device, settings)
        if ok and budget.left() <= 0:
            ok, reason = False, "phase budget reached; rerun with --phases workloads"
        elif ok and provider == "compiled" and budget.left() < compile_estimate_s:
            ok, reason = False, (f"phase budget: {budget.left():.0f} s left, a compile takes ~{compile_estimate_s:.0f} s; "
                                 "rerun with --phases workloads")
        if not ok:
            results, notes = [measure.ModeResult(m, status="skipped", reason=reason) for m in MODES], ""
        else:
            forced = forced_for(chosen, workload.dtype) if provider == "triton" else {}
            # an even share of what is left among the cases that remain (so one slow case cannot starve the rest)
            remaining = sum(1 for w, p in cases[index:] if _available(p, w, device, settings)[0])
            try:
                with utils.forced_launch(**forced) if forced else contextlib.nullcontext():
                    results, first_ms = time_case(workload, provider, device, settings, budget, remaining,
                                                  seed + index)
                notes = f"first call {first_ms:.0f} ms" + (" (torch.compile)" if provider == "compiled" else "")
                if provider == "compiled":
                    compile_estimate_s = max(compile_estimate_s, first_ms / 1e3)
                if forced:
                    notes += "; launch " + "; ".join(f"{k}: {v}" for k, v in forced.items())
            except Exception as exc:  # a provider that fails is a row, not the end of the phase
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                results, notes = [measure.ModeResult(m, status="failed", reason=reason) for m in MODES], ""
                log(f"workload {workload.name} / {provider}: {reason}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for mode_result in results:
            row = report.make_row(workload, provider, mode_result, peaks[workload.dtype], context)
            row["notes"] = "; ".join(n for n in (context.get("notes", ""), notes) if n)
            rows.append(row)
            if mode_result.status == "ok":
                log(f"workload {workload.name} / {provider} / {mode_result.mode}: {mode_result.median_ms:.3f} ms"
                    f" peak {row['peak_extra_mb'] if row['peak_extra_mb'] is not None else '-'} MB; {notes}")
    failed = [r for r in rows if r["status"] == "failed"]
    skipped_budget = [r for r in rows if r["status"] == "skipped" and "budget" in r["reason"]]
    if failed:
        result.status = "failed"
        result.error = f"{len(failed)} rows failed (first: {failed[0]['workload']} / {failed[0]['provider']}: " \
                       f"{failed[0]['reason'][:120]})"
    elif skipped_budget:
        result.status = "partial"
    result.lines += summary_lines(rows)


def summary_lines(rows: list[dict]) -> list[str]:
    """Per workload: forward+backward of triton vs eager and compiled reference, and the fraction of the bound."""
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by_provider = {r["provider"]: r for r in rows if r["workload"] == workload and r["mode"] == "forward+backward"}
        cells = []
        for provider in ("triton", "reference", "compiled"):
            row = by_provider.get(provider)
            if row is None:
                continue
            if row["status"] != "ok":
                cells.append(f"{provider} {row['status']}")
                continue
            text = f"{provider} {row['median_ms']:.2f} ms"
            if row["peak_extra_mb"] is not None:
                text += f" {row['peak_extra_mb']:.0f} MB"
            if provider == "triton" and row["fraction_of_bound"]:
                text += f" ({100 * row['fraction_of_bound']:.0f}% of bound)"
            cells.append(text)
        lines.append(f"{workload:22s} fwd+bwd: " + "; ".join(cells))
    return lines
