"""Phase tests: the repository's tests on one device, in a pytest subprocess under the phase budget.

Which tests: those of the test files that mention `cuda`, filtered by the `selection_plugin` plugin to
the ones that exercise the device (device-parametrised tests, the Triton kernels compiled rather than
interpreted, torch.compile(fullgraph=True) parity, the > 2^31-element tests, opcheck). On the GPU,
pytest-xdist (on the image) runs them in a few processes so that the Triton compiles overlap, and
pytest-timeout (also there) bounds one test. At the budget the process group is killed; the outcomes
recorded so far (one JSON line each, written as each test ends) are what the phase reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .phases import Budget, PhaseResult

REPOSITORY = Path(__file__).resolve().parents[3]
PLUGIN = "repa_kernels.bench.gpu_check.selection_plugin"


def test_files() -> list[str]:
    """The test files that mention cuda (the others cannot hold a device test)."""
    return sorted(str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "tests").glob("test_*.py")
                  if "cuda" in p.read_text())


def pytest_command(device: str, results: Path, keyword: str, workers: int, per_test_timeout_s: int,
                   files: tuple | None = None) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", PLUGIN, "-p", "no:cacheprovider",
               "--gpu-check-device", device, "--gpu-check-results", str(results)]
    if keyword:
        command += ["-k", keyword]
    if workers and importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", str(per_test_timeout_s)]
    return command + list(files or test_files())


def read_results(path: Path) -> tuple[int | None, list[dict]]:
    """(number of tests selected, or None when collection never finished; one record per outcome)."""
    selected, outcomes = None, []
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "selected" in record:
                selected = record["selected"]
            else:
                outcomes.append(record)
    return selected, outcomes


def run(budget: Budget, result: PhaseResult, *, device: str, keyword: str, workers: int, out_dir: Path,
        log, rows: list, files: tuple | None = None) -> None:
    results_path = out_dir / ".tests.jsonl"  # a dot file: not one of the files that come back
    results_path.unlink(missing_ok=True)
    command = pytest_command(device, results_path, keyword, workers, int(max(60, 0.8 * budget.left())), files)
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter
    log("$ " + " ".join(command))
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = process.communicate(timeout=max(1.0, budget.left()))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    log(output)
    selected, outcomes = read_results(results_path)
    results_path.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for record in outcomes:
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
        rows.append({"phase": "tests", "name": record["nodeid"], "status": record["outcome"],
                     "seconds": record["seconds"], "detail": record["message"]})
    finished = len(outcomes)
    text = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no test finished"
    result.lines.append(f"{text} of {selected if selected is not None else '?'} selected "
                        f"({time.monotonic() - started:.0f} s, pytest exit {process.returncode})")
    for record in outcomes:
        if record["outcome"] in ("failed", "error"):
            result.lines.append(f"  {record['outcome'].upper()} {record['nodeid']}: {record['message'][:150]}")
    if timed_out:
        result.status = "partial"
        result.lines.append(f"  budget reached: {finished} of {selected} finished; rerun with --phases tests")
    elif counts.get("failed") or counts.get("error") or process.returncode not in (0, 5):
        result.status = "failed"
        if not outcomes:
            tail = output.strip().splitlines()[-1:] or [""]
            result.error = f"pytest exited {process.returncode}: {tail[0][:300]}"
    elif selected is None or finished < selected:
        result.status = "failed"
        result.error = f"pytest finished {finished} of {selected} selected tests"
