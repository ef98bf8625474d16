"""Teacher tokens from latents, pixels or precomputed features (SPEC §3, §7).

All three paths end in the same layout: (B, T, h, w, D) float32 on the encoder grid, where T is the
student's frame count. Only the frames that are used are encoded (one per student frame).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoder import FrozenEncoder
from .grids import TokenGrid, encoder_input_size, image_grid_from_aspect, select_frames
from .vae import LatentDecoder


def check_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) or (B, 3, H, W) floats in [0, 1] -> (B, F, 3, H, W)."""
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise TypeError(f"pixels must be a floating-point tensor in [0, 1], got "
                        f"{pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
    if pixels.dim() == 4:
        pixels = pixels.unsqueeze(1)
    if pixels.dim() != 5 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (B, F, 3, H, W) or (B, 3, H, W) in [0, 1], got shape {tuple(pixels.shape)}")
    return pixels


class PixelTeacher:
    """Decodes (when given latents), picks one frame per student frame, resizes to the encoder's input
    size and encodes.

    encoder: the frozen encoder; decoder: the latent decoder (may have no VAE when only pixels are
    passed); image_size: S of `*_encoder_image_size` (the encoder sees about S x S pixels per frame).
    """

    def __init__(self, encoder: FrozenEncoder, decoder: LatentDecoder, image_size: int) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.image_size = int(image_size)
        self.frames_decoded = 0

    def follow(self, device: torch.device) -> None:
        """Keep the encoder on the student's device (the trainer may move the model after building the
        regularizer, e.g. accelerator.prepare); a no-op when it is there already."""
        if self.encoder.mean.device != device:
            self.encoder.to(device)

    def from_latents(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames = self.decoder.decode(latents)
        self.frames_decoded += frames.shape[0] * frames.shape[1]
        return self._encode_selected(frames, num_frames)

    def from_pixels(self, pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self._encode_selected(check_pixels(pixels), num_frames)

    def _encode_selected(self, frames: torch.Tensor, num_frames: int) -> torch.Tensor:
        batch, total = frames.shape[:2]
        if total < num_frames:
            raise ValueError(f"{total} frames were given but the student has {num_frames} frames; every student "
                             "frame needs a frame to align to")
        picked = frames[:, select_frames(total, num_frames)].flatten(0, 1)
        height, width = encoder_input_size(picked.shape[-2], picked.shape[-1], self.image_size,
                                           self.encoder.patch_size)
        picked = picked.to(device=self.encoder.mean.device, dtype=torch.float32)
        if (height, width) != tuple(picked.shape[-2:]):
            picked = F.interpolate(picked, size=(height, width), mode="bilinear", align_corners=False,
                                   antialias=True).clamp_(0.0, 1.0)
        tokens = self.encoder.encode(picked)
        if self.encoder.tokens == "cls":
            return tokens.reshape(batch, num_frames, 1, 1, -1)
        p = self.encoder.patch_size
        return tokens.reshape(batch, num_frames, height // p, width // p, -1)


def teacher_from_features(features: torch.Tensor, grid: TokenGrid, width: int, cls_tokens: bool) -> torch.Tensor:
    """Precomputed teacher features (B, T, N, D) or (B, N, D) -> (B, T', h, w, D) float32.

    T > T' picks frames on an even spacing (one per student frame); N is laid on a grid with the
    student's aspect ratio (N = 1 for CLS features).
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("teacher_features must be a floating-point tensor (B, T, N, D)")
    if features.dim() == 3:
        features = features.unsqueeze(1)
    if features.dim() != 4:
        raise ValueError(f"teacher_features must be (B, T, N, D) or (B, N, D), got shape {tuple(features.shape)}")
    batch, frames, tokens, dim = features.shape
    if dim != width:
        raise ValueError(f"teacher_features have width {dim} but the projector maps to the encoder width {width}")
    if frames < grid.frames:
        raise ValueError(f"teacher_features have {frames} frames but the student has {grid.frames}")
    if frames > grid.frames:
        features = features[:, select_frames(frames, grid.frames)]
    if cls_tokens:
        if tokens != 1:
            raise ValueError(f"crepa_encoder_tokens='cls' needs teacher_features with one token per frame, got "
                             f"{tokens}")
        return features.reshape(batch, grid.frames, 1, 1, dim).float()
    layout = image_grid_from_aspect(tokens, grid.height, grid.width, "teacher_features")
    return features.reshape(batch, grid.frames, layout.height, layout.width, dim).float()
