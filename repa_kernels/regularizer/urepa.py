"""`UrepaRegularizer`: U-REPA on a diffusers UNet's mid-block, built from the urepa_* keys
(docs/contract.md §2.2, §3-§7).

    reg = UrepaRegularizer.from_config(cfg, unet=unet, vae=vae, max_train_steps=10_000)
    pred = unet(...)                             # the hook captures mid_block
    reg_loss, logs = reg(latents=clean_latents, step=global_step)
    (diffusion_loss + reg_loss).backward()

The mid-block tokens (B, h*w, C) are projected to the encoder width, then upsampled (bilinear) to the
encoder's patch grid (project first, then upsample, as the U-REPA paper does); the loss is
λ · (−mean cosine + urepa_manifold_weight · manifold).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..functional import urepa_loss
from .base import AlignmentRegularizerBase, model_list
from .config import UrepaConfig
from .families import detect_family, unwrap_model
from .grids import resample_grid
from .schedule import CoefficientSchedule
from .teacher import EncoderTeacher
from .vae import Denormalize

PROJECTOR_NAME = "urepa_projector"   # its key prefix in older checkpoints (on the model)


class UrepaRegularizer(AlignmentRegularizerBase):
    """U-REPA regularizer on a UNet (UNet2DConditionModel: SD1.5, SDXL, Kolors, ...).

    Call after the UNet's forward: `reg(latents=..., step=...)` (or `pixels=` / `teacher_features=`)
    returns `(weighted_loss, logs)`; logs are detached scalar tensors (docs/contract.md §6). The state_dict holds the
    projector's weights and the schedule state; parameters() are the projector's (give them to the
    optimizer). The encoder and VAE are in no state_dict.

    The call, `reg(latents=None, *, step, pixels=None, teacher_features=None, token_grid=None,
    cache_keys=None)`: latents
    (B, C, H, W) normalised, or pixels (B, 3, H, W) in [0, 1], or teacher_features (B, N, D) / (B, 1, N, D);
    step: the optimizer step. token_grid is accepted for symmetry with CrepaRegularizer and must match the
    mid-block grid when given; cache_keys as in CrepaRegularizer. Returns (λ-weighted loss with grad; logs of detached scalar tensors).
    """

    student_description = "mid-block hidden states"

    projector_name = PROJECTOR_NAME
    prefix = "urepa"
    config_class = UrepaConfig

    def __init__(self, config: UrepaConfig, *, unet, vae=None, encoder: str | nn.Module | None = None, tae=None,
                 denormalize: Denormalize | None = None, max_train_steps: int | None = None,
                 hidden_size: int | None = None, encoder_dtype: str = "float32", impl: str = "auto",
                 check_finite: bool = False, feature_cache: str | os.PathLike | None = None,
                 feature_cache_dtype: str = "bfloat16", decode=None) -> None:
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

        def make_teacher(capture, device):
            return EncoderTeacher.build(
                config.urepa_model if encoder is None else encoder, device=device, dtype=encoder_dtype, tokens="patch",
                image_size=config.urepa_encoder_image_size, vae=vae, tae=tae, denormalize=denormalize,
                use_tae=config.urepa_use_tae, video=False, use_tae_key="urepa_use_tae", decode=decode)

        self._attach(models, make_teacher, schedule, block_index=0, hidden_size=hidden_size,
                     block_key="the UNet mid_block", feature_cache=feature_cache,
                     feature_cache_dtype=feature_cache_dtype)

    def _loss(self, z: torch.Tensor, y: torch.Tensor):
        z = resample_grid(z, tuple(y.shape[2:4]))      # project first, then upsample to the encoder grid
        result = urepa_loss(z.flatten(2, 3), y.flatten(2, 3).to(z.dtype),
                            manifold_weight=self.config.urepa_manifold_weight, impl=self.impl)
        logs = {
            "urepa_alignment_loss": result.alignment.detach().float(),
            "urepa_manifold_loss": result.manifold.detach().float(),
            "urepa_similarity": result.similarity.float(),
        }
        return result.loss, result.similarity, logs

    def extra_repr(self) -> str:
        return f"family={self.family.name}, teacher={self.teacher_description}, impl={self.impl!r}"
