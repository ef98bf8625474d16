"""`repa-kernels info` (also `python -m repa_kernels.info`): versions, which backend runs where and why.

Reports the Python / torch / triton / package versions, which backend `impl="auto"` picks for CPU and
CUDA tensors (and why), whether each backend is available on each device (with the reason when not),
and how the C++ extension was obtained (prebuilt by setup.py or built just in time) with its flags.
Asking about the C++ backend loads the extension, which compiles it on first use when it was not
prebuilt. `--json` prints the same facts as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

import torch

from . import __version__, backends


def _version_of(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError as exc:
        return f"not installed ({exc})"
    return getattr(module, "__version__", "unknown version")


def _auto_choice(device: torch.device) -> dict[str, str]:
    """What impl='auto' resolves to on `device` and why (the fallback warning becomes the reason)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            chosen = backends.resolve("auto", device)
        except Exception as exc:  # e.g. REPA_KERNELS_IMPL names an unavailable backend
            return {"backend": "none", "why": f"{type(exc).__name__}: {exc}"}
    if caught:
        return {"backend": chosen, "why": str(caught[-1].message)}
    return {"backend": chosen, "why": backends.status(chosen, device)[1]}


def collect() -> dict:
    """Every fact `info` prints, as plain data."""
    cuda_visible = torch.cuda.is_available()
    facts: dict = {
        "repa_kernels": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        "triton": _version_of("triton"),
        "cpu threads": torch.get_num_threads(),
        "REPA_KERNELS_IMPL": os.environ.get(backends.ENV_VAR) or "(unset)",
        "cuda device": torch.cuda.get_device_name(0) if cuda_visible else "none visible (torch.cuda.is_available() is False)",
        "auto": {},
        "backends": {},
    }
    for device_type in ("cpu", "cuda"):
        device = torch.device(device_type)
        choice = _auto_choice(device)
        if device_type == "cuda" and not cuda_visible:
            choice["why"] = "no CUDA device here; on one: " + choice["why"]
        facts["auto"][device_type] = choice
        facts["backends"][device_type] = {}
        for name in backends.BACKENDS:
            ok, reason = backends.status(name, device)
            facts["backends"][device_type][name] = {"available": ok, "reason": reason}
    facts["cpp extension"] = _extension_facts()
    return facts


def _extension_facts() -> dict:
    try:
        from .ops import cpp
    except ImportError as exc:
        return {"loaded": False, "reason": f"repa_kernels.ops.cpp failed to import: {exc}"}
    state = cpp.extension()
    facts = {"loaded": state.loaded, "reason": state.reason}
    if state.loaded:
        facts.update(how=state.how, path=state.path, flags=" ".join(state.flags) + " (plus torch's defaults)")
        if state.build_seconds is not None:
            facts["build seconds"] = round(state.build_seconds, 1)
        facts.update(cpp.build_info())
        facts["buffer cache"] = _buffer_cache_fact(cpp)
    return facts


def _buffer_cache_fact(cpp) -> str:
    try:
        cache = cpp.buffer_cache_stats()
    except RuntimeError as exc:  # a bad REPA_KERNELS_CPU_CACHE_MB: the kernels will raise the same
        return f"unusable: {exc}"
    if cache["limit_bytes"] == 0:
        return "off (REPA_KERNELS_CPU_CACHE_MB=0)"
    return (f"keeps up to {cache['limit_bytes'] >> 20} MB of freed gradient and scratch buffers for reuse "
            f"(REPA_KERNELS_CPU_CACHE_MB); now {cache['cached_bytes'] >> 20} MB in {cache['cached_blocks']} blocks")


def render(facts: dict) -> str:
    lines = [f"repa-kernels {facts['repa_kernels']}"]
    for key in ("python", "platform", "torch", "triton", "cpu threads", "REPA_KERNELS_IMPL", "cuda device"):
        lines.append(f"  {key}: {facts[key]}")
    lines.append("impl='auto' picks:")
    for device_type, choice in facts["auto"].items():
        lines.append(f"  {device_type}: {choice['backend']} ({choice['why']})")
    lines.append("backends:")
    for device_type, table in facts["backends"].items():
        for name, entry in table.items():
            state = "available" if entry["available"] else "unavailable"
            lines.append(f"  {device_type:<4} {name:<9} {state}: {entry['reason']}")
    lines.append("C++ extension:")
    for key, value in facts["cpp extension"].items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def run(args: argparse.Namespace) -> int:
    facts = collect()
    print(json.dumps(facts, indent=2) if args.json else render(facts))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repa_kernels.info", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
