"""What CrepaRegularizer and UrepaRegularizer share: config loading, building the capture, teacher and
projector, schedule state, hooks' lifetime, and the call itself, which reads top to bottom:

    inputs   = CallInputs.check(latents, pixels, teacher_features, token_grid)   # before any costly work
    plan     = schedule.at(step, trains)     # finished: nothing decoded, encoded or compared
    captured = capture.consume()
    grid     = family.token_grid(captured, inputs)
    z        = projector(family.image_tokens(captured.student, grid))
    y        = teacher.tokens(inputs, captured, grid, device)  # EncoderTeacher | FeatureTeacher | BackboneTeacher
    loss     = self._loss(z, y)                                 # CREPA or U-REPA: align, then the kernel

Under context parallelism (the captured block output is one rank's shard of the sequence) the z and y
lines become `self._context_student_teacher` (the rank's projected shard and its window of teacher
frames) and the loss line `self._context_loss` (the unsharded sequence's loss): context_parallel.py.
Each regularizer adds only its construction and `_loss`."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import backends
from ..checks import check_flag   # numpy bools accepted, as everywhere a bool is
from .cached_teacher import CachedTeacher
from .capture import CaptureError, HiddenStateCapture
from .disabled import DisabledRegularizer
from .inputs import CallInputs
from .grids import spatially_normalize
from .projector import build_projector, projector_entries
from .schedule import CoefficientSchedule
from .teacher import BackboneTeacher


def load_config(cfg, cls):
    """A config object from itself, a dict (whole trainer configs allowed) or a JSON file path."""
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, Mapping):
        return cls.from_dict(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        return cls.from_json(cfg)
    raise TypeError(f"cfg must be a {cls.__name__}, a dict or a path to a JSON file, got {type(cfg).__name__}")


def model_list(models, argument: str) -> list[nn.Module]:
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError(f"{argument} must be a diffusers model or a list of them (e.g. Wan 2.2's two experts)")
    return models


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# Frames may overshoot [0, 1] this much (a bicubic or Lanczos resize in the data pipeline) before a call
# refuses them; [-1, 1] and [0, 255] frames are far outside.
PIXEL_RANGE_SLACK = 0.05


def scalar(value: float, device: torch.device) -> torch.Tensor:
    """A detached float32 log value on `device` (a host-to-device copy, never a device read)."""
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class AlignmentRegularizerBase(nn.Module):
    """Holds the capture, the projector and the schedule.

    The projector is this module's only submodule: `parameters()` are what the optimizer must get besides
    the model's, `state_dict()` is the projector's weights (`projector.*`) plus the schedule state
    (`_extra_state`, a uint8 tensor of JSON so safetensors checkpoints hold it). The projector averages its
    own gradients across ranks, so wrapping this module is optional; it may be wrapped as a model is
    (`accelerator.prepare(reg)`, DDP, FSDP2's `fully_shard`), which averages equal values again. The
    model, the frozen encoder and the VAE are held by reference only: in no state_dict, no parameters(),
    no `.to()`."""

    projector_name = ""   # where this package (and SimpleTuner) used to put the projector on the model
    prefix = ""
    enabled = True    # False on the DisabledRegularizer a disabled config gives
    config_class: type = type(None)   # CrepaConfig / UrepaConfig

    @classmethod
    def from_config(cls, cfg, **arguments):
        """cfg: a config object, a dict (a whole trainer config is fine) or a JSON file path; the other
        keyword arguments are the constructor's. A config with `{prefix}_enabled` false gives a
        `DisabledRegularizer` (disabled.py: loss 0, no logs, no hooks, no parameters); the keyword
        names are still checked against the constructor's."""
        config = load_config(cfg, cls.config_class)
        if not getattr(config, f"{config.PREFIX}_enabled"):
            try:
                inspect.signature(cls.__init__).bind(None, config, **arguments)
            except TypeError as error:
                raise TypeError(f"{cls.__name__}.from_config: {error}") from None
            return DisabledRegularizer(config, cls.__name__)
        return cls(config, **arguments)

    def _init_settings(self, config, impl: str, check_finite: bool) -> None:
        """Validate and keep the settings both regularizers share."""
        config_class = self.config_class
        name, prefix = type(self).__name__, config_class.PREFIX
        if not isinstance(config, config_class):
            raise TypeError(f"config must be a {config_class.__name__} (use {name}.from_config for dicts and JSON "
                            f"files), got {type(config).__name__}")
        if not getattr(config, f"{prefix}_enabled"):
            raise ValueError(f"{prefix}_enabled is false: {name}.from_config(...) gives a no-op regularizer for a "
                             f"disabled config; the constructor builds only an enabled one")
        self.config = config
        self.impl = backends.check_impl(impl)   # at build time, not after a full forward
        self.check_finite = check_flag("check_finite", check_finite)

    def _set_plain(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)   # not a submodule: kept out of state_dict and parameters()

    def _attach(self, models: list[nn.Module], make_teacher, schedule: CoefficientSchedule, *,
                feature_cache: str | os.PathLike | None = None, feature_cache_dtype: str = "bfloat16",
                **capture_arguments) -> None:
        """Hooks on `models`, the teacher from `make_teacher(capture, device)` (behind a feature cache when
        `feature_cache` names a folder) and the projector from the block width to the teacher's; a
        failure leaves no hook behind."""
        capture = HiddenStateCapture(models, owner=f"a {type(self).__name__} (block {capture_arguments['block_index']})",
                                     **capture_arguments)
        try:
            device = model_device(capture.models[0])
            teacher = make_teacher(capture, device)
            if feature_cache is not None:
                if isinstance(teacher, BackboneTeacher):
                    raise ValueError("backbone mode (crepa_use_backbone_features) has no encoder to cache: its "
                                     "teacher is a block of the same forward; drop feature_cache=")
                teacher = CachedTeacher(teacher, feature_cache, storage_dtype=feature_cache_dtype)
        except BaseException:
            capture.detach()
            raise
        self.family = capture.family
        self.teacher_description = teacher.description
        self._set_plain("_capture", capture)
        self._set_plain("_teacher", teacher)
        # iREPA (irepa_enabled): a convolution over the token grid, and the teacher spatially normalised
        irepa = self.config.irepa_enabled
        self.projector = build_projector(capture.hidden_size, teacher.width,
                                         self.config.irepa_projector_kernel_size if irepa else None).to(device)
        self.teacher_spatial_norm_alpha = self.config.irepa_spatial_norm_alpha if irepa else None
        self.schedule = schedule
        self._warned_frozen = False
        self._set_plain("_context", None)   # a ContextShard under context parallelism (set_context_parallel)
        self._set_plain("_explicit_context", False)   # set by set_context_parallel, else detected per call
        # A state dict that keeps the projector under its old name on the model (`crepa_projector.*`,
        # this package's earlier checkpoints and SimpleTuner's) loads through load_state_dict too.
        self._register_load_state_dict_pre_hook(self._rename_legacy_projector_keys)

    @property
    def capture(self) -> HiddenStateCapture:
        return self._capture

    @property
    def teacher(self):
        """Where the teacher tokens come from (teacher.py): an EncoderTeacher or a BackboneTeacher."""
        return self._teacher

    @property
    def encoder(self):
        """The frozen encoder (None in backbone mode)."""
        return self._teacher.encoder

    @property
    def frames_encoded(self) -> int:
        """Frames the encoder has processed so far (one per student frame per sample and call)."""
        return self._teacher.frames_encoded

    @property
    def frames_decoded(self) -> int:
        return self._teacher.frames_decoded

    # ------------------------------------------------------------------ the decoder, settable later

    def set_vae(self, vae, *, denormalize=None) -> None:
        """Give (or replace) the VAE that decodes `latents=` calls, for trainers that load it after building
        the regularizer; as the constructor's `vae=` / `denormalize=` (a class of no known normalisation
        needs `denormalize=`, or use `set_decoder`)."""
        teacher = self._decoding_teacher("set_vae")
        teacher.set_decoder(teacher.decoder.with_vae(vae, denormalize))

    def set_decoder(self, decode) -> None:
        """Decode `latents=` calls with `decode`, a callable for any VAE class (vae.DECODE_CONTRACT):
        latents as the regularizer is given them -> frames in [0, 1], (B, F, 3, H, W) for video or
        (B, 3, H, W) for images. Replaces a VAE given before."""
        teacher = self._decoding_teacher("set_decoder")
        teacher.set_decoder(teacher.decoder.with_decode(decode))

    def _decoding_teacher(self, method: str):
        if isinstance(self._teacher, BackboneTeacher):
            raise ValueError(f"{method}: backbone mode (crepa_use_backbone_features) takes its teacher from block "
                             f"{self._teacher.block_index} and decodes nothing")
        return self._teacher

    def detach(self) -> None:
        """Remove the hooks (the model runs exactly as before) and drop any captured tensors. The projector
        and the schedule stay with this module (save them with `state_dict()`)."""
        self._capture.detach()

    def set_max_train_steps(self, max_train_steps: int | None) -> None:
        """Set the run's total optimizer steps after construction (trainers that count steps from epochs
        know it only after `accelerator.prepare(dataloader)`). A decaying schedule with `*_decay_steps` 0
        needs it from the first call after the warmup, and raises there, not at construction, while it
        is unset (docs/contract.md §4)."""
        self.schedule.set_max_train_steps(max_train_steps)

    def end_step(self) -> None:
        """End the current optimizer step: the mean of its training calls' scores updates the similarity
        EMA now. Optional: the first training call with a new `step` does the same. A trainer that calls it
        does so once per optimizer step, after the last micro-batch (under accelerate, when
        `accelerator.sync_gradients`); a later training call at the same `step` is then an error."""
        self.schedule.end_step()

    def set_context_parallel(self, group, *, shard) -> None:
        """Context (sequence) parallelism, stated by the trainer: the captured block output on this rank is
        tokens [start, stop) of the full frame-major, row-major sequence of T*H*W video tokens, sharded over
        the process group `group` (the context group; contiguous shards in group-rank order from token 0,
        any boundaries). Every rank of `group` must call this together (the layout is checked with one
        all_gather). Every rank of the group holds the same batch and passes the same teacher input
        (latents=, pixels= or teacher_features=; none in backbone mode); each call returns the loss, logs
        and gradients of the unsharded sequence (context_parallel.py). `group=None` with
        `shard=None` turns it off."""
        raise ValueError(f"{type(self).__name__} does not support context parallelism (only CrepaRegularizer's "
                         "patch-wise CREPA / REPA does)")

    def _detect_context(self, model: nn.Module, grid) -> None:
        """Follow a context parallelism diffusers set on `model` (only CrepaRegularizer does)."""
        raise ValueError(f"{type(model).__name__} runs under diffusers context parallelism (enable_parallelism), "
                         f"which {type(self).__name__} does not support")

    def _context_student_teacher(self, inputs: CallInputs, captured, grid, device: torch.device):
        """(this rank's projected shard (B, stop - start, D), the teacher tokens of its window of frames,
        the window's first frame); called only once a context layout is set, which only a regularizer that
        overrides set_context_parallel sets."""
        raise NotImplementedError

    def _context_loss(self, z: torch.Tensor, y: torch.Tensor, low: int, grid):
        """Like `_loss`, on this rank's projected shard z (B, L, D) against the teacher tokens of its window
        of frames y (B, t, h, w, D) starting at frame `low`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ saving and loading

    def load_projector_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load only the projector's weights, from any of the layouts it has been saved in: this module's
        `state_dict()` (`projector.*`), a model state dict of this package's earlier versions or of
        SimpleTuner (`crepa_projector.norm.*` / `crepa_projector.0.*` among the model's keys), or the
        projector's own state dict. Strict: every projector tensor must be there with its shape."""
        entries = projector_entries(state_dict, self.projector_name)
        if not entries:
            raise KeyError(f"no projector weights in the given state dict: expected keys under "
                           f"'{self.projector_name}.' or 'projector.' (e.g. {self.projector_name}.norm.weight or "
                           f"SimpleTuner's {self.projector_name}.0.weight); got {len(state_dict)} keys such as "
                           f"{sorted(state_dict)[:4]}")
        self.projector.load_state_dict(entries)

    def _rename_legacy_projector_keys(self, state_dict, prefix, *args) -> None:
        old = f"{prefix}{self.projector_name}."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{prefix}projector.{key[len(old):]}"] = state_dict.pop(key)

    def get_extra_state(self) -> torch.Tensor:
        """The schedule state and what it belongs to, as JSON in a uint8 tensor: a plain tensor, so the
        state dict saves with safetensors (accelerate's default) as well as with torch.save."""
        state = {"regularizer": self.prefix, "schedule": self.schedule.state_dict()}
        return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
            try:
                state = json.loads(bytes(state.tolist()).decode())
            except ValueError as exc:
                raise ValueError(f"regularizer extra state is not the JSON this package writes: {exc}") from None
        if not isinstance(state, dict) or "schedule" not in state:
            raise ValueError(f"regularizer extra state must hold a 'schedule' entry (from a regularizer's "
                             f"state_dict()), got {state!r}")
        owner = state.get("regularizer")
        if owner is None:
            warnings.warn(f"{type(self).__name__}: the schedule state names no regularizer (saved by an earlier "
                          f"repa_kernels or by another trainer); loading it as {self.prefix} state",
                          UserWarning, stacklevel=3)
        elif owner != self.prefix:
            raise ValueError(f"this schedule state belongs to a {owner} regularizer; {type(self).__name__} keeps "
                             f"{self.prefix} state (load each regularizer's state_dict into its own kind)")
        self.schedule.load_state_dict(state["schedule"])

    def __getstate__(self):
        raise TypeError(f"a {type(self).__name__} cannot be pickled (it holds hooks on the model and references to "
                        "the encoder and VAE): checkpoint reg.state_dict() (or "
                        "accelerator.register_for_checkpointing(reg) / accelerator.prepare(reg)), never the object")

    # ------------------------------------------------------------------ the call

    student_description = "captured hidden states"

    def forward(self, latents: torch.Tensor | None = None, *, step: int, pixels: torch.Tensor | None = None,
                teacher_features: torch.Tensor | None = None, token_grid: Sequence[int] | None = None,
                cache_keys: Sequence | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One call after the model's forward; see the regularizer's own docstring for the arguments.

        Returns (λ-weighted loss, a float32 scalar with grad; logs of detached scalar tensors)."""
        backbone_block = self._teacher.block_index if isinstance(self._teacher, BackboneTeacher) else None
        # Only training calls feed the similarity EMA (one update per optimizer step, schedule.py); a
        # validation or logging call (eval mode or no grad) neither records a score nor ends a step.
        trains = self.training and torch.is_grad_enabled() and any(m.training for m in self._capture.models)
        try:
            inputs = CallInputs.check(latents, pixels, teacher_features, token_grid, backbone_block=backbone_block,
                                      cache_keys=cache_keys)
            if inputs.cache_keys is not None and not isinstance(self._teacher, CachedTeacher):
                raise ValueError("cache_keys= needs a feature cache: build the regularizer with feature_cache=<folder> "
                                 "(and feature_cache_dtype=), or drop cache_keys")
            # A training call at a new step ends the previous one first, so this weight sees its EMA update;
            # raises when the weight needs a max_train_steps not set yet.
            plan = self.schedule.at(step, trains)
        except BaseException:
            self._capture.clear()    # a call that raises leaves nothing captured
            raise
        if plan.finished:
            return self._skipped(plan.cutoff)   # inputs unused: no finite check (no host sync)
        if self.check_finite:
            self._require_finite(step, latents=inputs.latents, pixels=inputs.pixels,
                                 teacher_features=inputs.teacher_features)

        captured = self._capture.consume()
        if captured.captured_without_grad_mode and torch.is_grad_enabled() and captured.model.training:
            raise CaptureError(
                f"the hidden states of {type(captured.model).__name__} were captured without gradient while the "
                "model is training: its forward ran under torch.no_grad(), or reentrant gradient checkpointing "
                "(use_reentrant=True) hid the gradient. Use non-reentrant checkpointing (diffusers' default) and "
                "run the training forward with gradients enabled")
        grid = self.family.token_grid(captured, inputs)
        if self._context is not None or getattr(captured.model, "_parallel_config", None) is not None:
            self._detect_context(captured.model, grid)   # diffusers' enable_parallelism shards the sequence
        if inputs.teacher_batch is not None and inputs.teacher_batch != captured.student.shape[0]:
            raise ValueError(f"the teacher has batch size {inputs.teacher_batch} but the captured hidden states have "
                             f"{captured.student.shape[0]}: pass the latents / pixels of the same batch as the "
                             "forward")   # checked before the teacher decodes or encodes anything
        device = self._device()
        if captured.student.device != device:
            raise ValueError(f"the captured hidden states are on {captured.student.device} but the projector is on "
                             f"{device}: move the regularizer where the model runs (reg.to(device)), before the "
                             "optimizer is built")
        if torch.is_grad_enabled() and captured.model.training:
            self._warn_if_frozen()
        if self._context is None:
            z = self.projector(
                self.family.image_tokens(captured.student, grid, self.student_description, captured.model))
            y = self._teacher.tokens(inputs, captured, grid, device)
        else:   # the captured tokens are this rank's shard of the sequence; y: its window of frames
            z, y, low = self._context_student_teacher(inputs, captured, grid, device)
        if self.teacher_spatial_norm_alpha is not None:
            y = spatially_normalize(y, self.teacher_spatial_norm_alpha)
        self._require_finite(step, **{"the captured hidden states": captured.student, "the teacher tokens": y})

        loss, score, logs = self._loss(z, y) if self._context is None else self._context_loss(z, y, low, grid)
        if trains:   # the call's one host read, which also brings the frame ranges to check
            self._check_input_ranges(step, self.schedule.record(score, step, also_read=self._input_ranges()))
        else:
            self._input_ranges()   # a call that does not train reads nothing: its frames go unchecked
        loss = loss.float() * plan.weight
        logs = {f"{self.prefix}_loss": loss.detach(), **logs,
                f"{self.prefix}_weight": scalar(plan.weight, device),
                f"{self.prefix}_cutoff": scalar(plan.cutoff, device)}
        return loss, self._with_ema(logs)

    # ------------------------------------------------------------------ feature cache

    def _cached_teacher(self, what: str) -> CachedTeacher:
        if not isinstance(self._teacher, CachedTeacher):
            raise ValueError(f"{what} needs a feature cache: build the regularizer with feature_cache=<folder>")
        return self._teacher

    def feature_cache(self, source: str = "latents"):
        """The FeatureCache of `latents=` or `pixels=` calls (two identities: what makes the pixels differs)."""
        if source not in ("latents", "pixels"):
            raise ValueError(f"source must be 'latents' or 'pixels', got {source!r}")
        return self._cached_teacher("feature_cache()").cache(source)

    def flush_feature_cache(self) -> None:
        """Write the buffered entries now (e.g. at the end of an epoch, so that other ranks see them); a
        no-op without a cache."""
        if isinstance(self._teacher, CachedTeacher):
            self._teacher.flush()

    def close_feature_cache(self) -> None:
        """Flush and stop writing; later calls compute without storing (a no-op without a cache)."""
        if isinstance(self._teacher, CachedTeacher):
            self._teacher.close()

    def precompute_teacher_features(self, samples: Iterable, *, source: str = "latents", progress: bool = True):
        """Fill the feature cache before training from (key, tensor) or (key, tensor, token_grid) items of
        one sample each, without a batch dimension: latents (C, F, H, W) / (C, H, W), or pixels in [0, 1]
        (F, 3, H, W) / (3, H, W); the tensor may be a zero-argument callable returning it. Keys already
        cached are skipped, so a stopped run resumes. Returns a PrecomputeReport (computed, skipped)."""
        teacher = self._cached_teacher("precompute_teacher_features")
        model = self._capture.models[0]
        teacher.follow(self._device())
        # a UNet's student grid is its mid-block's, which only the forward gives: stored without a grid
        grid_of_latents = (lambda latents: None) if self.family.kind == "unet" else \
            (lambda latents: self.family.latent_grid(model, latents))
        return teacher.precompute(samples, source=source, grid_of_latents=grid_of_latents,
                                  image_model=self.family.kind != "video", progress=progress)

    def _loss(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z: projected student tokens (B, T, H, W, D); y: teacher tokens (B, T, h, w, D) float32.
        Returns (unweighted loss, the score the schedule's EMA follows, this loss's own logs)."""
        raise NotImplementedError

    def _input_ranges(self) -> torch.Tensor | None:
        """The (min, max) of this call's frames whose range nothing guarantees (pixels=, a decode=
        callable's frames), on the device, for the schedule's one host read; None when there are none.
        Their names wait in `_range_sources` for `_check_input_ranges`."""
        pending = getattr(self._teacher, "input_ranges", None)   # an attribute: read without a call
        ranges = list(pending or ())
        if pending:
            pending.clear()
        self._set_plain("_range_sources", [source for source, _ in ranges])
        if not ranges:
            return None
        device = ranges[0][1].device
        return torch.cat([values.to(device, torch.float64) for _, values in ranges])

    def _check_input_ranges(self, step: int, values: list[float]) -> None:
        """Refuse frames outside [0, 1] (up to PIXEL_RANGE_SLACK, the overshoot of resampling filters):
        pixels in [-1, 1] or [0, 255] would be clamped by the resize or go through the encoder's ImageNet
        normalisation as they are, a silent wrong teacher. Read with the score, so this call's encode ran."""
        for index, source in enumerate(self._range_sources):
            low, high = values[2 * index], values[2 * index + 1]
            if low < -PIXEL_RANGE_SLACK or high > 1.0 + PIXEL_RANGE_SLACK:
                hint = (" (they look like [-1, 1] frames: pass (pixels + 1) / 2)" if low < -PIXEL_RANGE_SLACK
                        and high <= 1.0 + PIXEL_RANGE_SLACK else " (they look like [0, 255] frames: pass pixels / 255)"
                        if high > 2.0 else "")
                raise ValueError(f"{source} must lie in [0, 1] (float frames, 0 black, 1 white), got values in "
                                 f"[{low:.4g}, {high:.4g}] at step {step}{hint}")

    def _require_finite(self, step: int, **tensors: torch.Tensor | None) -> None:
        """With check_finite=True, raise on NaN/Inf in any given tensor (one host sync per tensor);
        otherwise non-finite values propagate to the loss and stay out of the similarity EMA."""
        if not self.check_finite:
            return
        for name, tensor in tensors.items():
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise FloatingPointError(f"{name} contains NaN or Inf at step {step} (check_finite=True)")

    def _warn_if_frozen(self) -> None:
        if self._warned_frozen or any(p.requires_grad for p in self.projector.parameters()):
            return
        self._warned_frozen = True
        warnings.warn(f"{type(self).__name__}: the projector is frozen (requires_grad=False) in a training call, so "
                      f"it stays at its initial weights. Call reg.requires_grad_(True) after freezing, and give "
                      f"reg.parameters() to the optimizer", UserWarning, stacklevel=3)

    def _device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def _skipped(self, cutoff: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """No later call can weigh more than 0: nothing is decoded, encoded or compared. The projector's
        parameters still get a zero gradient, so DDP sees them used."""
        self._capture.clear()
        loss = sum(p.float().sum() for p in self.projector.parameters() if p.requires_grad) * 0.0
        if not isinstance(loss, torch.Tensor):   # nothing trainable (e.g. frozen for evaluation)
            loss = scalar(0.0, self._device())
        device = self._device()
        logs = {f"{self.prefix}_loss": loss.detach(), f"{self.prefix}_weight": scalar(0.0, device),
                f"{self.prefix}_cutoff": scalar(cutoff, device)}
        return loss, self._with_ema(logs)

    def _with_ema(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ema = self.schedule.ema_so_far          # with this step's scores so far: one micro-batch, today's EMA
        if ema is not None:
            key = "crepa_alignment_score_ema" if self.prefix == "crepa" else "urepa_similarity_ema"
            logs[key] = scalar(ema, self._device())
        return logs
