"""Where a regularizer's teacher tokens come from, decided once when it is built (docs/contract.md §3, §7).

- `EncoderTeacher`: a frozen vision encoder. Given latents it decodes them with the VAE (or the tiny
  decoder) first; given pixels it encodes them as they are; given precomputed `teacher_features` it lays
  them out like its own tokens (a `FeatureTeacher` of its width and token kind).
- `FeatureTeacher`: precomputed features (B, T, N, D) / (B, N, D), laid on the student's grid.
- `BackboneTeacher`: a deeper block of the same forward pass (detached): no encoder, no decode.

Each answers `tokens(inputs, captured, grid, device)` with (B, T, h, w, D) float32 on `device`, T being
the student's frame count (h = w = 1 for CLS tokens). Only the frames that are used are encoded (one per
student frame). The feature and encoder teachers also take `frames=(low, high)`: the student frames
[low, high) only (a rank's window under context parallelism, context_parallel.py), and only those are
decoded (a causal prefix, vae.py) and encoded. Adding a teacher is one class with that method and its
test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoder import FrozenEncoder
from .grids import TokenGrid, image_grid_from_aspect, select_frames, teacher_input_size
from .inputs import CallInputs, check_pixels
from .vae import LatentDecoder, drop_vae_encoder


class FeatureTeacher:
    """Precomputed teacher features (B, T, N, D) -> (B, T', h, w, D) float32.

    T > T' picks frames on an even spacing (one per student frame); N is laid on a grid with the
    student's aspect ratio (N = 1 for CLS features). width: D the projector maps to; cls_tokens: one
    token per frame expected.
    """

    def __init__(self, width: int, cls_tokens: bool) -> None:
        self.width = int(width)
        self.cls_tokens = bool(cls_tokens)

    def tokens(self, inputs: CallInputs, captured, grid: TokenGrid, device: torch.device,
               frames: tuple[int, int] | None = None) -> torch.Tensor:
        features = inputs.teacher_features
        batch, given, tokens, dim = features.shape
        if dim != self.width:
            raise ValueError(f"teacher_features have width {dim} but the projector maps to the encoder width "
                             f"{self.width}")
        if given < grid.frames:
            raise ValueError(f"teacher_features have {given} frames but the student has {grid.frames}")
        picks = select_frames(given, grid.frames)[slice(*frames) if frames else slice(None)]
        if picks != list(range(given)):
            features = features[:, picks]
        if self.cls_tokens:
            if tokens != 1:
                raise ValueError(f"crepa_encoder_tokens='cls' needs teacher_features with one token per frame, got "
                                 f"{tokens}")
            return features.reshape(batch, len(picks), 1, 1, dim).float().to(device)
        layout = image_grid_from_aspect(tokens, grid.height, grid.width, "teacher_features")
        return features.reshape(batch, len(picks), layout.height, layout.width, dim).float().to(device)


class EncoderTeacher:
    """Decodes (when given latents), picks one frame per student frame, resizes to the encoder's input
    size and encodes; precomputed features of the encoder's width are taken as they are.

    encoder: the frozen encoder; decoder: the latent decoder (may have no VAE when only pixels are
    passed); image_size: S of `*_encoder_image_size` (the encoder sees about S x S pixels per frame).
    """

    def __init__(self, encoder: FrozenEncoder, decoder: LatentDecoder, image_size: int,
                 description: str = "encoder") -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.image_size = int(image_size)
        self.width = encoder.hidden_size
        self.description = description
        self.features = FeatureTeacher(encoder.hidden_size, encoder.tokens == "cls")
        self.frames_decoded = 0
        self.drop_encoder_of_vae = False   # crepa_drop_vae_encoder: also for a VAE set later
        # The (min, max) of each frames input this call encoded whose range nothing guarantees (pixels=, a
        # decode= callable's frames), as (what, 2-element device tensor): the regularizer reads them with
        # the schedule's one host read, refuses values outside [0, 1] and empties the list.
        self.input_ranges: list[tuple[str, torch.Tensor]] = []

    @classmethod
    def build(cls, source, *, device: torch.device, dtype: str, tokens: str, image_size: int,
              frames_batch_size: int = -1, vae=None, tae=None, denormalize=None, use_tae: bool = False,
              video: bool, use_tae_key: str = "crepa_use_tae", drop_encoder_of_vae: bool = False,
              decode=None) -> "EncoderTeacher":
        """The encoder (a name, hub id, local path or a teacher's module) on `device`, and the latent decoder."""
        decoder = LatentDecoder(vae=vae, tae=tae, denormalize=denormalize, use_tae=use_tae, video=video,
                                use_tae_key=use_tae_key, decode=decode)
        frozen = FrozenEncoder.load(source, dtype=dtype, frames_batch_size=frames_batch_size, tokens=tokens).to(device)
        teacher = cls(frozen, decoder, image_size, f"encoder {source if isinstance(source, str) else type(source).__name__}")
        teacher.drop_encoder_of_vae = drop_encoder_of_vae
        if drop_encoder_of_vae and vae is not None:
            drop_vae_encoder(vae)
        return teacher

    def set_decoder(self, decoder: LatentDecoder) -> None:
        """Decode later `latents=` calls with `decoder` (the trainer's VAE given after construction)."""
        if self.drop_encoder_of_vae and decoder.vae is not None:
            drop_vae_encoder(decoder.vae)
        self.decoder = decoder

    @property
    def frames_encoded(self) -> int:
        return self.encoder.frames_encoded

    def follow(self, device: torch.device) -> None:
        """Keep the encoder on the student's device (the trainer may move the model after building the
        regularizer, e.g. accelerator.prepare); a no-op when it is there already."""
        if self.encoder.mean.device != device:
            self.encoder.to(device)

    def tokens(self, inputs: CallInputs, captured, grid: TokenGrid, device: torch.device,
               frames: tuple[int, int] | None = None) -> torch.Tensor:
        if inputs.teacher_features is not None:
            return self.features.tokens(inputs, captured, grid, device, frames)
        self.follow(device)
        if inputs.pixels is not None:
            return self.encode_frames(inputs.pixels, grid.frames, source="pixels", window=frames)
        return self.from_latents(inputs.latents, grid.frames, window=frames)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> frames (B, F, 3, H, W) in [0, 1], counted in frames_decoded."""
        frames = self.decoder.decode(latents)
        self.frames_decoded += frames.shape[0] * frames.shape[1]
        return frames

    def from_latents(self, latents: torch.Tensor, num_frames: int,
                     window: tuple[int, int] | None = None) -> torch.Tensor:
        """window: student frames [low, high) only; a causal VAE then decodes just the latent prefix that
        makes the window's last frame (vae.LatentDecoder.causal_prefix), any other decodes every frame."""
        source = self.decoder.range_source
        prefix = None if window is None else self.decoder.causal_prefix(latents)
        if prefix is None:
            return self.encode_frames(self.decode(latents), num_frames, source=source, window=window)
        total, latent_frames_for = prefix
        last_pixel_frame = select_frames(total, num_frames)[window[1] - 1]
        frames = self.decode(latents[:, :, :latent_frames_for(last_pixel_frame)])
        return self.encode_frames(frames, num_frames, source=source, window=window, total=total)

    def from_pixels(self, pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.encode_frames(check_pixels(pixels), num_frames)

    def encode_frames(self, frames: torch.Tensor, num_frames: int, source: str | None = None,
                      window: tuple[int, int] | None = None, total: int | None = None) -> torch.Tensor:
        """frames (B, F, 3, H, W) in [0, 1] -> (B, T, h, w, D) float32: the frames at
        select_frames(F, num_frames), resized to the encoder's input size and encoded. source: what the
        frames are ("pixels", a decode= callable) when their range must be checked (input_ranges);
        None for a VAE's frames, which the decode clamps. window: the student frames [low, high) only
        (T = high - low); total: the clip's frame count when `frames` is its first frames only (a causal
        prefix decode), for the frame choice of the whole clip."""
        batch = frames.shape[0]
        total = frames.shape[1] if total is None else total
        if total < num_frames:
            raise ValueError(f"{total} frames were given but the student has {num_frames} frames; every student "
                             "frame needs a frame to align to")
        picks = select_frames(total, num_frames)[slice(*window) if window else slice(None)]
        picked = frames[:, picks].flatten(0, 1)
        if source is not None:   # on the device, no read: before the resize, which would clamp them
            self.input_ranges.append((source, torch.stack(torch.aminmax(picked.detach()))))
        height, width = teacher_input_size(self.encoder.resize, picked.shape[-2], picked.shape[-1],
                                           self.image_size, self.encoder.patch_size)
        picked = picked.to(device=self.encoder.mean.device, dtype=torch.float32)
        if (height, width) != tuple(picked.shape[-2:]):
            picked = F.interpolate(picked, size=(height, width), mode="bilinear", align_corners=False,
                                   antialias=True).clamp_(0.0, 1.0)
        tokens = self.encoder.encode(picked)
        if self.encoder.tokens == "cls":
            return tokens.reshape(batch, len(picks), 1, 1, -1)
        p = self.encoder.patch_size
        return tokens.reshape(batch, len(picks), height // p, width // p, -1)


class BackboneTeacher:
    """The detached output of a deeper block of the same forward (crepa_use_backbone_features), captured
    by the same hooks as the student and laid on the student's grid."""

    encoder = None
    frames_decoded = 0
    frames_encoded = 0

    def __init__(self, family, block_index: int, width: int) -> None:
        self.family = family
        self.block_index = int(block_index)
        self.width = int(width)
        self.description = f"backbone block {block_index}"

    def tokens(self, inputs: CallInputs, captured, grid: TokenGrid, device: torch.device) -> torch.Tensor:
        """The whole sequence's teacher tokens; under context parallelism the teacher block is sharded as
        the student's and the regularizer gathers a rank's window of it from the other ranks instead."""
        return self.family.image_tokens(captured.teacher, grid, "teacher block hidden states", captured.model).float()
