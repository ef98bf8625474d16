"""What decides whether a backend can run: the error an explicit request for one that cannot raises, and
whether Triton runs in its CPU interpreter.

It sits below the backend modules and `repa_kernels.backends` (both import it), so that the kernels
never import the layer that selects them.
"""

from __future__ import annotations

import os


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given device."""


def triton_interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
