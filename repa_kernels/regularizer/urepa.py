"""`UrepaRegularizer`: U-REPA on a diffusers UNet's mid-block, built from the urepa_* keys (SPEC §2.2, §3-§7).

    reg = UrepaRegularizer.from_config(cfg, unet=unet, vae=vae, max_train_steps=10_000)
    pred = unet(...)                             # the hook captures mid_block
    reg_loss, logs = reg(latents=clean_latents, step=global_step)
    (diffusion_loss + reg_loss).backward()

The mid-block tokens (B, h*w, C) are projected to the encoder width, then upsampled (bilinear) to the
encoder's patch grid (project first, then upsample, as the U-REPA paper does); the loss is
λ · (−mean cosine + urepa_manifold_weight · manifold).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..functional import urepa_loss
from .base import AlignmentRegularizerBase, model_device, model_list, scalar
from .capture import HiddenStateCapture, detect_family, unwrap_model
from .config import UrepaConfig
from .encoder import FrozenEncoder
from .grids import parse_token_grid, resample_grid, tokens_to_grid
from .projector import attach_projector
from .schedule import CoefficientSchedule
from .teacher import PixelTeacher, teacher_from_features
from .vae import Denormalize, LatentDecoder

PROJECTOR_NAME = "urepa_projector"


class UrepaRegularizer(AlignmentRegularizerBase):
    """U-REPA regularizer on a UNet (UNet2DConditionModel: SD1.5, SDXL, Kolors, ...).

    Call after the UNet's forward: `reg(latents=..., step=...)` (or `pixels=` / `teacher_features=`)
    returns `(weighted_loss, logs)`; logs are detached scalar tensors (SPEC §6). The state_dict holds the
    schedule state; the projector lives on the UNet as `urepa_projector` and is saved with it (or with a
    PEFT adapter via `modules_to_save`). The encoder and VAE are in no state_dict.
    """

    projector_name = PROJECTOR_NAME
    prefix = "urepa"
    config_class = UrepaConfig

    def __init__(self, config: UrepaConfig, *, unet, vae=None, encoder: str | nn.Module | None = None, tae=None,
                 denormalize: Denormalize | None = None, max_train_steps: int | None = None,
                 hidden_size: int | None = None, encoder_dtype: str = "float32", impl: str = "auto",
                 check_finite: bool = False) -> None:
        """config: a UrepaConfig (`from_config` also takes a dict or a JSON path); unet: the UNet or a
        list of UNets sharing one projector; encoder overrides `urepa_model`; encoder_dtype: its compute
        dtype; the other arguments as in `CrepaRegularizer`."""
        super().__init__()
        self._init_settings(config, impl, check_finite)
        models = model_list(unet, "unet")
        schedule = CoefficientSchedule.from_config(config, max_train_steps=max_train_steps)
        if detect_family(unwrap_model(models[0])).kind != "unet":
            raise ValueError(f"{type(unwrap_model(models[0])).__name__} is not a UNet: U-REPA aligns a UNet mid-block; "
                             "use CrepaRegularizer for transformer (DiT) models")
        capture = HiddenStateCapture(models, 0, hidden_size=hidden_size, block_key="the UNet mid_block")
        self.family = capture.family
        device = model_device(capture.models[0])
        try:
            source = config.urepa_model if encoder is None else encoder
            frozen = FrozenEncoder.load(source, dtype=encoder_dtype, tokens="patch").to(device)
            self.teacher_description = f"encoder {source if isinstance(source, str) else type(source).__name__}"
            decoder = LatentDecoder(vae=vae, tae=tae, denormalize=denormalize, use_tae=config.urepa_use_tae,
                                    video=False, use_tae_key="urepa_use_tae")
            teacher = PixelTeacher(frozen, decoder, config.urepa_encoder_image_size)
            projector = attach_projector(capture.models, capture.hidden_size, frozen.hidden_size,
                                         PROJECTOR_NAME).to(device)
        except BaseException:
            capture.detach()
            raise
        self._init_parts(capture, projector, schedule, teacher)

    def forward(self, latents: torch.Tensor | None = None, *, step: int, pixels: torch.Tensor | None = None,
                teacher_features: torch.Tensor | None = None,
                token_grid: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """latents (B, C, H, W) normalised, or pixels (B, 3, H, W) in [0, 1], or teacher_features (B, N, D)
        / (B, 1, N, D); step: the optimizer step. token_grid is accepted for symmetry with
        CrepaRegularizer and must match the mid-block grid when given.

        Returns (λ-weighted loss with grad; logs of detached scalar tensors).
        """
        weight, cutoff, skipped = self._begin_call(step, latents, pixels, teacher_features)
        if skipped is not None:
            return skipped

        captured = self._consume()
        device = self._device()
        grid = captured.grid
        if token_grid is not None and parse_token_grid(token_grid) != grid:
            raise ValueError(f"token_grid={tuple(token_grid)} disagrees with the mid-block grid {tuple(grid)}")
        if latents is not None and latents.dim() != 4:
            raise ValueError(f"latents for a UNet must be (B, C, H, W), got shape {tuple(latents.shape)}")
        z = self.live_projector(captured.model)(tokens_to_grid(captured.student, grid, "mid-block hidden states"))
        self._teacher.follow(device)
        if teacher_features is not None:
            y = teacher_from_features(teacher_features, grid, self.projector.out_features, False).to(device)
        elif pixels is not None:
            y = self._teacher.from_pixels(pixels, 1)
        else:
            y = self._teacher.from_latents(latents, 1)
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"the teacher has batch size {y.shape[0]} but the captured hidden states have "
                             f"{z.shape[0]}: pass the latents / pixels of the same batch as the forward")
        self._require_finite(step, **{"the captured hidden states": captured.student, "the teacher tokens": y})
        z = resample_grid(z, tuple(y.shape[2:4]))      # project first, then upsample to the encoder grid
        result = urepa_loss(z.flatten(2, 3), y.flatten(2, 3).to(z.dtype),
                            manifold_weight=self.config.urepa_manifold_weight, impl=self.impl)
        self.schedule.update(result.similarity)
        loss = result.loss.float() * weight
        logs = {
            "urepa_loss": loss.detach(),
            "urepa_alignment_loss": result.alignment.detach().float(),
            "urepa_manifold_loss": result.manifold.detach().float(),
            "urepa_similarity": result.similarity.float(),
            "urepa_weight": scalar(weight, device),
            "urepa_cutoff": scalar(cutoff, device),
        }
        return loss, self._with_ema(logs)

    def extra_repr(self) -> str:
        return f"family={self.family.name}, teacher={self.teacher_description}, impl={self.impl!r}"
