"""Command line of the GPU check: parses the options, runs the chosen phases in order under their
budgets, writes the files under --out and prints the summary table last (the device tool returns only
the end of the output).

Files (at most 8, the device tool's limit): gpu-check.log (everything, pytest's output included),
checks.csv (tests and correctness), sweep.csv, and `repa-kernels bench`'s <prefix>.csv,
<prefix>-time.png, <prefix>-memory.png, <prefix>-e2e.csv, <prefix>-e2e.png (prefix: device and card,
e.g. cuda-nvidia-h200). Each phase writes its files when it ends, so a later failure loses nothing.

Only the standard library is imported before the options are read: --dry must set TRITON_INTERPRET
before anything imports triton.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .phases import DEFAULT_PHASES, PHASES, PhaseResult, run_phase

CHECK_COLUMNS = ["phase", "name", "status", "seconds", "detail", "loss_error", "grad_error",
                 "reference_loss_error", "reference_grad_error"]


def parse_phases(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--phases {text!r}: unknown phase(s) {', '.join(unknown) or '(none given)'}; "
                                         f"valid: {', '.join(PHASES)}")
    return [name for name in PHASES if name in names]  # always in run order


def names_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def narrowed(settings, workloads: tuple[str, ...] | None, compiled_dtypes: tuple[str, ...] | None):
    """`settings` with only the named workloads and the given compiled-reference dtypes (each checked)."""
    import dataclasses

    from ..workloads import DTYPES

    if workloads is not None:
        known = {w.name for w in settings.workloads + settings.correctness}
        unknown = [name for name in workloads if name not in known]
        if unknown:
            raise SystemExit(f"--workloads: unknown {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        settings = dataclasses.replace(
            settings, workloads=tuple(w for w in settings.workloads if w.name in workloads),
            correctness=tuple(w for w in settings.correctness if w.name in workloads))
    if compiled_dtypes is not None:
        unknown = [name for name in compiled_dtypes if name not in DTYPES]
        if unknown:
            raise SystemExit(f"--compiled-dtypes: unknown {', '.join(unknown)}; valid: {', '.join(DTYPES)}")
        settings = dataclasses.replace(settings, compiled_dtypes=compiled_dtypes)
    return settings


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m repa_kernels.bench.gpu_check",
                                     description="The GPU check (benchmarks/GPU_CHECK.md).")
    parser.add_argument("--dry", action="store_true",
                        help="tiny shapes on CPU under the Triton interpreter: every phase's plumbing, no real figures")
    parser.add_argument("--phases", type=parse_phases, default=None,
                        help=f"comma-separated phases to run (default: {','.join(DEFAULT_PHASES)}; "
                             f"with --e2e also e2e); valid: {', '.join(PHASES)}")
    parser.add_argument("--e2e", action="store_true", help="also run the end-to-end Wan2.1-1.3B training steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT when set, else out/gpu-check)")
    parser.add_argument("--wheels", type=Path, default=Path(".whl"), help="folder of wheels to install (default .whl)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"),
                        help="where the wheels are unpacked (default /tmp/site)")
    parser.add_argument("--budget-scale", type=positive_float, default=1.0,
                        help="multiply every phase's budget (e.g. 2 for a rerun of one phase)")
    parser.add_argument("--workloads", type=names_list, default=None, metavar="NAME,...",
                        help="check and time only these workloads (e.g. a rerun of the ones that ran out of budget; "
                             "names as the summary prints them)")
    parser.add_argument("--compiled-dtypes", type=names_list, default=None, metavar="DTYPE,...",
                        help="time the compiled reference for these dtypes (default: bfloat16 only, each variant "
                             "compiles once: 10-40 s)")
    parser.add_argument("--seed", type=int, default=None, help="first seed of the random inputs (default: from the clock)")
    parser.add_argument("--write-defaults", type=Path, default=None, metavar="SWEEP_CSV",
                        help="run nothing: write the configurations chosen in a sweep.csv into the tuned defaults")
    parser.add_argument("--compile-grid", action="store_true",
                        help="run nothing: compile every configuration of the GPU sweep for sm_90 with the local "
                             "Triton (no GPU needed) and report registers, spills and shared memory")
    parser.add_argument("--defaults-file", type=Path, default=None,
                        help="with --write-defaults: the file to write (default repa_kernels/ops/tuned_launch.py)")
    return parser


class Log:
    """Prints a line and appends it to the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def __call__(self, text: str, echo: bool = False) -> None:
        with open(self.path, "a") as handle:
            handle.write(text.rstrip("\n") + "\n")
        if echo:
            print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.write_defaults is not None:
        return write_defaults(args)
    if args.compile_grid:
        os.environ.pop("TRITON_INTERPRET", None)
        return compile_grid()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels on the GPU, never the interpreter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("REPA_KERNELS_IMPL", None)  # the phases choose backends explicitly
    phases = args.phases or list(DEFAULT_PHASES) + (["e2e"] if args.e2e else [])
    out = args.out or Path(os.environ.get("OUT") or "out/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-check.log")
    return run_check(args, phases, out, log)


def write_defaults(args) -> int:
    from .sweep import write_defaults as write

    target = args.defaults_file or Path(__file__).resolve().parents[2] / "ops" / "tuned_launch.py"
    entries = write(args.write_defaults, target)
    print(f"wrote {target}: " + ("; ".join(entries) if entries else "no chosen configuration (defaults kept)"))
    return 0


