"""Capture a block's hidden states from a diffusers denoiser by forward hooks (SPEC §7).

Families (matched by class name anywhere in the model's class hierarchy), as
family: classes; blocks in index order; block output; where the token grid (T, H, W) comes from:

- wan: WanTransformer3DModel; `blocks`; (B, S, C); input (B, C, F, H, W) / config.patch_size.
- ltx_video: LTXVideoTransformer3DModel; `transformer_blocks`; (B, S, C) packed tokens; the forward's
  num_frames, height, width arguments (LTX's rotary embedding lays tokens on exactly that grid).
- sana_video: SanaVideoTransformer3DModel; `transformer_blocks`; (B, S, C); input (B, C, F, H, W) / patch.
- kandinsky5: Kandinsky5Transformer3DModel; `visual_transformer_blocks`; (B, S, C) (*); channels-last
  input (B, F, H, W, C) / config.patch_size.
- flux: FluxTransformer2DModel; `transformer_blocks` then `single_transformer_blocks` as one index
  sequence; (text, image) tuples, image taken; unpacked latents (H/2, W/2) (2x2 packing), or the packed
  token count laid on the frames' aspect ratio.
- sd3: SD3Transformer2DModel; `transformer_blocks`; (text, image), the last block (None, image);
  input (B, C, H, W) / config.patch_size.
- pixart: PixArtTransformer2DModel; `transformer_blocks`; (B, S, C); input (B, C, H, W) / patch.
- sana: SanaTransformer2DModel; `transformer_blocks`; (B, S, C); input (B, C, H, W) / patch.
- unet: UNet2DConditionModel, UNet2DModel; `mid_block`; (B, C, h, w) -> (B, h*w, C); (1, h, w).
- dit (any other image DiT, SPEC §7): a model of no family above whose blocks sit in an nn.ModuleList
  named `transformer_blocks`, `blocks` or `layers` (the first found), e.g. diffusers' DiTTransformer2DModel
  or HunyuanDiT2DModel, or a plain SiT-style module; blocks must return the image tokens as one
  (B, S, C) tensor in row-major patch order; hidden size from config.num_attention_heads*
  attention_head_dim, hidden_size, inner_dim, model_dim or dim (else `hidden_size=`); patch size from
  config.patch_size or the model's `patch_size` attribute; input (B, C, H, W) / patch. Sequences with
  other tokens (class, register or text tokens) do not match the grid and are refused, never guessed.

(*) With sparse attention (`sparse_params["to_fractal"]`) Kandinsky5 orders tokens in 8x8 local windows;
the capture un-permutes them to frame-major, row-major order.

Rules: the hook keeps the first capture of a forward; calls made while autograd runs a backward pass
(non-reentrant gradient checkpointing recomputes blocks there) are ignored. A block output without
grad seen while the model's forward ran with grad enabled means reentrant checkpointing, which is an
error. `HiddenStateCapture.consume()` hands the captured tensors over and drops every reference.
Hooks sit on the underlying module, so a `torch.compile`d model (whole-model or per-block) captures the
same tensors (tested with the aot_eager backend). A wrapper that calls `model.forward(...)` directly
(PEFT's tuner wrappers) bypasses the model-level hook: the blocks still capture (the latest call wins)
and the token grid then comes from the latents passed to the regularizer. Flux Kontext appends the
reference image's tokens after the target's; the regularizer keeps the first H'*W' (the target).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .grids import TokenGrid, unpermute_local_blocks

KANDINSKY5_LOCAL_BLOCK = 8


class CaptureError(RuntimeError):
    """Hidden states cannot be captured as configured (bad index, reentrant checkpointing, ...)."""


def _patch3(patch) -> tuple[int, int, int]:
    if isinstance(patch, int):
        return 1, patch, patch
    patch = tuple(int(p) for p in patch)
    return patch if len(patch) == 3 else (1,) + patch[-2:]


def _grid_5d_channels_first(model, bound: dict[str, Any]) -> TokenGrid | None:
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    pt, ph, pw = _patch3(model.config.patch_size)
    return TokenGrid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)


def _grid_5d_channels_last(model, bound: dict[str, Any]) -> TokenGrid | None:
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    pt, ph, pw = _patch3(model.config.patch_size)
    return TokenGrid(x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw)


def _grid_ltx(model, bound: dict[str, Any]) -> TokenGrid | None:
    # LTX's rotary embedding lays its tokens on arange(num_frames) x arange(height) x arange(width),
    # so these forward arguments are the token grid itself.
    dims = [bound.get(k) for k in ("num_frames", "height", "width")]
    if not all(isinstance(d, int) for d in dims):
        return None
    return TokenGrid(*dims)


def _grid_4d(model, bound: dict[str, Any]) -> TokenGrid | None:
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    _, ph, pw = _patch3(model.config.patch_size)
    return TokenGrid(1, x.shape[2] // ph, x.shape[3] // pw)


def _no_grid(model, bound: dict[str, Any]) -> TokenGrid | None:
    return None


def _config_patch(model) -> tuple[int, int, int]:
    return _patch3(model.config.patch_size)


def _patch_of(model) -> tuple[int, int, int] | None:
    """A generic DiT's patch size: config.patch_size, else a `patch_size` attribute; None if neither."""
    for source in (getattr(model, "config", None), model):
        patch = getattr(source, "patch_size", None) if source is not None else None
        if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0:
            return _patch3(patch)
        if isinstance(patch, (tuple, list)) and patch and all(isinstance(p, int) and p > 0 for p in patch):
            return _patch3(patch)
    return None


