"""Model families: what the regularizer knows about each diffusers denoiser (SPEC §7), one entry each.

An entry says, as data: the classes it matches (by name, anywhere in the model's class hierarchy), its
kind (video / image / unet), the block lists in index order (several lists form one index space), where
the image tokens sit in a block's output, the grid rule that reads the token grid (T, H, W) from the
forward's inputs, the patch size (latents per token), the config keys of the hidden size, and token-order
facts (Kandinsky5's local windows, Flux Kontext's trailing reference tokens). Adding a family is one
`ModelFamily(...)` in `FAMILIES` and its test; the hooks that use these facts live in capture.py.

- wan: WanTransformer3DModel; `blocks`; (B, S, C); input (B, C, F, H, W) / config.patch_size.
- ltx_video: LTXVideoTransformer3DModel; `transformer_blocks`; (B, S, C) packed tokens; the forward's
  num_frames, height, width arguments (LTX's rotary embedding lays tokens on exactly that grid).
- sana_video: SanaVideoTransformer3DModel; `transformer_blocks`; (B, S, C); input (B, C, F, H, W) / patch.
- kandinsky5: Kandinsky5Transformer3DModel; `visual_transformer_blocks`; (B, S, C) (*); channels-last
  input (B, F, H, W, C) / config.patch_size.
- flux: FluxTransformer2DModel; `transformer_blocks` then `single_transformer_blocks` as one index
  sequence; (text, image) tuples, image taken; unpacked latents (H/2, W/2) (2x2 packing), or the packed
  token count laid on the frames' aspect ratio. Flux Kontext appends the reference image's tokens after
  the target's; the first H'*W' (the target) are kept.
- sd3: SD3Transformer2DModel; `transformer_blocks`; (text, image), the last block (None, image);
  input (B, C, H, W) / config.patch_size.
- pixart: PixArtTransformer2DModel; `transformer_blocks`; (B, S, C); input (B, C, H, W) / patch.
- sana: SanaTransformer2DModel; `transformer_blocks`; (B, S, C); input (B, C, H, W) / patch.
- unet: UNet2DConditionModel, UNet2DModel; `mid_block`; (B, C, h, w) -> (B, h*w, C); (1, h, w) read from
  the block output itself.
- dit (any other image DiT, SPEC §7): a model of no family above whose blocks sit in an nn.ModuleList
  named `transformer_blocks`, `blocks` or `layers` (the first found), e.g. diffusers' DiTTransformer2DModel
  or HunyuanDiT2DModel, or a plain SiT-style module; blocks must return the image tokens as one
  (B, S, C) tensor in row-major patch order; hidden size from config.num_attention_heads*
  attention_head_dim, hidden_size, inner_dim, model_dim or dim (else `hidden_size=`); patch size from
  config.patch_size or the model's `patch_size` attribute; input (B, C, H, W) / patch. Sequences with
  other tokens (class, register or text tokens) do not match the grid and are refused, never guessed.

(*) With sparse attention (`sparse_params["to_fractal"]`) Kandinsky5 orders tokens in 8x8 local windows;
they are un-permuted to frame-major, row-major order.

The token grid of one call is decided in one place, `ModelFamily.token_grid(captured, inputs)`: the grid
the forward's inputs gave (read by the hook), the grid the latents give, an explicit `token_grid=`, and
for image families called with pixels only, the token count laid on the frames' aspect ratio; any two
that are given must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .grids import TokenGrid, image_grid_from_aspect, tokens_to_grid, unpermute_local_blocks
from .inputs import CallInputs

KANDINSKY5_LOCAL_BLOCK = 8


class CaptureError(RuntimeError):
    """Hidden states cannot be captured as configured (bad index, reentrant checkpointing, ...)."""


# ---------------------------------------------------------------------------------------------------
# Patch sizes and grid rules (the token grid from the forward's bound arguments; None when they do not
# give it, e.g. Flux's packed tokens).


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


# ---------------------------------------------------------------------------------------------------


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

    # ------------------------------------------------------------------ the model's blocks

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

    def check_block_index(self, model: nn.Module, index: int, key: str) -> None:
        blocks = self.blocks(model)
        if not 0 <= index < len(blocks):
            lists = ("mid_block" if self.kind == "unet"
                     else " + ".join(f"{len(getattr(model, a))} {a}" for a in self.block_lists))
            raise CaptureError(f"{key}={index} is out of range for {type(model).__name__}, which has {len(blocks)} "
                               f"blocks ({lists}; valid indices 0..{len(blocks) - 1}): hidden states not returned "
                               "for that block")

    def hidden_size(self, model: nn.Module) -> int:
        """Width C of the captured hidden states, read from the model config (SPEC §7)."""
        config = getattr(model, "config", None)
        for key in self.hidden_size_keys:
            value = _config_value(config, key) if config is not None else None
            if value:
                return value
        tried = ", ".join(f"config.{k}" for k in self.hidden_size_keys)
        raise CaptureError(f"cannot read the hidden size of {type(model).__name__}: tried {tried}; pass "
                           "hidden_size=<width of block outputs> to the regularizer explicitly")

    def latent_patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(frames, rows, columns) of latents per token."""
        return self.patch_size(model)

    # ------------------------------------------------------------------ a block's output

    def block_output_tokens(self, output, args, kwargs, grid: TokenGrid | None, hidden_size: int,
                            model: nn.Module) -> tuple[torch.Tensor, TokenGrid | None]:
        """The image tokens (B, S, C) of one block's output in frame-major, row-major order, and the grid
        when the output itself gives it (the UNet mid-block); `grid` is the one the forward's inputs gave."""
        if self.image_output_index is not None:
            if not isinstance(output, (tuple, list)):
                raise CaptureError(f"{self.name} blocks should return (text, image) tuples, got "
                                   f"{type(output).__name__}")
            output = output[self.image_output_index]
        if not isinstance(output, torch.Tensor):
            generic = (f" (a model outside the known families ({type(model).__name__} here) is supported "
                       "when its blocks return the image tokens as one (B, S, C) tensor)"
                       if self.name == GENERIC_FAMILY else "")
            raise CaptureError(f"the captured {self.name} block returned {type(output).__name__}, not a tensor"
                               + generic)
        if self.kind == "unet":
            if output.dim() != 4:
                raise CaptureError(f"UNet mid_block output should be (B, C, h, w), got {tuple(output.shape)}")
            b, c, h, w = output.shape
            if c != hidden_size:
                raise CaptureError(f"the UNet mid_block output has {c} channels but the hidden size is "
                                   f"{hidden_size}; pass hidden_size={c} if the config is wrong")
            return output.flatten(2).transpose(1, 2), TokenGrid(1, h, w)
        if output.dim() != 3:
            raise CaptureError(f"{self.name} block output should be (B, S, C), got {tuple(output.shape)}")
        if output.shape[-1] != hidden_size:
            raise CaptureError(f"the captured block output has width {output.shape[-1]} but the hidden size is "
                               f"{hidden_size}; pass hidden_size={output.shape[-1]} if the config is wrong")
        if self.local_block_tokens:
            sparse = kwargs.get("sparse_params", args[4] if len(args) > 4 else None)
            if isinstance(sparse, dict) and sparse.get("to_fractal"):
                if grid is None:
                    raise CaptureError("Kandinsky5 sparse attention reorders tokens into 8x8 windows; un-permuting "
                                       "them needs the token grid, which the capture reads from the model's forward "
                                       "inputs: call the model itself (model(...)), not a wrapper that calls "
                                       "model.forward(...) directly")
                output = unpermute_local_blocks(output, grid, KANDINSKY5_LOCAL_BLOCK)
        return output, None

    # ------------------------------------------------------------------ one call's grid and tokens

    def latent_grid(self, model: nn.Module, latents: torch.Tensor) -> TokenGrid:
        """Token grid implied by unpacked latents (B, C, F, H, W) / (B, C, H, W) and the model's patch sizes."""
        pt, ph, pw = self.latent_patch_size(model)
        if self.kind == "video":
            if latents.dim() != 5:
                hint = (" (Kandinsky5's transformer input is channels-last; pass latents as (B, C, F, H, W): "
                        "latents.permute(0, 4, 1, 2, 3))") if self.name == "kandinsky5" else ""
                raise ValueError(f"latents for {self.name} must be unpacked (B, C, F, H, W), got shape "
                                 f"{tuple(latents.shape)}{hint}")
            return TokenGrid(latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        if latents.dim() != 4:
            hint = ""
            if self.name == "flux":
                hint = " (Flux's packed (B, S, 4C) tokens: pass the latents before packing)"
            elif self.name == GENERIC_FAMILY and latents.dim() == 5:
                video = ", ".join(f.name for f in FAMILIES if f.kind == "video")
                hint = (f" ({type(model).__name__} was taken for a generic image DiT; video models are supported in "
                        f"the families {video})")
            raise ValueError(f"latents for {self.name} must be unpacked (B, C, H, W), got shape "
                             f"{tuple(latents.shape)}" + hint)
        return TokenGrid(1, latents.shape[2] // ph, latents.shape[3] // pw)

    def token_grid(self, captured, inputs: CallInputs) -> TokenGrid:
        """The (frames, rows, columns) of the captured tokens, decided once from every source the call
        has; sources that are given must agree. captured: capture.Captured (its grid, model and student)."""
        grid = captured.grid
        if self.kind == "unet":   # the mid-block output gives its own grid; latents are at another scale
            if inputs.token_grid is not None and inputs.token_grid != grid:
                raise ValueError(f"token_grid={tuple(inputs.token_grid)} disagrees with the mid-block grid "
                                 f"{tuple(grid)}")
            if inputs.latents is not None and inputs.latents.dim() != 4:
                raise ValueError(f"latents for a UNet must be (B, C, H, W), got shape {tuple(inputs.latents.shape)}")
            return grid
        latents = inputs.latents
        if latents is not None:
            from_latents = self.latent_grid(captured.model, latents)
            if grid is not None and grid != from_latents:
                raise ValueError(f"latents of shape {tuple(latents.shape)} give the token grid {tuple(from_latents)} "
                                 f"(frames, rows, columns) but the transformer's forward ran on {tuple(grid)}: pass "
                                 "the clean latents of the batch the transformer just saw")
            grid = from_latents
        if inputs.token_grid is not None:
            if grid is not None and grid != inputs.token_grid:
                raise ValueError(f"token_grid={tuple(inputs.token_grid)} disagrees with the grid {tuple(grid)} of the "
                                 "forward")
            grid = inputs.token_grid
        if grid is None and inputs.pixels is not None and self.kind == "image":
            grid = image_grid_from_aspect(captured.student.shape[1], inputs.pixels.shape[-2], inputs.pixels.shape[-1],
                                          f"{self.name} hidden-state",
                                          "; pass latents= (their shape gives the grid) or token_grid=(1, rows, cols)")
        if grid is None:
            raise ValueError(f"cannot tell the token grid of the {self.name} hidden states: pass latents= "
                             "(their shape gives it) or token_grid=(frames, rows, columns)")
        return grid

    def image_tokens(self, tokens: torch.Tensor, grid: TokenGrid, what: str) -> torch.Tensor:
        """Captured tokens (B, S, C) -> (B, T, H, W, C) on `grid`; a Flux Kontext sequence keeps the target's
        tokens, which come first."""
        if self.reference_tokens_after_image and tokens.shape[1] > grid.tokens:
            tokens = tokens[:, :grid.tokens]
        return tokens_to_grid(tokens, grid, what)


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


def grid_from_latents(family: ModelFamily, model: nn.Module, latents: torch.Tensor) -> TokenGrid:
    """Token grid implied by unpacked latents and the model's patch sizes (see ModelFamily.latent_grid)."""
    return family.latent_grid(model, latents)