def compile_grid() -> int:
    """Exit 1 when a configuration fails to compile or spills (its stack frame is register spills)."""
    import triton

    from .settings import GPU_SWEEP
    from .sweep import compile_grid as compile_all

    print(f"triton {triton.__version__}, sm_90")
    bad = 0
    for kernel, dtype, config, report in compile_all(GPU_SWEEP):
        if isinstance(report, Exception):
            bad += 1
            print(f"{kernel:17s} {dtype:9s} {config}: FAILED {type(report).__name__}: {str(report)[:200]}")
            continue
        bad += report.stack_bytes > 0
        print(f"{kernel:17s} {dtype:9s} {config}: {report.registers} registers, {report.stack_bytes} B stack, "
              f"{report.shared_bytes} B shared{' SPILLS' if report.stack_bytes else ''}")
    return 1 if bad else 0


def run_check(args, phases: list[str], out: Path, log: Log) -> int:
    results: list[PhaseResult] = []
    state: dict = {}
    check_rows: list[dict] = []
    seed = args.seed if args.seed is not None else int(time.time()) % 100000 * 100
    started = time.monotonic()

    def budget(name: str) -> float:
        return settings.budgets[name] * args.budget_scale

    def say(text: str) -> None:
        log(text, echo=True)

    import torch

    from .. import cli as bench_cli
    from .. import report
    from . import correctness, device_tests, end_to_end, install, sweep, timing
    from . import settings as settings_module

    settings = narrowed(settings_module.DRY if args.dry else settings_module.GPU, args.workloads, args.compiled_dtypes)
    if settings.device == "cuda" and not torch.cuda.is_available():
        say("gpu-check: torch sees no CUDA device; run with --dry on a machine without one")
        return 2
    device = torch.device(settings.device)
    context = bench_cli.run_context(device, "GPU check" + (" dry run (interpreter; figures meaningless)" if args.dry else ""))
    prefix = out / bench_cli.file_prefix(device, context["device_name"])
    say(describe(device, context, settings, seed, phases))

    # first: the later phases import diffusers (the e2e step) from what it installs
    if "install" in phases:
        results.append(run_phase("install", budget("install"), lambda b, r: install.run(
            b, r, wheel_dir=args.wheels, target=args.site, dry=args.dry, log=log), say))

    if "tests" in phases:
        results.append(run_phase("tests", budget("tests"), lambda b, r: device_tests.run(
            b, r, device=settings.device, keyword=settings.test_keyword, workers=settings.test_workers,
            out_dir=out, log=log, rows=check_rows, files=settings.test_files), say))
        write_checks(check_rows, out)
    if "correctness" in phases:
        results.append(run_phase("correctness", budget("correctness"), lambda b, r: correctness.run(
            b, r, workloads=settings.correctness, device=device, seed=seed, log=log, rows=check_rows), say))
        write_checks(check_rows, out)
    if "peaks" in phases:
        results.append(run_phase("peaks", budget("peaks"), lambda b, r: timing.run_peaks(
            b, r, workloads=settings.workloads, device=device, state=state), say))
    if "sweep" in phases:
        sweep_rows: list[dict] = []

        def sweep_body(b, r):
            try:
                sweep.run(b, r, settings=settings, device=device, seed=seed + 1000, log=log, rows=sweep_rows,
                          state=state)
            finally:
                sweep.write_csv(sweep_rows, out / "sweep.csv")

        results.append(run_phase("sweep", budget("sweep"), sweep_body, say))
    if "workloads" in phases:
        workload_rows: list[dict] = []

        def workloads_body(b, r):
            try:
                timing.run_workloads(b, r, settings=settings, device=device, seed=seed + 2000, log=log,
                                     state=state, context=context, rows=workload_rows)
            finally:
                if workload_rows:
                    report.write_csv(workload_rows, Path(f"{prefix}.csv"))
                    report.write_plots(workload_rows, prefix)
                    log(report.format_table(workload_rows))

        results.append(run_phase("workloads", budget("workloads"), workloads_body, say))
    if "e2e" in phases:
        results.append(run_phase("e2e", budget("e2e"), lambda b, r: end_to_end.run(
            b, r, settings=settings, device=device, context=context, prefix=prefix, log=log), say))

    say(summary(results, time.monotonic() - started, out))
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


def write_checks(rows: list[dict], out: Path) -> None:
    from ..report import write_csv

    write_csv(rows, out / "checks.csv", CHECK_COLUMNS)


def describe(device, context: dict, settings, seed: int, phases: list[str]) -> str:
    import torch

    lines = [f"gpu-check ({settings.name}): {context['device_name']}; torch {context['torch_version']}, "
             f"triton {context['triton_version']}, python {sys.version.split()[0]}, revision "
             f"{context['source_revision'] or '?'}; seed {seed}; phases {','.join(phases)}"]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(f"  {properties.multi_processor_count} SMs, L2 {getattr(properties, 'L2_cache_size', 0) / 2**20:.0f} MiB, "
                     f"{properties.total_memory / 2**30:.0f} GiB, capability {properties.major}.{properties.minor}")
        lines.append(f"  nvidia-smi: {card_state()}")
    return "\n".join(lines)


def card_state() -> str:
    """Clocks, temperature, power and memory in use as nvidia-smi reads them (the card as found: never set)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "not on the PATH"
    fields = "driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    return f"{fields} = {done.stdout.strip() or done.stderr.strip()[:200]}"


def summary(results: list[PhaseResult], seconds: float, out: Path) -> str:
    """The table printed last: one block per phase, its status, time against budget and key figures."""
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    lines = ["", "=" * 100, f"GPU CHECK SUMMARY ({seconds:.0f} s; files in {out}: {', '.join(files)})", "=" * 100]
    for result in results:
        lines.append(f"[{result.status.upper():7s}] {result.name:11s} {result.seconds:6.1f} s of {result.budget_s:.0f} s"
                     + (f"  {result.error}" if result.error else ""))
        lines += [f"    {line}" for line in result.lines]
    return "\n".join(lines)
