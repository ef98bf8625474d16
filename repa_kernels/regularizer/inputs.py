"""The inputs of one regularizer call, checked once before any costly work (docs/contract.md §3, §6).

`CallInputs.check` takes the call's keyword arguments (latents=, pixels=, teacher_features=,
token_grid=) and checks what needs no model output: which teacher input was given (exactly one; none in
backbone mode), the dtypes, the ranks, the token grid's form. The call compares the teacher input's batch
size with the captured hidden states' right after the capture is taken, so a mismatched batch is refused
before the VAE decodes or the encoder runs (both cost far more than these checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .feature_cache import canonical_key
from .grids import TokenGrid, parse_token_grid

TEACHER_INPUTS = ("latents", "pixels", "teacher_features")


def _dtype_or_type(value) -> object:
    return value.dtype if isinstance(value, torch.Tensor) else type(value).__name__


def check_latents(latents) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor (the clean latents in the trainer's normalised "
                        f"space), got {_dtype_or_type(latents)}")
    return latents


def check_pixels(pixels) -> torch.Tensor:
    """(B, F, 3, H, W) or (B, 3, H, W) floats in [0, 1] -> (B, F, 3, H, W)."""
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise TypeError(f"pixels must be a floating-point tensor in [0, 1], got {_dtype_or_type(pixels)}")
    if pixels.dim() == 4:
        pixels = pixels.unsqueeze(1)
    if pixels.dim() != 5 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (B, F, 3, H, W) or (B, 3, H, W) in [0, 1], got shape {tuple(pixels.shape)}")
    return pixels


def check_teacher_features(features) -> torch.Tensor:
    """(B, T, N, D) or (B, N, D) floats -> (B, T, N, D)."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("teacher_features must be a floating-point tensor (B, T, N, D)")
    if features.dim() == 3:
        features = features.unsqueeze(1)
    if features.dim() != 4:
        raise ValueError(f"teacher_features must be (B, T, N, D) or (B, N, D), got shape {tuple(features.shape)}")
    return features


def check_cache_keys(keys, batch: int) -> tuple[str, ...]:
    """One feature-cache key per sample (a str, or a dict / list of JSON values), canonical."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise TypeError(f"cache_keys must be a list with one key per sample (str or a dict / list of JSON values), "
                        f"got {type(keys).__name__}")
    if len(keys) != batch:
        raise ValueError(f"cache_keys has {len(keys)} keys but the batch has {batch} samples: pass one key per sample")
    return tuple(canonical_key(key) for key in keys)   # a repeated key is the same sample twice: one entry


@dataclass(frozen=True)
class CallInputs:
    """One call's checked inputs: `pixels` is (B, F, 3, H, W), `teacher_features` (B, T, N, D), `token_grid`
    a TokenGrid or None; `teacher_input` names the one the teacher takes and `teacher_batch` is its batch
    size (both None in backbone mode), which the call compares with the captured hidden states' before the
    teacher decodes or encodes anything."""

    latents: torch.Tensor | None
    pixels: torch.Tensor | None
    teacher_features: torch.Tensor | None
    token_grid: TokenGrid | None
    teacher_input: str | None
    teacher_batch: int | None
    cache_keys: tuple[str, ...] | None = None

    @classmethod
    def check(cls, latents=None, pixels=None, teacher_features=None, token_grid=None, *,
              backbone_block: int | None = None, cache_keys=None) -> "CallInputs":
        """backbone_block: the teacher block in backbone mode, which takes no teacher input (latents, if
        given, only check the token grid); None when exactly one teacher input is required. cache_keys:
        one feature-cache key per sample of the latents / pixels (canonical strings afterwards)."""
        given = [name for name, v in zip(TEACHER_INPUTS, (latents, pixels, teacher_features)) if v is not None]
        if backbone_block is not None:
            if pixels is not None or teacher_features is not None:
                raise ValueError("backbone mode (crepa_use_backbone_features) takes its teacher from block "
                                 f"{backbone_block}; do not pass pixels or teacher_features")
            teacher_input = None
        elif len(given) != 1:
            raise ValueError(f"pass exactly one of latents=, pixels=, teacher_features= (got "
                             f"{', '.join(given) or 'none'})")
        else:
            teacher_input = given[0]
        inputs = {"latents": None if latents is None else check_latents(latents),
                  "pixels": None if pixels is None else check_pixels(pixels),
                  "teacher_features": None if teacher_features is None else check_teacher_features(teacher_features)}
        teacher_batch = None if teacher_input is None else inputs[teacher_input].shape[0]
        if cache_keys is not None:
            if teacher_input not in ("latents", "pixels"):
                raise ValueError(f"cache_keys= names the samples whose latents or pixels the teacher would encode; "
                                 f"this call has {'no teacher input (backbone mode)' if teacher_input is None else 'teacher_features='}, "
                                 "so there is nothing to cache: drop cache_keys")
            cache_keys = check_cache_keys(cache_keys, teacher_batch)
        return cls(**inputs, token_grid=None if token_grid is None else parse_token_grid(token_grid),
                   teacher_input=teacher_input, teacher_batch=teacher_batch, cache_keys=cache_keys)
