"""Model families: what the regularizer knows about each diffusers denoiser (docs/contract.md §7), one entry each.

An entry says, as data: the classes it matches (by name, anywhere in the model's class hierarchy), its
kind (video / image / unet), the block lists in index order (several lists form one index space, double-
stream blocks first), one output rule per list saying where the image tokens sit in a block's output, what
the forward's inputs say about the sequence (caption length, registers, per-sample caption lengths), the
grid rule that reads the token grid (T, H, W) from the forward's inputs, the patch size (latents per
token), the config keys of the hidden size, and token-order facts (Kandinsky5's local windows; tokens after
the image's own). Adding a family is one `ModelFamily(...)` in `FAMILIES` and its test; the hooks that use
these facts live in capture.py. Everything below was read from the diffusers 0.42 model and pipeline code.

Output rules: `ImageTokens` (the block returns the image tokens), `TupleItem(i)` (item i of a tuple),
`AfterText` (one joint [caption, image] sequence: the image after the caption length, read from the
forward's `encoder_hidden_states`), `AfterEachCaption` (Lumina2: per sample [caption_b, image, padding],
gathered after each sample's `encoder_attention_mask` sum). None of them reads a device value on the host.

- wan: WanTransformer3DModel; `blocks`; (B, S, C); input (B, C, F, H, W) / config.patch_size.
- ltx_video: LTXVideoTransformer3DModel; `transformer_blocks`; (B, S, C) packed tokens; the forward's
  num_frames, height, width arguments (LTX's rotary embedding lays tokens on exactly that grid).
- sana_video: SanaVideoTransformer3DModel; `transformer_blocks`; (B, S, C); input (B, C, F, H, W) / patch.
- kandinsky5: Kandinsky5Transformer3DModel; `visual_transformer_blocks`; (B, S, C) (*); channels-last
  input (B, F, H, W, C) / config.patch_size.
- ltx2: LTX2VideoTransformer3DModel; `transformer_blocks`; (video, audio) tuples, video taken; the
  forward's latent num_frames, height, width / (patch_size_t, patch_size, patch_size).
- hunyuan_video15: HunyuanVideo15Transformer3DModel; `transformer_blocks`; (video, text); input
  (B, C, F, H, W) (latents, condition latents and mask concatenated on channels) / (patch_size_t, patch).
- hunyuan_video: HunyuanVideoTransformer3DModel (1.0); `transformer_blocks` then
  `single_transformer_blocks`; both return (video, text) (the single blocks split their joint sequence,
  video first); input / (patch_size_t, patch_size).
- cosmos: CosmosTransformer3DModel; `transformer_blocks`; (B, S, C) frame-major video tokens; input
  (B, C, F, H, W) / config.patch_size (a 3-tuple).
- flux: FluxTransformer2DModel; `transformer_blocks` then `single_transformer_blocks`; (text, image)
  tuples, image taken; unpacked latents (H/2, W/2) (2x2 packing), or the packed token count laid on the
  frames' aspect ratio. Flux Kontext appends the reference image's tokens after the target's; the first
  H'*W' (the target) are kept.
- flux2: Flux2Transformer2DModel; double blocks (text, image); single blocks one [caption, image]
  tensor; Flux2Pipeline patchifies the VAE latents 2x2 into channels and batch-normalises them, then packs
  one latent pixel per token, so the latents are (B, 4C, h, w) with patch 1; edit references follow the
  target (kept out); the KV-cache extract pass puts num_ref_tokens references first (skipped).
- chroma: ChromaTransformer2DModel (Flux's layout but not a Flux subclass); double (text, image), single
  one [caption, image] tensor; Flux's 2x2 packing.
- hidream: HiDreamImageTransformer2DModel; `double_stream_blocks` (image, text) then
  `single_stream_blocks` one [image, padding, T5 + Llama text] tensor; input (B, C, H, W) / patch. Non-square
  inputs are padded to max_seq image tokens (square ones are not); the first H'*W' are kept.
- auraflow: AuraFlowTransformer2DModel; `joint_transformer_blocks` (text, image) then
  `single_transformer_blocks` one [8 register tokens, caption, image] tensor; input / patch.
- lumina2: Lumina2Transformer2DModel; `layers` (not the noise/context refiners); per sample [its unpadded
  caption, image, padding]; input / patch; hidden size config.hidden_size.
- qwen_image: QwenImageTransformer2DModel; `transformer_blocks`; (text, image); 2x2 packing; the grid
  is img_shapes[b][0] (the target's (1, H/2, W/2)); edit pipelines append reference tokens (kept out).
- sd3: SD3Transformer2DModel; `transformer_blocks`; (text, image), the last block (None, image);
  input (B, C, H, W) / config.patch_size.
- pixart: PixArtTransformer2DModel; `transformer_blocks`; (B, S, C); input (B, C, H, W) / patch.
- sana: SanaTransformer2DModel; `transformer_blocks`; (B, S, C); input (B, C, H, W) / patch.
- unet: UNet2DConditionModel, UNet2DModel (SD1.5, SDXL, Kolors); `mid_block`; (B, C, h, w) -> (B, h*w, C);
  (1, h, w) read from the block output itself.
- dit (any other DiT, docs/contract.md §7): a model of no family above whose blocks sit in an nn.ModuleList named
  `transformer_blocks`, `blocks` or `layers` (the first found), e.g. diffusers' DiTTransformer2DModel or
  HunyuanDiT2DModel, or a plain SiT-style module; blocks must return the image tokens as one (B, S, C)
  tensor in frame-major, row-major patch order; hidden size from config.num_attention_heads*
  attention_head_dim, hidden_size, inner_dim, model_dim or dim, else the model's hidden_size / dim /
  inner_dim attribute (else `hidden_size=`); patch size from config.patch_size or the model's
  `patch_size` attribute; input (B, C, H, W) or (B, C, F, H, W) / patch, or token_grid=(T, rows, cols).
  Sequences with other tokens (class, register or text tokens) do not match the grid and are refused,
  naming the class and the rule read, never guessed.

(*) With sparse attention (`sparse_params["to_fractal"]`) Kandinsky5 orders tokens in 8x8 local windows;
they are un-permuted to frame-major, row-major order.

The token grid of one call is decided in one place, `ModelFamily.token_grid(captured, inputs)`: the grid
the forward's inputs gave (read by the hook), the grid the latents give, an explicit `token_grid=`, and
for image families called with pixels only, the token count laid on the frames' aspect ratio; any two
that are given must agree.

Tested (tests/test_families.py) with the smallest random-weight model of each class fed what its pipeline
feeds it: exactly the image tokens of the captured output get a gradient, in order; 41 s of CPU time for
the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .grids import TokenGrid, check_pixels_fit_grid, image_grid_from_aspect, tokens_to_grid, unpermute_local_blocks
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


def _grid_5d(frames_axis: int):
    """grid_from_inputs for 5-D `hidden_states` whose frame, row and column axes start at `frames_axis`
    (2: (B, C, F, H, W); 1: channels last, (B, F, H, W, C)), divided by the model's patch size."""
    def grid(model, bound: dict[str, Any]) -> TokenGrid | None:
        x = bound.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            return None
        pt, ph, pw = _patch3(model.config.patch_size)
        return TokenGrid(x.shape[frames_axis] // pt, x.shape[frames_axis + 1] // ph, x.shape[frames_axis + 2] // pw)
    return grid


_grid_5d_channels_first = _grid_5d(2)
_grid_5d_channels_last = _grid_5d(1)


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
    # diffusers calls the input hidden_states; SiT-style modules take it first, often as x. Channels-first
    # (B, C, H, W) images or (B, C, F, H, W) videos.
    x = bound.get("hidden_states", next(iter(bound.values()), None))
    patch = _patch_of(model)
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or patch is None:
        return None
    if x.dim() == 5:
        return TokenGrid(x.shape[2] // patch[0], x.shape[3] // patch[1], x.shape[4] // patch[2])
    return TokenGrid(1, x.shape[2] // patch[1], x.shape[3] // patch[2])


def _ltx_patch(model) -> tuple[int, int, int]:
    return int(model.config.patch_size_t), int(model.config.patch_size), int(model.config.patch_size)


def _flux_patch(model) -> tuple[int, int, int]:
    return 1, 2, 2   # config.patch_size is 1, but FluxPipeline packs 2x2 latent patches into a token


def _one_latent_per_token(model) -> tuple[int, int, int]:
    return 1, 1, 1   # Flux2Pipeline patchifies 2x2 into channels first, then packs one latent pixel per token


def _generic_patch(model) -> tuple[int, int, int]:
    patch = _patch_of(model)
    if patch is None:
        raise CaptureError(f"cannot read the patch size of {type(model).__name__} to lay its tokens on the latents' "
                           "grid: tried config.patch_size and the model's patch_size attribute; pass "
                           "token_grid=(frames, rows, columns) to the regularizer call instead")
    return patch


def _grid_5d_patch_t(model, bound: dict[str, Any]) -> TokenGrid | None:
    # HunyuanVideo 1.0 / 1.5: config.patch_size (rows, columns) and config.patch_size_t (frames)
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    pt, ph, pw = _ltx_patch(model)
    return TokenGrid(x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)


def _grid_ltx2(model, bound: dict[str, Any]) -> TokenGrid | None:
    # LTX-2's forward takes the latent num_frames, height, width (its rotary grid steps them by the patch)
    dims = [bound.get(k) for k in ("num_frames", "height", "width")]
    if not all(isinstance(d, int) for d in dims):
        return None
    pt, ph, pw = _ltx_patch(model)
    return TokenGrid(dims[0] // pt, dims[1] // ph, dims[2] // pw)


def _grid_qwen(model, bound: dict[str, Any]) -> TokenGrid | None:
    # img_shapes: per sample [(frames, rows, columns) of the target, then one per reference image (edit)]
    shapes = bound.get("img_shapes")
    if not isinstance(shapes, (list, tuple)) or not shapes:
        return None
    targets = set()
    for sample in shapes:
        first = sample[0] if isinstance(sample, (list, tuple)) and sample and \
            isinstance(sample[0], (list, tuple)) else sample
        targets.add(tuple(int(d) for d in first))
    if len(targets) != 1:
        raise CaptureError(f"the samples of one Qwen-Image batch have different target shapes {sorted(targets)} in "
                           "img_shapes; one regularizer call needs one token grid per batch")
    return TokenGrid(*targets.pop())


# ---------------------------------------------------------------------------------------------------
# What the forward's inputs say about the token sequence of the blocks (read by the model-level hook).


@dataclass(frozen=True)
class SequenceLayout:
    """Read once per forward from its inputs, with no host sync. text_tokens: tokens before the image part
    of a joint (text, image) sequence (the caption, and register tokens where the model prepends them);
    leading_reference_tokens: reference-image tokens at the start of the image part (Flux2's KV-cache
    extract pass); caption_lengths: each sample's unpadded caption length (B,) where every sample lays out
    its own caption (Lumina2)."""

    text_tokens: int | None = None
    leading_reference_tokens: int = 0
    caption_lengths: torch.Tensor | None = None


def _no_layout(model, bound: dict[str, Any]) -> SequenceLayout:
    return SequenceLayout()


def _text_length(bound: dict[str, Any], key: str = "encoder_hidden_states") -> int | None:
    text = bound.get(key)
    return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else None


def _layout_text_first(model, bound: dict[str, Any]) -> SequenceLayout:
    return SequenceLayout(_text_length(bound))


def _layout_flux2(model, bound: dict[str, Any]) -> SequenceLayout:
    # the KV-cache "extract" pass puts num_ref_tokens reference tokens before the target's
    refs = bound.get("num_ref_tokens") if bound.get("kv_cache_mode") == "extract" else 0
    return SequenceLayout(_text_length(bound), int(refs or 0))


def _layout_auraflow(model, bound: dict[str, Any]) -> SequenceLayout:
    # AuraFlow prepends its learned register tokens to the caption before the joint blocks
    text = _text_length(bound)
    return SequenceLayout(None if text is None else int(model.register_tokens.shape[1]) + text)


def _layout_lumina2(model, bound: dict[str, Any]) -> SequenceLayout:
    mask = bound.get("encoder_attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return SequenceLayout()
    return SequenceLayout(caption_lengths=mask.sum(dim=1))


# ---------------------------------------------------------------------------------------------------
# Where the image (or video) tokens sit in one block's output: one rule per list of blocks. A rule returns
# the image part, whose first tokens are the image's, frame-major then row-major.


@dataclass(frozen=True)
class ImageTokens:
    """The block returns the image tokens (B, S, C) as one tensor."""

    def describe(self) -> str:
        return "one (B, S, C) tensor of image tokens"

    def image_part(self, output, layout: SequenceLayout, grid: TokenGrid | None, family: str):
        return output


@dataclass(frozen=True)
class TupleItem:
    """The block returns a tuple; item `index` is the image part (`names`: what each item holds)."""

    index: int
    names: tuple[str, ...]

    def describe(self) -> str:
        return f"a ({', '.join(self.names)}) tuple, {self.names[self.index]} taken"

    def image_part(self, output, layout: SequenceLayout, grid: TokenGrid | None, family: str):
        if not isinstance(output, (tuple, list)) or len(output) != len(self.names):
            got = type(output).__name__ + (f" of {len(output)}" if isinstance(output, (tuple, list)) else "")
            raise CaptureError(f"{family} blocks should return ({', '.join(self.names)}) tuples, got {got}")
        return output[self.index]


@dataclass(frozen=True)
class AfterText:
    """The block returns one joint sequence (B, L + S, C) whose first L tokens are the caption (and
    registers); L comes from the forward's inputs."""

    def describe(self) -> str:
        return "one joint (text, image) sequence, the image after the text length read from the forward's inputs"

    def image_part(self, output, layout: SequenceLayout, grid: TokenGrid | None, family: str):
        if layout.text_tokens is None:
            raise CaptureError(f"{family} single-stream blocks hold text then image tokens; the text length is read "
                               "from the model's forward inputs: call the model itself (model(...)), not a wrapper "
                               "that calls model.forward(...) directly, or capture a double-stream block")
        return output[:, layout.text_tokens:] if isinstance(output, torch.Tensor) else output


@dataclass(frozen=True)
class AfterEachCaption:
    """Each sample's sequence is [its unpadded caption, image, padding] (Lumina2): the image tokens are
    gathered per sample after that sample's caption length (the grid gives how many)."""

    def describe(self) -> str:
        return "per sample [caption, image, padding], the image after each sample's unpadded caption length"

    def image_part(self, output, layout: SequenceLayout, grid: TokenGrid | None, family: str):
        if layout.caption_lengths is None or grid is None:
            raise CaptureError(f"{family} lays each sample's caption before its image tokens; the caption lengths "
                               "and the token grid are read from the model's forward inputs (encoder_attention_mask, "
                               "hidden_states): call the model itself (model(...)), not a wrapper that calls "
                               "model.forward(...) directly")
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            return output
        positions = layout.caption_lengths.to(output.device).long()[:, None] + \
            torch.arange(grid.tokens, device=output.device)
        return torch.gather(output, 1, positions[..., None].expand(-1, -1, output.shape[-1]))


BlockOutput = ImageTokens | TupleItem | AfterText | AfterEachCaption


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


def _check_unet_latents(model: nn.Module, latents: torch.Tensor, grid: TokenGrid) -> None:
    """Latents (B, C, H, W) of the forward's size give the mid-block grid: each down block with a
    downsampler halves a side (a stride-2 convolution rounds up, a pooling down), so the mid-block side
    lies between floor(H / 2^n) and ceil(H / 2^n)."""
    factor = 2 ** sum(1 for block in getattr(model, "down_blocks", ()) if getattr(block, "downsamplers", None))
    for side, size in (("rows", grid.height), ("columns", grid.width)):
        latent = latents.shape[2] if side == "rows" else latents.shape[3]
        if not latent // factor <= size <= -(-latent // factor):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not give the mid-block grid {tuple(grid)} "
                             f"(frames, rows, columns) of the UNet's forward (its {factor}x downsampling makes "
                             f"{latent} latent {side} {latent // factor} or {-(-latent // factor)} tokens): pass the "
                             "clean latents of the batch the UNet just saw")


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """How to find, read and lay out one family's block hidden states."""

    name: str
    class_names: tuple[str, ...]
    kind: str                                   # "video", "image" or "unet"
    block_lists: tuple[str, ...]                # attributes holding the blocks, in index order
    hidden_size_keys: tuple[str, ...]           # config attributes tried, in order
    block_outputs: tuple[BlockOutput, ...] = (ImageTokens(),)   # where the image tokens sit, one per list
    grid_from_inputs: Callable[[Any, dict], TokenGrid | None] = _no_grid
    layout_from_inputs: Callable[[Any, dict], SequenceLayout] = _no_layout
    patch_size: Callable[[nn.Module], tuple[int, int, int]] = _config_patch   # latents per token (T, H, W)
    local_block_tokens: bool = False            # Kandinsky5 sparse attention token order
    # The image part may hold more tokens after the image's own (reference images of edit variants,
    # HiDream's padding and text): the first grid-many are kept.
    tokens_after_image: bool = False

    def __post_init__(self) -> None:
        if self.kind != "unet" and len(self.block_outputs) != len(self.block_lists):
            raise ValueError(f"family {self.name}: one block output rule per block list, got "
                             f"{len(self.block_outputs)} for {len(self.block_lists)}")

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

    def block_output_of(self, model: nn.Module, index: int) -> BlockOutput:
        """The output rule of the block at `index` of the family's one index space."""
        if self.kind == "unet":
            return ImageTokens()
        for attr, rule in zip(self.block_lists, self.block_outputs):
            if index < len(getattr(model, attr)):
                return rule
            index -= len(getattr(model, attr))
        raise CaptureError(f"block index past the last block of {type(model).__name__}")

    def describe_blocks(self) -> str:
        return "; ".join(f"`{attr}`: {rule.describe()}" for attr, rule in zip(self.block_lists, self.block_outputs))

    def check_block_index(self, model: nn.Module, index: int, key: str) -> None:
        blocks = self.blocks(model)
        if not 0 <= index < len(blocks):
            lists = ("mid_block" if self.kind == "unet"
                     else " + ".join(f"{len(getattr(model, a))} {a}" for a in self.block_lists))
            raise CaptureError(f"{key}={index} is out of range for {type(model).__name__}, which has {len(blocks)} "
                               f"blocks ({lists}; valid indices 0..{len(blocks) - 1}): hidden states not returned "
                               "for that block")

    def hidden_size(self, model: nn.Module) -> int:
        """Width C of the captured hidden states, read from the model config (docs/contract.md §7); for a DiT of no
        known family also from the model's own width attribute (a plain module has no config)."""
        config = getattr(model, "config", None)
        for key in self.hidden_size_keys:
            value = _config_value(config, key) if config is not None else None
            if value:
                return value
        tried = [f"config.{k}" for k in self.hidden_size_keys]
        if self.name == GENERIC_FAMILY:
            for key in GENERIC_WIDTH_ATTRIBUTES:
                value = _config_value(model, key)
                if value:
                    return value
            tried += [f"the model's {k} attribute" for k in GENERIC_WIDTH_ATTRIBUTES]
        tried = ", ".join(tried)
        raise CaptureError(f"cannot read the hidden size of {type(model).__name__}: tried {tried}; pass "
                           "hidden_size=<width of block outputs> to the regularizer explicitly")

    def latent_patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(frames, rows, columns) of latents per token."""
        return self.patch_size(model)

    # ------------------------------------------------------------------ a block's output

    def block_output_tokens(self, rule: BlockOutput, output, args, kwargs, grid: TokenGrid | None,
                            layout: SequenceLayout, hidden_size: int,
                            model: nn.Module) -> tuple[torch.Tensor, TokenGrid | None]:
        """The image tokens (B, S, C) of one block's output in frame-major, row-major order, and the grid
        when the output itself gives it (the UNet mid-block). rule: the block's output rule
        (`block_output_of`); grid, layout: what the forward's inputs gave."""
        output = rule.image_part(output, layout, grid, self.name)
        if not isinstance(output, torch.Tensor):
            generic = (f" (a model outside the known families ({type(model).__name__} here) is supported "
                       "when its blocks return the image tokens as one (B, S, C) tensor; tried the known families "
                       "and the generic rule)"
                       if self.name == GENERIC_FAMILY else f" (expected {rule.describe()})")
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
        if layout.leading_reference_tokens:
            output = output[:, layout.leading_reference_tokens:]
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
        """Token grid implied by unpacked latents (B, C, F, H, W) / (B, C, H, W) and the model's patch sizes.
        A DiT of no known family takes either; Qwen-Image also takes its VAE's one-frame (B, C, 1, H, W)."""
        pt, ph, pw = self.latent_patch_size(model)
        if self.kind == "video" or (self.name == GENERIC_FAMILY and latents.dim() == 5):
            if latents.dim() != 5:
                hint = (" (Kandinsky5's transformer input is channels-last; pass latents as (B, C, F, H, W): "
                        "latents.permute(0, 4, 1, 2, 3))") if self.name == "kandinsky5" else ""
                hint += " (LTX-2: pass the video latents before packing)" if self.name == "ltx2" else ""
                raise ValueError(f"latents for {self.name} must be unpacked (B, C, F, H, W), got shape "
                                 f"{tuple(latents.shape)}{hint}")
            return TokenGrid(latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)
        if self.name in IMAGE_LATENTS_WITH_FRAME_AXIS and latents.dim() == 5 and latents.shape[2] == 1:
            latents = latents[:, :, 0]
        if latents.dim() != 4:
            hint = ""
            if self.name in ("flux", "chroma", "qwen_image"):
                hint = " (packed (B, S, 4C) tokens: pass the latents before packing)"
            elif self.name == "flux2":
                hint = (" (pass the latents Flux2Pipeline packs: (B, 4C, H/2, W/2), the VAE latents after its 2x2 "
                        "patchify and batch norm, before the (B, S, 4C) flattening)")
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
            if inputs.latents is not None:
                if inputs.latents.dim() != 4:
                    raise ValueError(f"latents for a UNet must be (B, C, H, W), got shape "
                                     f"{tuple(inputs.latents.shape)}")
                _check_unet_latents(captured.model, inputs.latents, grid)
            if inputs.pixels is not None:
                check_pixels_fit_grid(tuple(inputs.pixels.shape), grid, "the mid-block")
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
        if inputs.pixels is not None:
            check_pixels_fit_grid(tuple(inputs.pixels.shape), grid, "the forward")
        return grid

    def image_tokens(self, tokens: torch.Tensor, grid: TokenGrid, what: str,
                     model: nn.Module | None = None) -> torch.Tensor:
        """Captured tokens (B, S, C) -> (B, T, H, W, C) on `grid`. Where the family's image part holds more
        tokens after the image's own (edit reference images, padding, text), the first grid-many are kept;
        any other count is refused naming the model class and the rule that was read."""
        if self.tokens_after_image and tokens.dim() == 3 and tokens.shape[1] > grid.tokens:
            tokens = tokens[:, :grid.tokens]
        try:
            return tokens_to_grid(tokens, grid, what)
        except ValueError as error:
            hint = (" A sequence that holds other tokens (class, register or text tokens) is refused, never "
                    "guessed; a video DiT needs token_grid=(frames, rows, columns) or 5-D latents / inputs."
                    if self.name == GENERIC_FAMILY else "")
            owner = type(model).__name__ if model is not None else self.name
            raise ValueError(f"cannot lay the {what} of {owner} on its token grid: read as the {self.name} family "
                             f"({self.describe_blocks()}), {error}.{hint}") from None


_TEXT_IMAGE = TupleItem(1, ("text", "image"))
_IMAGE_TEXT = TupleItem(0, ("image", "text"))
_VIDEO_TEXT = TupleItem(0, ("video", "text"))

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("wan", ("WanTransformer3DModel",), "video", ("blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_5d_channels_first),
    ModelFamily("ltx_video", ("LTXVideoTransformer3DModel",), "video", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_ltx, patch_size=_ltx_patch),
    ModelFamily("sana_video", ("SanaVideoTransformer3DModel",), "video", ("transformer_blocks",),
                (_HEADS_TIMES_DIM,), grid_from_inputs=_grid_5d_channels_first),
    ModelFamily("kandinsky5", ("Kandinsky5Transformer3DModel",), "video", ("visual_transformer_blocks",),
                ("model_dim",), grid_from_inputs=_grid_5d_channels_last, local_block_tokens=True),
    ModelFamily("ltx2", ("LTX2VideoTransformer3DModel",), "video", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                (TupleItem(0, ("video", "audio")),), grid_from_inputs=_grid_ltx2, patch_size=_ltx_patch),
    ModelFamily("hunyuan_video15", ("HunyuanVideo15Transformer3DModel",), "video", ("transformer_blocks",),
                (_HEADS_TIMES_DIM,), (_VIDEO_TEXT,), grid_from_inputs=_grid_5d_patch_t, patch_size=_ltx_patch),
    ModelFamily("hunyuan_video", ("HunyuanVideoTransformer3DModel",), "video",
                ("transformer_blocks", "single_transformer_blocks"), (_HEADS_TIMES_DIM,), (_VIDEO_TEXT, _VIDEO_TEXT),
                grid_from_inputs=_grid_5d_patch_t, patch_size=_ltx_patch),
    ModelFamily("cosmos", ("CosmosTransformer3DModel",), "video", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                grid_from_inputs=_grid_5d_channels_first),
    ModelFamily("flux", ("FluxTransformer2DModel",), "image", ("transformer_blocks", "single_transformer_blocks"),
                (_HEADS_TIMES_DIM,), (_TEXT_IMAGE, _TEXT_IMAGE), patch_size=_flux_patch, tokens_after_image=True),
    ModelFamily("flux2", ("Flux2Transformer2DModel",), "image", ("transformer_blocks", "single_transformer_blocks"),
                (_HEADS_TIMES_DIM,), (_TEXT_IMAGE, AfterText()), layout_from_inputs=_layout_flux2,
                patch_size=_one_latent_per_token, tokens_after_image=True),
    ModelFamily("chroma", ("ChromaTransformer2DModel",), "image", ("transformer_blocks", "single_transformer_blocks"),
                (_HEADS_TIMES_DIM,), (_TEXT_IMAGE, AfterText()), layout_from_inputs=_layout_text_first,
                patch_size=_flux_patch),
    ModelFamily("hidream", ("HiDreamImageTransformer2DModel",), "image",
                ("double_stream_blocks", "single_stream_blocks"), (_HEADS_TIMES_DIM,), (_IMAGE_TEXT, ImageTokens()),
                grid_from_inputs=_grid_4d, tokens_after_image=True),
    ModelFamily("auraflow", ("AuraFlowTransformer2DModel",), "image",
                ("joint_transformer_blocks", "single_transformer_blocks"), (_HEADS_TIMES_DIM,),
                (_TEXT_IMAGE, AfterText()), grid_from_inputs=_grid_4d, layout_from_inputs=_layout_auraflow),
    ModelFamily("lumina2", ("Lumina2Transformer2DModel",), "image", ("layers",), ("hidden_size",),
                (AfterEachCaption(),), grid_from_inputs=_grid_4d, layout_from_inputs=_layout_lumina2),
    ModelFamily("qwen_image", ("QwenImageTransformer2DModel",), "image", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                (_TEXT_IMAGE,), grid_from_inputs=_grid_qwen, patch_size=_flux_patch, tokens_after_image=True),
    ModelFamily("sd3", ("SD3Transformer2DModel",), "image", ("transformer_blocks",), (_HEADS_TIMES_DIM,),
                (_TEXT_IMAGE,), grid_from_inputs=_grid_4d),
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
GENERIC_WIDTH_ATTRIBUTES = ("hidden_size", "dim", "inner_dim")     # a plain module's own width
IMAGE_LATENTS_WITH_FRAME_AXIS = ("qwen_image",)   # AutoencoderKLQwenImage latents are (B, C, 1, H, W)


def generic_family(model: nn.Module) -> ModelFamily | None:
    """The `dit` family for a DiT of no known family, found by its list of blocks; else None. Its kind is
    "image"; video works through 5-D inputs or latents, or an explicit token_grid=(frames, rows, columns)."""
    for attr in GENERIC_BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return ModelFamily(GENERIC_FAMILY, (type(model).__name__,), "image", (attr,), GENERIC_HIDDEN_SIZE_KEYS,
                               grid_from_inputs=_grid_generic, patch_size=_generic_patch)
    return None


def supported_families_text() -> str:
    return ("; ".join(f"{f.name} ({', '.join(f.class_names)})" for f in FAMILIES)
            + f"; and {GENERIC_FAMILY}: any other DiT whose blocks sit in an nn.ModuleList named "
            + " / ".join(GENERIC_BLOCK_LISTS) + " and return its (B, S, C) image or video tokens")


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
    raise CaptureError(f"{type(model).__name__} is not a supported model family: tried its class hierarchy "
                       f"({', '.join(sorted(names))}) against the known families and looked for an nn.ModuleList of "
                       f"blocks named {' / '.join(GENERIC_BLOCK_LISTS)}; supported: {supported_families_text()}")


def grid_from_latents(family: ModelFamily, model: nn.Module, latents: torch.Tensor) -> TokenGrid:
    """Token grid implied by unpacked latents and the model's patch sizes (see ModelFamily.latent_grid)."""
    return family.latent_grid(model, latents)
