"""pytest parameters for the backends: one per impl, skipped (with the reason) where it cannot run."""

from __future__ import annotations

import pytest
import torch

from repa_kernels import backends


def impl_param(name: str, device: str | None = None):
    """The parameter `name` for CPU tensors ("auto" always runs), or with a device the pair
    (name, device), id "name-device"."""
    where = device or "cpu"
    ok, reason = (True, "") if name == "auto" else backends.status(name, torch.device(where))
    mark = pytest.mark.skipif(not ok, reason=f"impl={name} unavailable on {where}: {reason}")
    if device is None:
        return pytest.param(name, id=name, marks=mark)
    return pytest.param(name, device, id=f"{name}-{device}", marks=mark)
