"""Regularizer facade (docs/contract.md §3-§7): `CrepaRegularizer` (REPA / CREPA on DiTs) and
`UrepaRegularizer` (UNets), built from the documented config keys, with the configs, their argparse helper and the schedule."""

from .capture import HiddenStateCapture
from .config import CrepaConfig, UrepaConfig, add_argparse_args
from .crepa import CrepaRegularizer
from .families import FAMILIES, CaptureError, ModelFamily
from .flow_latents import clean_latents_from_flow_target
from .encoder import ENCODER_HUB_IDS, EncoderLoadError, FrozenEncoder
from .projector import AlignmentProjector
from .schedule import CoefficientSchedule
from .urepa import UrepaRegularizer
from .vision_teachers import Preprocessing, VisionTeacher, register_teacher

__all__ = [
    "FAMILIES",
    "ENCODER_HUB_IDS",
    "AlignmentProjector",
    "CaptureError",
    "CoefficientSchedule",
    "CrepaConfig",
    "CrepaRegularizer",
    "EncoderLoadError",
    "FrozenEncoder",
    "HiddenStateCapture",
    "ModelFamily",
    "Preprocessing",
    "UrepaConfig",
    "UrepaRegularizer",
    "VisionTeacher",
    "add_argparse_args",
    "clean_latents_from_flow_target",
    "register_teacher",
]