def _grid_generic(model, bound: dict[str, Any]) -> TokenGrid | None:
    # diffusers calls the input hidden_states; SiT-style modules take it first, often as x
    x = bound.get("hidden_states", next(iter(bound.values()), None))
    patch = _patch_of(model)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or patch is None:
        return None
    return TokenGrid(1, x.shape[2] // patch[1], x.shape[3] // patch[2])


@dataclass(frozen=True)
class ModelFamily:
    """How to find, read and lay out one family's block hidden states."""

    name: str
    class_names: tuple[str, ...]
    kind: str                                   # "video", "image" or "unet"
    block_lists: tuple[str, ...]                # attributes holding the blocks, in index order
    hidden_size_keys: tuple[str, ...]           # config attributes tried, in order
    image_output_index: int | None = None       # tuple outputs: position of the image tokens
    grid_from_inputs: Callable[[Any, dict], TokenGrid | None] = _no_grid
    patch_size: Callable[[nn.Module], tuple[int, int, int]] = _config_patch   # latents per token (T, H, W)
    local_block_tokens: bool = False            # Kandinsky5 sparse attention token order
    reference_tokens_after_image: bool = False  # Flux Kontext: a reference image's tokens follow the target's

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if self.kind == "unet":
            block = getattr(model, "mid_block", None)
            if block is None:
                raise CaptureError(f"{type(model).__name__} has no mid_block (mid_block_type=None?): U-REPA aligns "
                                   "the UNet mid-block, so the model needs one")
            return [block]
        found = []
        for attr in self.block_lists:
            blocks = getattr(model, attr, None)
            if blocks is None:
                raise CaptureError(f"{type(model).__name__} has no attribute {attr!r} holding its blocks")
            found.extend(blocks)
        return found

    def latent_patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(frames, rows, columns) of latents per token."""
        return self.patch_size(model)


def _ltx_patch(model) -> tuple[int, int, int]:
    return int(model.config.patch_size_t), int(model.config.patch_size), int(model.config.patch_size)


def _flux_patch(model) -> tuple[int, int, int]:
    return 1, 2, 2   # config.patch_size is 1, but FluxPipeline packs 2x2 latent patches into a token


def _generic_patch(model) -> tuple[int, int, int]:
    patch = _patch_of(model)
    if patch is None:
        raise CaptureError(f"cannot read the patch size of {type(model).__name__} to lay its tokens on the latents' "
                           "grid: tried config.patch_size and the model's patch_size attribute; pass "
                           "token_grid=(1, rows, columns) to the regularizer call instead")
    return patch


_HEADS_TIMES_DIM = "num_attention_heads*attention_head_dim"

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("wan", ("WanTransformer3DModel",), "video", ("blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_5d_channels_first),
    ModelFamily("ltx_video", ("LTXVideoTransformer3DModel",), "video", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_ltx, patch_size=_ltx_patch),
    ModelFamily("sana_video", ("SanaVideoTransformer3DModel",), "video", ("transformer_blocks",),
                (_HEADS_TIMES_DIM,), grid_from_inputs=_grid_5d_channels_first),
    ModelFamily("kandinsky5", ("Kandinsky5Transformer3DModel",), "video", ("visual_transformer_blocks",),
                ("model_dim",), grid_from_inputs=_grid_5d_channels_last, local_block_tokens=True),
    ModelFamily("flux", ("FluxTransformer2DModel",), "image", ("transformer_blocks", "single_transformer_blocks"),
                (_HEADS_TIMES_DIM,), image_output_index=1, patch_size=_flux_patch,
                reference_tokens_after_image=True),
    ModelFamily("sd3", ("SD3Transformer2DModel",), "image", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                image_output_index=1, grid_from_inputs=_grid_4d),
    ModelFamily("pixart", ("PixArtTransformer2DModel",), "image", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_4d),
    ModelFamily("sana", ("SanaTransformer2DModel",), "image", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_4d),
    ModelFamily("unet", ("UNet2DConditionModel", "UNet2DModel"), "unet", ("mid_block",),
                ("block_out_channels[-1]", _HEADS_TIMES_DIM)),
)


GENERIC_FAMILY = "dit"
GENERIC_BLOCK_LISTS = ("transformer_blocks", "blocks", "layers")
GENERIC_HIDDEN_SIZE_KEYS = (_HEADS_TIMES_DIM, "hidden_size", "inner_dim", "model_dim", "dim")


def generic_family(model: nn.Module) -> ModelFamily | None:
    """The `dit` family for an image DiT of no known family, found by its list of blocks; else None."""
    for attr in GENERIC_BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return ModelFamily(GENERIC_FAMILY, (type(model).__name__,), "image", (attr,), GENERIC_HIDDEN_SIZE_KEYS,
                               grid_from_inputs=_grid_generic, patch_size=_generic_patch)
    return None


def supported_families_text() -> str:
    return ("; ".join(f"{f.name} ({', '.join(f.class_names)})" for f in FAMILIES)
            + f"; and {GENERIC_FAMILY}: any other image DiT whose blocks sit in an nn.ModuleList named "
            + " / ".join(GENERIC_BLOCK_LISTS) + " and return (B, S, C) image tokens")


_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the blocks: strips torch.compile, DDP/FSDP-style `.module` and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):   # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in _DATA_PARALLEL and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)) and type(model).__name__.startswith("Peft"):
            model = model.get_base_model()
    return model


def detect_family(model: nn.Module) -> ModelFamily:
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if names & set(family.class_names):
            return family
    generic = generic_family(model)
    if generic is not None:
        return generic
    raise CaptureError(f"{type(model).__name__} is not a supported model family; supported: "
                       f"{supported_families_text()}")


def _config_value(config, key: str):
    if key == _HEADS_TIMES_DIM:
        heads, dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
        if isinstance(heads, int) and isinstance(dim, int):
            return heads * dim
        return None
    if key == "block_out_channels[-1]":
        channels = getattr(config, "block_out_channels", None)
        return int(channels[-1]) if channels else None
    value = getattr(config, key, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def hidden_size_of(model: nn.Module, family: ModelFamily) -> int:
    """Width C of the captured hidden states, read from the model config (SPEC §7)."""
    config = getattr(model, "config", None)
    for key in family.hidden_size_keys:
        value = _config_value(config, key) if config is not None else None
        if value:
            return value
    tried = ", ".join(f"config.{k}" for k in family.hidden_size_keys)
    raise CaptureError(f"cannot read the hidden size of {type(model).__name__}: tried {tried}; pass "
                       "hidden_size=<width of block outputs> to the regularizer explicitly")


def check_block_index(model: nn.Module, family: ModelFamily, index: int, key: str) -> None:
    blocks = family.blocks(model)
    if not 0 <= index < len(blocks):
        lists = ("mid_block" if family.kind == "unet"
                 else " + ".join(f"{len(getattr(model, a))} {a}" for a in family.block_lists))
        raise CaptureError(f"{key}={index} is out of range for {type(model).__name__}, which has {len(blocks)} "
                           f"blocks ({lists}; valid indices 0..{len(blocks) - 1}): hidden states not returned "
                           "for that block")


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


@dataclass
class Captured:
    """What one forward left behind: student tokens (B, S, C) with grad, teacher tokens (B, S, C) detached
    (backbone mode) or None, the token grid when the forward's inputs gave it, and the family."""

    student: torch.Tensor
    teacher: torch.Tensor | None
    grid: TokenGrid | None
    family: ModelFamily
    model: nn.Module
    captured_without_grad_mode: bool


class _ForwardState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.open = False            # inside a forward whose model-level hook fired
        self.grad_enabled = None     # grad mode at that forward's start
        self.grid: TokenGrid | None = None
        self.model: nn.Module | None = None
        self.slots: dict[str, torch.Tensor | None] = {"student": None, "teacher": None}
        self.filled: set[str] = set()
        self.no_grad_mode = False


class HiddenStateCapture:
    """Forward hooks on one block (and a teacher block in backbone mode) of one or several models.

    models: the denoisers (all of one family; several share one capture, e.g. Wan 2.2's two experts).
    block_index: student block; teacher_block_index: backbone-mode teacher block or None.
    """

    def __init__(self, models: list[nn.Module], block_index: int, *, teacher_block_index: int | None = None,
                 family: ModelFamily | None = None, hidden_size: int | None = None,
                 block_key: str = "crepa_block_index", teacher_key: str = "crepa_teacher_block_index") -> None:
        if not models:
            raise ValueError("at least one model is needed")
        if hidden_size is not None:
            if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
                raise TypeError(f"hidden_size must be a positive integer (the width of the block outputs), got "
                                f"{hidden_size!r}")
            if hidden_size <= 0:
                raise ValueError(f"hidden_size must be a positive integer (the width of the block outputs), got "
                                 f"{hidden_size}")
        self.models = [unwrap_model(m) for m in models]
        families = {detect_family(m).name for m in self.models}
        if len(families) > 1:
            raise CaptureError(f"models sharing one regularizer must be of one family, got {sorted(families)}")
        self.family = family or detect_family(self.models[0])
        self.block_index = block_index
        self.teacher_block_index = teacher_block_index
        sizes = {hidden_size or hidden_size_of(m, self.family) for m in self.models}
        if len(sizes) > 1:
            raise CaptureError(f"models sharing one regularizer must have one hidden size, got {sorted(sizes)}")
        self.hidden_size = sizes.pop()
        for model in self.models:
            check_block_index(model, self.family, block_index, block_key)
            if teacher_block_index is not None:
                check_block_index(model, self.family, teacher_block_index, teacher_key)
        self._signatures = {id(m): inspect.signature(m.forward) for m in self.models}
        self._state = _ForwardState()
        self._handles: list[Any] = []
        for model in self.models:
            self._handles.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._model_post_hook, always_call=True))
            blocks = self.family.blocks(model)
            self._handles.append(blocks[block_index].register_forward_hook(
                self._block_hook("student", model), with_kwargs=True))
            if teacher_block_index is not None:
                self._handles.append(blocks[teacher_block_index].register_forward_hook(
                    self._block_hook("teacher", model), with_kwargs=True))

    # ------------------------------------------------------------------ hooks

    def _model_pre_hook(self, model, args, kwargs):
        if _in_backward():
            return None
        state = self._state
        state.reset()
        state.open = True
        state.grad_enabled = torch.is_grad_enabled()
        state.model = model
        try:
            bound = self._signatures[id(model)].bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
            if args:
                bound.setdefault("hidden_states", args[0])
        state.grid = self.family.grid_from_inputs(model, bound)
        return None

    def _model_post_hook(self, model, args, output):
        if not _in_backward():
            self._state.open = False
        return None

    def _block_hook(self, slot: str, model: nn.Module):
        def hook(block, args, kwargs, output):
            if _in_backward():
                return None          # recomputation by non-reentrant gradient checkpointing
            state = self._state
            if state.open and slot in state.filled:
                return None          # keep the first capture of a forward
            if not state.open:
                state.model = model
                state.grid = None
            tokens, grid = self._image_tokens(output, args, kwargs, state.grid)
            if state.grid is None and grid is not None:
                state.grid = grid
            without_grad = slot == "student" and not tokens.requires_grad and not torch.is_grad_enabled()
            if without_grad:
                if state.open and state.grad_enabled:
                    raise CaptureError(
                        f"the output of block {self.block_index} of {type(model).__name__} carries no gradient "
                        "although the model's forward runs with gradients enabled: reentrant gradient "
                        "checkpointing (use_reentrant=True) hides it. Use non-reentrant checkpointing (diffusers' "
                        "default: model.enable_gradient_checkpointing(), or torch.utils.checkpoint.checkpoint(..., "
                        "use_reentrant=False))")
            if slot == "student":  # set for every capture: a wrapper's forwards never reset the state
                state.no_grad_mode = without_grad
            state.slots[slot] = tokens.detach() if slot == "teacher" else tokens
            state.filled.add(slot)
            return None
        return hook

    def _image_tokens(self, output, args, kwargs, grid: TokenGrid | None) -> tuple[torch.Tensor, TokenGrid | None]:
        family = self.family
        if family.image_output_index is not None:
            if not isinstance(output, (tuple, list)):
                raise CaptureError(f"{family.name} blocks should return (text, image) tuples, got "
                                   f"{type(output).__name__}")
            output = output[family.image_output_index]
        if not isinstance(output, torch.Tensor):
            generic = (f" (a model outside the known families ({type(self.models[0]).__name__} here) is supported "
                       "when its blocks return the image tokens as one (B, S, C) tensor)"
                       if family.name == GENERIC_FAMILY else "")
            raise CaptureError(f"the captured {family.name} block returned {type(output).__name__}, not a tensor"
                               + generic)
        if family.kind == "unet":
            if output.dim() != 4:
                raise CaptureError(f"UNet mid_block output should be (B, C, h, w), got {tuple(output.shape)}")
            b, c, h, w = output.shape
            if c != self.hidden_size:
                raise CaptureError(f"the UNet mid_block output has {c} channels but the hidden size is "
                                   f"{self.hidden_size}; pass hidden_size={c} if the config is wrong")
            return output.flatten(2).transpose(1, 2), TokenGrid(1, h, w)
        if output.dim() != 3:
            raise CaptureError(f"{family.name} block output should be (B, S, C), got {tuple(output.shape)}")
        if output.shape[-1] != self.hidden_size:
            raise CaptureError(f"the captured block output has width {output.shape[-1]} but the hidden size is "
                               f"{self.hidden_size}; pass hidden_size={output.shape[-1]} if the config is wrong")
        if family.local_block_tokens:
            sparse = kwargs.get("sparse_params", args[4] if len(args) > 4 else None)
            if isinstance(sparse, dict) and sparse.get("to_fractal"):
                if grid is None:
                    raise CaptureError("Kandinsky5 sparse attention reorders tokens into 8x8 windows; un-permuting "
                                       "them needs the token grid, which the capture reads from the model's forward "
                                       "inputs: call the model itself (model(...)), not a wrapper that calls "
                                       "model.forward(...) directly")
                output = unpermute_local_blocks(output, grid, KANDINSKY5_LOCAL_BLOCK)
        return output, None

    # ------------------------------------------------------------------ use

    @property
    def last_model(self) -> nn.Module:
        """The model whose forward ran last (the first model before any forward)."""
        return self._state.model if self._state.model is not None else self.models[0]

    @property
    def has_capture(self) -> bool:
        return self._state.slots["student"] is not None

    def consume(self) -> Captured:
        """The tensors captured by the last forward; the capture forgets them (nothing stays alive)."""
        state = self._state
        student, teacher = state.slots["student"], state.slots["teacher"]
        if student is None:
            raise CaptureError(
                f"no hidden states captured from block {self.block_index} of {type(self.models[0]).__name__}: run "
                "the model's forward (model(...)) before calling the regularizer, once per regularizer call "
                "(the capture is used up by each call). A block skipped in the forward (e.g. SD3 skip_layers) "
                "captures nothing")
        if self.teacher_block_index is not None and teacher is None:
            raise CaptureError(f"the forward captured the student block {self.block_index} but not the teacher "
                               f"block {self.teacher_block_index}")
        captured = Captured(student, teacher, state.grid, self.family, state.model, state.no_grad_mode)
        state.slots = {"student": None, "teacher": None}
        return captured

    def clear(self) -> None:
        """Drop any captured tensors (e.g. after a forward whose regularizer call is skipped)."""
        self._state.slots = {"student": None, "teacher": None}

    def detach(self) -> None:
        """Remove every hook; the models run exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state.reset()

    @property
    def attached(self) -> bool:
        return bool(self._handles)


def grid_from_latents(family: ModelFamily, model: nn.Module, latents: torch.Tensor) -> TokenGrid:
    """Token grid implied by unpacked latents (B, C, F, H, W) / (B, C, H, W) and the model's patch sizes."""
    pt, ph, pw = family.latent_patch_size(model)
    if family.kind == "video":
        if latents.dim() != 5:
            hint = (" (Kandinsky5's transformer input is channels-last; pass latents as (B, C, F, H, W): "
                    "latents.permute(0, 4, 1, 2, 3))") if family.name == "kandinsky5" else ""
            raise ValueError(f"latents for {family.name} must be unpacked (B, C, F, H, W), got shape "
                             f"{tuple(latents.shape)}{hint}")
        return TokenGrid(latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
    if latents.dim() != 4:
        hint = ""
        if family.name == "flux":
            hint = " (Flux's packed (B, S, 4C) tokens: pass the latents before packing)"
        elif family.name == GENERIC_FAMILY and latents.dim() == 5:
            video = ", ".join(f.name for f in FAMILIES if f.kind == "video")
            hint = (f" ({type(model).__name__} was taken for a generic image DiT; video models are supported in the "
                    f"families {video})")
        raise ValueError(f"latents for {family.name} must be unpacked (B, C, H, W), got shape {tuple(latents.shape)}"
                         + hint)
    return TokenGrid(1, latents.shape[2] // ph, latents.shape[3] // pw)
