"""`CrepaRegularizer`: REPA for image DiTs and CREPA for video DiTs, built from the crepa_* keys
(docs/contract.md §3-§7).

    reg = CrepaRegularizer.from_config(cfg, transformer=transformer, vae=vae, max_train_steps=10_000)
    pred = transformer(...)                      # the hook captures block crepa_block_index
    reg_loss, logs = reg(latents=clean_latents, step=global_step)
    (diffusion_loss + reg_loss).backward()

The projector is the regularizer's own (projector.py): give `reg.parameters()` to the optimizer and save
`reg.state_dict()`; it averages its own gradients across ranks, and wrapping `reg` as the model is
wrapped (`accelerator.prepare(reg)`, DDP, `fully_shard`) is optional. Under context parallelism (diffusers'
`enable_parallelism`, or `set_context_parallel`) the call is the same: context_parallel.py.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..functional import crepa_loss_with_options
from .base import AlignmentRegularizerBase, model_list
from .context_parallel import check_family, diffusers_context, equal_chunks, loss_frames, make_shard, teacher_window
from .config import CrepaConfig
from .families import detect_family, unwrap_model
from .grids import align_tokens
from .schedule import CoefficientSchedule
from .sharded_loss import frame_sums, pooled_student, share_frames, sharded_crepa_loss
from .teacher import BackboneTeacher, EncoderTeacher
from .token_exchange import all_reduce_sum, exchange_tokens
from .vae import Denormalize

PROJECTOR_NAME = "crepa_projector"   # its key prefix in older checkpoints (on the model), ours and SimpleTuner's


class CrepaRegularizer(AlignmentRegularizerBase):
    """REPA / CREPA regularizer on a diffusers transformer.

    Call after the transformer's forward: `reg(latents=..., step=...)` (or `pixels=` / `teacher_features=`)
    returns `(weighted_loss, logs)`; logs are detached scalar tensors (docs/contract.md §6). The module's state_dict
    holds the projector's weights and the schedule state (EMA, cutoff), so a resumed run continues
    exactly; its parameters() are the projector's. The frozen encoder and the VAE are in no state_dict.
    The encoder follows the projector's device at each call (`reg.to(device)` or accelerator.prepare(reg)
    moves it); the VAE decodes on its own device.

    The call, `reg(latents=None, *, step, pixels=None, teacher_features=None, token_grid=None,
    cache_keys=None)`:
    latents: clean latents (B, C, F, H, W) / (B, C, H, W) in the trainer's normalised space; or pixels:
    clean frames in [0, 1] (B, F, 3, H, W) / (B, 3, H, W); or teacher_features: (B, T, N, D). Backbone
    mode takes none of these (latents, if given, only check the token grid). step: the optimizer step
    (Python int). token_grid: (T, H, W) of the student tokens when neither the model inputs nor the
    latents give it. cache_keys: one key per sample (the sample id plus its crop, flip, bucket, frames)
    when built with feature_cache= (cached_teacher.py): a hit decodes and encodes nothing. Returns
    (λ-weighted loss, a float32 scalar with grad; logs of detached scalar tensors).
    """

    projector_name = PROJECTOR_NAME
    prefix = "crepa"
    config_class = CrepaConfig

    def __init__(self, config: CrepaConfig, *, transformer, vae=None, encoder: str | nn.Module | None = None,
                 tae=None, denormalize: Denormalize | None = None, max_train_steps: int | None = None,
                 hidden_size: int | None = None, impl: str = "auto", check_finite: bool = False,
                 feature_cache: str | os.PathLike | None = None, feature_cache_dtype: str = "bfloat16",
                 decode=None) -> None:
        """config: a CrepaConfig (`from_config` also takes a dict or a JSON path).

        transformer: the diffusers transformer, or a list of transformers sharing one projector (Wan 2.2's experts).
        vae: the trainer's VAE, needed for `latents=` calls; encoder: overrides `crepa_encoder` (a name,
        hub id, local path or a teacher's module); tae: tiny decoder for `crepa_use_tae`; denormalize: latent
        denormalisation for VAE classes without a known rule; max_train_steps: total steps (wins over the
        config's); hidden_size: width of the block outputs when the model config does not give it;
        impl: kernel backend ("auto", "triton", "cpp", "reference"); check_finite: raise FloatingPointError
        on NaN/Inf in the inputs, the captured hidden states or the teacher tokens (one host sync each;
        off by default, when non-finite values propagate to the loss and stay out of the EMA);
        feature_cache: a folder for the teacher-feature cache (None: no cache); feature_cache_dtype: its
        storage dtype, "bfloat16", "float16" or "float32"; decode: instead of vae=, a callable for a VAE of
        any class, latents -> frames in [0, 1] (vae.DECODE_CONTRACT). The VAE or decode callable can also
        be given after construction: `set_vae(vae)` / `set_decoder(decode)`.
        """
        super().__init__()
        self._init_settings(config, impl, check_finite)
        models = model_list(transformer, "transformer")
        backbone = bool(config.crepa_use_backbone_features)
        self.options = config.crepa_options()
        if config.crepa_encoder_tokens == "cls" and not backbone:
            self.alignment = "cls"
        else:
            self.alignment = "spatial" if config.crepa_spatial_align else "pooled"
        schedule = CoefficientSchedule.from_config(config, max_train_steps=max_train_steps)
        teacher_index = config.crepa_teacher_block_index if backbone else None
        if backbone and teacher_index == config.crepa_block_index:
            raise ValueError(f"crepa_teacher_block_index={teacher_index} equals crepa_block_index: backbone mode "
                             "needs a different block as the teacher")
        if detect_family(unwrap_model(models[0])).kind == "unet":
            raise ValueError(f"{type(unwrap_model(models[0])).__name__} is a UNet: use UrepaRegularizer (U-REPA aligns "
                             "the UNet mid-block); CrepaRegularizer serves transformer (DiT) models")

        def make_teacher(capture, device):
            if backbone:
                return BackboneTeacher(capture.family, teacher_index, capture.hidden_size)
            return EncoderTeacher.build(
                config.crepa_encoder if encoder is None else encoder, device=device, dtype=config.crepa_encoder_dtype,
                tokens=config.crepa_encoder_tokens, image_size=config.crepa_encoder_image_size,
                frames_batch_size=config.crepa_encoder_frames_batch_size, vae=vae, tae=tae, denormalize=denormalize,
                use_tae=config.crepa_use_tae, video=capture.family.kind == "video",
                drop_encoder_of_vae=config.crepa_drop_vae_encoder, decode=decode)

        self._attach(models, make_teacher, schedule, block_index=config.crepa_block_index,
                     teacher_block_index=teacher_index, hidden_size=hidden_size, feature_cache=feature_cache,
                     feature_cache_dtype=feature_cache_dtype)

    def set_context_parallel(self, group, *, shard) -> None:
        if group is None and shard is None:
            self._set_plain("_context", None)
            self._set_plain("_explicit_context", False)
            self.projector.set_context_ranks(1)
            return
        self._check_context_supported()
        context = make_shard(group, shard)
        self._set_plain("_context", context)
        self._set_plain("_explicit_context", True)
        self.projector.set_context_ranks(context.ranks)

    def _detect_context(self, model, grid) -> None:
        """Under diffusers' `enable_parallelism` (context parallelism on `model`), take its layout: equal
        chunks of the sequence over its context mesh. A layout set by set_context_parallel wins."""
        if self._explicit_context:
            return
        found = diffusers_context(model)
        if found is None:
            if self._context is not None:
                self._set_plain("_context", None)
                self.projector.set_context_ranks(1)
            return
        group, rank, ranks = found
        self._check_context_supported()
        self._set_plain("_context", equal_chunks(group, rank, ranks, grid.tokens))
        self.projector.set_context_ranks(ranks)

    def _check_context_supported(self) -> None:
        if self.config.irepa_enabled:
            raise ValueError("irepa_enabled (iREPA's convolutional projector) is not supported under context "
                             "parallelism: its k x k convolution mixes neighbouring student rows across shard "
                             "boundaries; turn irepa_enabled off or run without context parallelism")
        check_family(self.family)

    def _context_tokens(self, tokens: torch.Tensor, grid, what: str = "captured hidden states") -> torch.Tensor:
        context = self._context
        if context.total != grid.tokens:
            raise ValueError(f"the context group's shards cover {context.total} tokens but the token grid "
                             f"{tuple(grid)} (frames, rows, columns) holds {grid.tokens}: set_context_parallel "
                             "must describe the sequence of this forward")
        if tokens.dim() != 3 or tokens.shape[1] != context.stop - context.start:
            raise ValueError(f"the {what} have shape {tuple(tokens.shape)} but this rank's shard is tokens "
                             f"[{context.start}, {context.stop}) ({context.stop - context.start} tokens)")
        return tokens

    def _context_student_teacher(self, inputs, captured, grid, device):
        """Under context parallelism: this rank's projected shard (B, stop - start, D), the teacher tokens of
        its window of student frames [low, high) (B, high - low, h, w, D) and low (context_parallel.py); in
        the pooled and CLS modes the whole sequence's student and teacher frame vectors (B, T, 1, 1, D),
        the same on every rank, and None."""
        context = self._context
        z = self.projector(self._context_tokens(captured.student, grid))
        if self.alignment != "spatial":   # pooled / CLS: one vector per frame, the whole (B, T) on every rank
            return pooled_student(z, grid, context), self._context_frame_vectors(inputs, captured, grid, device), None
        low, high = teacher_window((context.start, context.stop), grid, self.options)
        if isinstance(self._teacher, BackboneTeacher):   # the teacher block is sharded as the student's
            per_frame = grid.height * grid.width
            wants = [tuple(f * per_frame for f in teacher_window(span, grid, self.options)) for span in context.shards]
            local = self._context_tokens(captured.teacher, grid, "teacher block hidden states")
            y = exchange_tokens(local.detach(), context, wants, differentiable=False)
            y = y.reshape(y.shape[0], high - low, grid.height, grid.width, y.shape[2]).float()
        else:
            y = self._teacher.tokens(inputs, captured, grid, device, frames=(low, high))
        return z, y, low

    def _context_frame_vectors(self, inputs, captured, grid, device) -> torch.Tensor:
        """Pooled / CLS modes: every frame's teacher vector (B, T, 1, 1, D) on every rank. A backbone block's
        frame means come from each rank's sums; an encoder's frames are each computed whole by the rank
        holding the frame's first token (sharded_loss.share_frames)."""
        context = self._context
        per_frame = grid.height * grid.width
        if isinstance(self._teacher, BackboneTeacher):
            local = self._context_tokens(captured.teacher, grid, "teacher block hidden states").detach().float()
            return (all_reduce_sum(frame_sums(local, grid, context), context.group) / per_frame)[:, :, None, None, :]
        first, last = loss_frames((context.start, context.stop), per_frame, student_resampled=True)
        if first < last:
            vectors = self._teacher.tokens(inputs, captured, grid, device, frames=(first, last)).flatten(2, 3).mean(2)
        else:   # a shard inside one frame: the frame is another rank's
            vectors = torch.zeros(captured.student.shape[0], 0, self._teacher.width, device=device)
        return share_frames(vectors, first, grid.frames, context.group)

    def _context_loss(self, z: torch.Tensor, y: torch.Tensor, low: int | None, grid):
        if low is None:   # pooled / CLS: the whole sequence's frame vectors, on every rank
            return self._loss(z, y)
        loss, score, similarity_self = sharded_crepa_loss(z, y.to(z.dtype), low, grid, self._context, self.options)
        logs = {"crepa_alignment_score": score.float(), "crepa_similarity_self": similarity_self.float(),
                "crepa_similarity": score.float()}
        return loss, score, logs

    def _loss(self, z: torch.Tensor, y: torch.Tensor):
        z, y = align_tokens(z, y, self.alignment)
        result = crepa_loss_with_options(z, y.to(z.dtype), self.options, impl=self.impl)
        logs = {
            "crepa_alignment_score": result.alignment_score.float(),
            "crepa_similarity_self": result.similarity_self.float(),
            "crepa_similarity": result.alignment_score.float(),
        }
        return result.loss, result.alignment_score, logs

    def extra_repr(self) -> str:
        return (f"family={self.family.name}, block={self.config.crepa_block_index}, teacher="
                f"{self.teacher_description}, impl={self.impl!r}")
