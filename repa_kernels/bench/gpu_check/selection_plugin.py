"""pytest plugin of the tests phase: keeps the tests that exercise one device, records each outcome as it
happens, and keeps the C++ extension out of the run.

Loaded with `-p repa_kernels.bench.gpu_check.selection_plugin`. Options:
  --gpu-check-device cuda|cpu   keep a test when a parameter of it is that device (the `device` fixture,
                                the (impl, device) pairs of backend_params), when it carries the `gpu`
                                marker, or when a skipif of it names CUDA or GPU in its reason (the
                                > 2^31-element and peak-memory tests; with cuda they run, with cpu the
                                dry run sees them skip). The sm_90 compile tests are left out: they
                                compile on the CPU and pass here already.
  --gpu-check-results FILE      one JSON line per test outcome, written as each test ends, so a run
                                killed at its budget keeps what finished. With pytest-xdist only the
                                controller writes.
The C++ extension built on the development machine cannot load on the device machine (another Python
and torch), and a just-in-time build at collection (backend_params asks for its status) would cost
its budget: the plugin marks the extension unavailable before any test module is imported.
"""

from __future__ import annotations

import json
import os

import pytest

LEFT_OUT = ("compiles_for_hopper",)
CPU_ONLY = ("cpu", "cpp")  # parameter values of tests that cannot run on the device


def pytest_addoption(parser):
    group = parser.getgroup("gpu check")
    group.addoption("--gpu-check-device", choices=("cuda", "cpu"), default="cuda")
    group.addoption("--gpu-check-results", default=None)


def pytest_configure(config):
    from ...ops import cpp

    cpp._state = cpp.ExtensionState(False, "not loaded in this run (an extension built elsewhere cannot load here)")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _device_param(item, device: str) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(str(value) == device for value in callspec.params.values())


def _names_device_in_skip(item) -> bool:
    """A skipif whose reason names CUDA or GPU, on a test not parametrised for the CPU or the C++ backend."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(str(value) in CPU_ONLY for value in callspec.params.values()):
        return False
    return any(word in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")
               for word in ("CUDA", "GPU"))


def selected(item, device: str) -> bool:
    if any(part in item.name for part in LEFT_OUT):
        return False
    return _device_param(item, device) or item.get_closest_marker("gpu") is not None or _names_device_in_skip(item)


def pytest_collection_modifyitems(session, config, items):
    device = config.getoption("--gpu-check-device")
    keep = [item for item in items if selected(item, device)]
    dropped = [item for item in items if not selected(item, device)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_collection_finish(session):
    """The number of tests that will run, after every deselection (-k included); one xdist worker says it."""
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker in (None, "gw0"):
        _write(session.config, {"selected": len(session.items)}, force=True)


def _write(config, record: dict, force: bool = False) -> None:
    path = config.getoption("--gpu-check-results")
    if path is None or (_is_worker(config) and not force):
        return
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def pytest_runtest_logreport(report):
    config = _config
    if config is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        outcome = report.outcome
        if report.when != "call" and outcome == "failed":
            outcome = "error"
        message = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.failed:
            message = (getattr(report, "longreprtext", "") or "").strip().splitlines()[-1:] or [""]
            message = message[0]
        _write(config, {"nodeid": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
                        "message": message[:300]})


_config = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    global _config
    _config = session.config
