"""repa_kernels: fused kernels and drop-in losses for REPA / CREPA / U-REPA regularizers."""

from ._version import __version__
from .backends import BackendUnavailableError
from .functional import CrepaResult, UrepaResult, crepa_loss, crepa_loss_with_options, manifold_loss, urepa_loss
from .losses import CrepaLoss, ManifoldLoss, UrepaLoss
from .options import CrepaOptions

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "CrepaLoss",
    "CrepaOptions",
    "CrepaResult",
    "ManifoldLoss",
    "UrepaLoss",
    "UrepaResult",
    "crepa_loss",
    "crepa_loss_with_options",
    "manifold_loss",
    "urepa_loss",
]
