"""Benchmarks of docs/contract.md §8: workloads, providers, measurement, and the `repa-kernels bench` command."""

from .measure import DevicePeaks, ModeResult, device_peaks, run_isolated, run_modes, time_mode
from .providers import PROVIDERS, availability, loss_function
from .workloads import MODES, WORKLOADS, Workload, default_workloads, get_workload

__all__ = [
    "DevicePeaks", "MODES", "ModeResult", "PROVIDERS", "WORKLOADS", "Workload", "availability",
    "default_workloads", "device_peaks", "get_workload", "loss_function", "run_isolated", "run_modes",
    "time_mode",
]
