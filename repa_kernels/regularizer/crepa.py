"""`CrepaRegularizer`: REPA for image DiTs and CREPA for video DiTs, built from the crepa_* keys (SPEC §3-§7).

    reg = CrepaRegularizer.from_config(cfg, transformer=transformer, vae=vae, max_train_steps=10_000)
    pred = transformer(...)                      # the hook captures block crepa_block_index
    reg_loss, logs = reg(latents=clean_latents, step=global_step)
    (diffusion_loss + reg_loss).backward()

Build it before the optimizer, `accelerator.prepare`, DDP or PEFT wrapping: it registers the projector on
the transformer as `crepa_projector` so optimizers see it and PEFT can save it (`modules_to_save`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..functional import crepa_loss_with_options
from .base import AlignmentRegularizerBase, model_device, model_list, scalar
from .capture import HiddenStateCapture, detect_family, grid_from_latents, unwrap_model
from .config import CrepaConfig
from .encoder import FrozenEncoder
from .grids import TokenGrid, align_grids, image_grid_from_aspect, mean_pool, parse_token_grid, tokens_to_grid
from .projector import attach_projector
from .schedule import CoefficientSchedule
from .teacher import PixelTeacher, check_pixels, teacher_from_features
from .vae import Denormalize, LatentDecoder, drop_vae_encoder

PROJECTOR_NAME = "crepa_projector"


class CrepaRegularizer(AlignmentRegularizerBase):
    """REPA / CREPA regularizer on a diffusers transformer.

    Call after the transformer's forward: `reg(latents=..., step=...)` (or `pixels=` / `teacher_features=`)
    returns `(weighted_loss, logs)`; logs are detached scalar tensors (SPEC §6). The module's state_dict
    holds the schedule state (EMA, cutoff), so a resumed run continues exactly; the projector lives on
    the transformer as `crepa_projector` and is saved with it (or with a PEFT adapter listing it in
    `modules_to_save`; the regularizer then runs PEFT's trainable copy). The frozen encoder and the VAE
    are in no state_dict. The encoder follows the projector's device at each call (the projector moves
    with the transformer, e.g. under accelerator.prepare); the VAE decodes on its own device.
    """

    projector_name = PROJECTOR_NAME
    prefix = "crepa"
    config_class = CrepaConfig

    def __init__(self, config: CrepaConfig, *, transformer, vae=None, encoder: str | nn.Module | None = None,
                 tae=None, denormalize: Denormalize | None = None, max_train_steps: int | None = None,
                 hidden_size: int | None = None, impl: str = "auto", check_finite: bool = False) -> None:
        """config: a CrepaConfig (`from_config` also takes a dict or a JSON path).

        transformer: the diffusers transformer, or a list of transformers sharing one projector.
        vae: the trainer's VAE, needed for `latents=` calls; encoder: overrides `crepa_encoder` (a name,
        hub id, local path or a Dinov2 module); tae: tiny decoder for `crepa_use_tae`; denormalize: latent
        denormalisation for VAE classes without a known rule; max_train_steps: total steps (wins over the
        config's); hidden_size: width of the block outputs when the model config does not give it;
        impl: kernel backend ("auto", "triton", "cpp", "reference"); check_finite: raise FloatingPointError
        on NaN/Inf in the inputs, the captured hidden states or the teacher tokens (one host sync each;
        off by default, when non-finite values propagate to the loss and stay out of the EMA).
        """
        super().__init__()
        self._init_settings(config, impl, check_finite)
        models = model_list(transformer, "transformer")
        self.backbone = bool(config.crepa_use_backbone_features)
        self.options = config.crepa_options()
        schedule = CoefficientSchedule.from_config(config, max_train_steps=max_train_steps)
        teacher_index = config.crepa_teacher_block_index if self.backbone else None
        if self.backbone and teacher_index == config.crepa_block_index:
            raise ValueError(f"crepa_teacher_block_index={teacher_index} equals crepa_block_index: backbone mode "
                             "needs a different block as the teacher")
        if detect_family(unwrap_model(models[0])).kind == "unet":
            raise ValueError(f"{type(unwrap_model(models[0])).__name__} is a UNet: use UrepaRegularizer (U-REPA aligns "
                             "the UNet mid-block); CrepaRegularizer serves transformer (DiT) models")
        capture = HiddenStateCapture(models, config.crepa_block_index, teacher_block_index=teacher_index,
                                     hidden_size=hidden_size)
        self.family = capture.family
        device = model_device(capture.models[0])
        teacher = None
        try:
            if self.backbone:
                width = capture.hidden_size
                self.teacher_description = f"backbone block {teacher_index}"
            else:
                source = config.crepa_encoder if encoder is None else encoder
                frozen = FrozenEncoder.load(source, dtype=config.crepa_encoder_dtype,
                                            frames_batch_size=config.crepa_encoder_frames_batch_size,
                                            tokens=config.crepa_encoder_tokens).to(device)
                decoder = LatentDecoder(vae=vae, tae=tae, denormalize=denormalize, use_tae=config.crepa_use_tae,
                                        video=self.family.kind == "video")
                if config.crepa_drop_vae_encoder and vae is not None:
                    drop_vae_encoder(vae)
                teacher = PixelTeacher(frozen, decoder, config.crepa_encoder_image_size)
                width = frozen.hidden_size
                self.teacher_description = f"encoder {source if isinstance(source, str) else type(source).__name__}"
            projector = attach_projector(capture.models, capture.hidden_size, width, PROJECTOR_NAME).to(device)
        except BaseException:
            capture.detach()
            raise
        self._init_parts(capture, projector, schedule, teacher)

    # ------------------------------------------------------------------ forward

    def forward(self, latents: torch.Tensor | None = None, *, step: int, pixels: torch.Tensor | None = None,
                teacher_features: torch.Tensor | None = None,
                token_grid: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """latents: clean latents (B, C, F, H, W) / (B, C, H, W) in the trainer's normalised space; or
        pixels: clean frames in [0, 1] (B, F, 3, H, W) / (B, 3, H, W); or teacher_features: (B, T, N, D).
        Backbone mode takes none of these (latents, if given, only check the token grid).
        step: the optimizer step (Python int). token_grid: (T, H, W) of the student tokens when neither
        the model inputs nor the latents give it.

        Returns (λ-weighted loss, a float32 scalar with grad; logs of detached scalar tensors).
        """
        if self.backbone and (pixels is not None or teacher_features is not None):
            raise ValueError("backbone mode (crepa_use_backbone_features) takes its teacher from block "
                             f"{self.config.crepa_teacher_block_index}; do not pass pixels or teacher_features")
        weight, cutoff, skipped = self._begin_call(step, latents, pixels, teacher_features,
                                                   teacher_input_required=not self.backbone)
        if skipped is not None:
            return skipped

        captured = self._consume()
        grid = self._student_grid(captured, latents, pixels, token_grid)
        student = captured.student
        if student.shape[1] > grid.tokens and self.family.reference_tokens_after_image:
            student = student[:, :grid.tokens]   # the target's tokens come first
        z = self.live_projector(captured.model)(tokens_to_grid(student, grid, "captured hidden states"))
        y = self._teacher_tokens(captured, grid, latents, pixels, teacher_features)
        self._require_finite(step, **{"the captured hidden states": student, "the teacher tokens": y})
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"the teacher has batch size {y.shape[0]} but the captured hidden states have "
                             f"{z.shape[0]}: pass the latents / pixels of the same batch as the forward")
        if self.config.crepa_encoder_tokens == "cls" and not self.backbone:
            z, y = mean_pool(z), y.flatten(2, 3)
        elif not self.config.crepa_spatial_align:
            z, y = mean_pool(z), mean_pool(y)
        else:
            z, y = align_grids(z, y)
        result = crepa_loss_with_options(z, y.to(z.dtype), self.options, impl=self.impl)
        self.schedule.update(result.alignment_score)
        loss = result.loss.float() * weight
        device = self._device()
        logs = {
            "crepa_loss": loss.detach(),
            "crepa_alignment_score": result.alignment_score.float(),
            "crepa_similarity_self": result.similarity_self.float(),
            "crepa_similarity": result.alignment_score.float(),
            "crepa_weight": scalar(weight, device),
            "crepa_cutoff": scalar(cutoff, device),
        }
        return loss, self._with_ema(logs)

    def _student_grid(self, captured, latents, pixels, token_grid) -> TokenGrid:
        grid = captured.grid
        if latents is not None:
            from_latents = grid_from_latents(self.family, captured.model, latents)
            if grid is not None and grid != from_latents:
                raise ValueError(f"latents of shape {tuple(latents.shape)} give the token grid {tuple(from_latents)} "
                                 f"(frames, rows, columns) but the transformer's forward ran on {tuple(grid)}: pass "
                                 "the clean latents of the batch the transformer just saw")
            grid = from_latents
        if token_grid is not None:
            explicit = parse_token_grid(token_grid)
            if grid is not None and grid != explicit:
                raise ValueError(f"token_grid={tuple(explicit)} disagrees with the grid {tuple(grid)} of the forward")
            grid = explicit
        if grid is None and pixels is not None and self.family.kind == "image":
            frames = check_pixels(pixels)
            grid = image_grid_from_aspect(captured.student.shape[1], frames.shape[-2], frames.shape[-1],
                                          f"{self.family.name} hidden-state",
                                          "; pass latents= (their shape gives the grid) or token_grid=(1, rows, cols)")
        if grid is None:
            raise ValueError(f"cannot tell the token grid of the {self.family.name} hidden states: pass latents= "
                             "(their shape gives it) or token_grid=(frames, rows, columns)")
        return grid

    def _teacher_tokens(self, captured, grid: TokenGrid, latents, pixels, teacher_features) -> torch.Tensor:
        if self.backbone:
            return tokens_to_grid(captured.teacher[:, :grid.tokens], grid, "teacher block hidden states").float()
        cls_tokens = self.config.crepa_encoder_tokens == "cls"
        device = self._device()
        if teacher_features is not None:
            return teacher_from_features(teacher_features, grid, self.projector.out_features, cls_tokens).to(device)
        self._teacher.follow(device)
        if pixels is not None:
            return self._teacher.from_pixels(pixels, grid.frames)
        return self._teacher.from_latents(latents, grid.frames)

    def extra_repr(self) -> str:
        return (f"family={self.family.name}, block={self.config.crepa_block_index}, teacher="
                f"{self.teacher_description}, impl={self.impl!r}")
