"""Phase install: the Python packages the device machine lacks, from wheels the run carries.

The H200 image has python3 3.12, torch 2.11, triton 3.6 and transformers, but no diffusers (needed by
the end-to-end step and the tests that build diffusers models) and no package registry. The wheels
travel in the repository's git-ignored `.whl/` folder (named in the device call's `carry`) and are
unpacked with `pip --target` into a folder put first on sys.path and on the tests' PYTHONPATH.

Download them here (any machine with pip and network), for CPython 3.12 on manylinux x86-64:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0

(lazy-importer: importlib_metadata 10's one requirement the image lacks; diffusers' others, numpy,
huggingface-hub >= 1.32, safetensors >= 0.8, regex, requests, filelock and Pillow, are on the image.)
Keep one version of each: two would stop the install. The dry run checks the same wheels with
`pip --dry-run` and installs nothing.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

from .phases import Budget, PhaseResult


def distribution_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()


def find_wheels(folder: Path) -> list[Path]:
    """The wheels of `folder`, refusing two versions of one distribution (pip would stop on them)."""
    wheels = sorted(folder.glob("*.whl"))
    seen: dict[str, Path] = {}
    for wheel in wheels:
        name = distribution_name(wheel)
        if name in seen:
            raise ValueError(f"--wheels {folder}: two wheels of {name}: {seen[name].name} and {wheel.name}; keep one")
        seen[name] = wheel
    return wheels


def pip_command(wheels: list[Path], target: Path, dry: bool) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target)]
    return command + (["--dry-run"] if dry else []) + [str(w) for w in wheels]


def put_first_on_path(target: Path) -> None:
    """This process imports from `target` first, and so do the processes it starts (tests)."""
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)


def run(budget: Budget, result: PhaseResult, *, wheel_dir: Path, target: Path, dry: bool, log) -> None:
    if not wheel_dir.is_dir() or not any(wheel_dir.glob("*.whl")):
        result.status = "skipped"
        result.lines.append(f"no wheels in {wheel_dir}/ (download them as install.py says; needed for e2e)")
        return
    wheels = find_wheels(wheel_dir)
    command = pip_command(wheels, target, dry)
    log("$ " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(5.0, budget.left()))
    log(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"pip exited {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:300]}")
    names = ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in wheels)
    if dry:
        result.lines.append(f"pip --dry-run accepts {names} (nothing installed)")
        return
    put_first_on_path(target)
    check = subprocess.run([sys.executable, "-c", "import diffusers; print(diffusers.__version__)"],
                           capture_output=True, text=True, timeout=max(5.0, budget.left()))
    if check.returncode != 0:
        raise RuntimeError(f"installed {names} into {target}, but diffusers does not import: "
                           f"{(check.stderr.strip().splitlines() or [''])[-1][:300]}")
    result.lines.append(f"installed {names} into {target}; diffusers {check.stdout.strip()} imports")
