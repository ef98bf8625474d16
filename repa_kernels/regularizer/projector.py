"""The trainable projector from the denoiser's hidden size to the teacher's width (docs/contract.md §7).

Its home is the regularizer, not the model: `reg.parameters()` go to the optimizer and `reg.state_dict()`
saves it (with the schedule state). Its gradients are averaged across data-parallel ranks by the projector
itself (each parameter passes through an identity whose backward all_reduces its gradient, one all_reduce
each), as DDP averages the model's: nothing to wrap, whatever wraps the model (DDP, FSDP2 with a bf16
model, DeepSpeed), and wrapping it anyway only averages equal values again. The identity is applied in
the forward to the parameter the forward uses, not hooked on the parameter at construction: FSDP2's
`fully_shard(reg)` replaces the parameters (measured before this: its hooks never fired, so under context
parallelism the gradient lacked the context-size factor and came out at 1/P). Under gradient
accumulation each micro-batch's share is averaged as it arrives (a mean is linear, so the accumulated
gradient is the same; a few MB per micro-batch). Nothing is added to the model, so the model's state
dict, `save_pretrained`, `from_pretrained` + strict `load_state_dict` (diffusers' resume hooks) and
PEFT LoRA exports (which
diffusers refuses when a non-LoRA module is in them) see the model exactly as it was; a trainer's
`model.requires_grad_(False)`, PEFT's `add_adapter` freezing and `model.to(bf16)` cannot reach it.

It stays float32 by construction: a conversion to another dtype (`.to(torch.bfloat16)`, `.half()`)
raises instead of happening, since AdamW on bf16 weights is not what the float32 contract promises.
Older state dicts load too: this package's earlier layout on the model (`crepa_projector.norm.*`,
`.linear.*`) and SimpleTuner's `nn.Sequential(LayerNorm, Linear)` (`crepa_projector.0.*`, `.1.*`).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .ranks import mean_across_ranks

class _SynchronisedGradient(torch.autograd.Function):
    """Identity on a parameter in the forward; in the backward, the gradient's mean over all ranks times
    `factor` (the context-group size; 1 without context parallelism). Applied to the parameter the forward
    actually uses, so it holds whatever a wrapper put there: FSDP2's `fully_shard` swaps in new (unsharded)
    parameters, which hooks registered on the originals at construction would never see."""

    @staticmethod
    def forward(ctx, parameter: torch.Tensor, factor: int) -> torch.Tensor:
        ctx.factor = factor
        return parameter.view_as(parameter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = mean_across_ranks(grad)
        return (grad if ctx.factor == 1 else grad * ctx.factor), None


# SimpleTuner's nn.Sequential(LayerNorm, Linear) keys -> ours
_SEQUENTIAL_LAYOUT = {"0.": "norm.", "1.": "linear."}


class _Float32Projector(nn.Module):
    """What both projectors share: float32 parameters that stay float32, autocast off in the forward, and
    gradients averaged across ranks as they arrive."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    def _finish_init(self) -> None:
        self._context_ranks = 1

    def set_context_ranks(self, ranks: int) -> None:
        """Under context parallelism each of the `ranks` ranks of a context group holds a partial gradient
        (its tokens' share): the right gradient is their sum averaged over the data ranks, which is the
        mean over all ranks times `ranks` (world = data x context). 1 turns it off."""
        self._context_ranks = int(ranks)

    def _synchronised(self, *parameters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parameters as this forward uses them, each gradient averaged across ranks (and scaled under
        context parallelism) before it accumulates; as they are when there is nothing to do (one process,
        no gradient)."""
        alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
        if not torch.is_grad_enabled() or (alone and self._context_ranks == 1):
            return parameters
        return tuple(_SynchronisedGradient.apply(p, self._context_ranks) if p.requires_grad else p for p in parameters)

    def _apply(self, fn, recurse=True):
        # `fn` is what .to() / .half() / .cuda() apply to every tensor: try it on an empty float32 probe
        # first, so a dtype conversion is refused before any parameter changes.
        probe = fn(torch.empty(0, dtype=torch.float32, device=next(self.parameters()).device))
        if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
            raise TypeError(f"the alignment projector stays float32 (it computes in float32 whatever the model's "
                            f"dtype, and its optimizer must update float32 weights); it was asked to become "
                            f"{probe.dtype}. Move it with .to(device) only, and cast the model, not the regularizer")
        return super()._apply(fn, recurse)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"projector expects width {self.in_features}, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype=float32"


class AlignmentProjector(_Float32Projector):
    """LayerNorm(C) + Linear(C, D), computed in float32 with autocast disabled.

    x: (..., C) of any float dtype -> (..., D) float32. Parameters are float32 and stay so: a dtype
    conversion raises (device moves are fine). A state dict in SimpleTuner's `0.*` / `1.*` layout loads.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.norm = nn.LayerNorm(in_features, dtype=torch.float32)
        self.linear = nn.Linear(in_features, out_features, dtype=torch.float32)
        self._register_load_state_dict_pre_hook(_accept_sequential_layout, with_module=True)
        self._finish_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            norm_weight, norm_bias, weight, bias = (p.float() for p in self._synchronised(
                self.norm.weight, self.norm.bias, self.linear.weight, self.linear.bias))
            x = F.layer_norm(x.float(), (self.in_features,), norm_weight, norm_bias, self.norm.eps)
            return F.linear(x, weight, bias)


class ConvAlignmentProjector(_Float32Projector):
    """iREPA's projector: a k x k Conv2d(C, D) over each frame's token grid, in float32, autocast off.

    x: (B, T, H, W, C) of any float dtype -> (B, T, H, W, D) float32. Frames are convolved independently
    (no temporal mixing: CREPA's neighbour terms stay the only cross-frame coupling); padding k // 2 keeps
    the grid, rectangular or not. Costs k*k times the Linear's FLOPs."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int) -> None:
        super().__init__(in_features, out_features)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (the grid keeps its size with padding k // 2), "
                             f"got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=kernel_size // 2, dtype=torch.float32)
        self._finish_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_width(x)
        if x.dim() != 5:
            raise ValueError(f"the convolutional projector takes tokens on their grid (B, T, H, W, C), got shape "
                             f"{tuple(x.shape)}")
        b, t, h, w, c = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            frames = x.float().reshape(b * t, h, w, c).permute(0, 3, 1, 2)
            weight, bias = (p.float() for p in self._synchronised(self.conv.weight, self.conv.bias))
            out = F.conv2d(frames, weight, bias, padding=self.kernel_size // 2)
        return out.permute(0, 2, 3, 1).reshape(b, t, h, w, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}"


def build_projector(in_features: int, out_features: int, conv_kernel_size: int | None) -> _Float32Projector:
    """LayerNorm + Linear, or iREPA's convolution when `conv_kernel_size` is given."""
    if conv_kernel_size is None:
        return AlignmentProjector(in_features, out_features)
    return ConvAlignmentProjector(in_features, out_features, conv_kernel_size)


def _accept_sequential_layout(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: rename SimpleTuner's `<prefix>0.*` / `<prefix>1.*` keys to ours in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for theirs, ours in _SEQUENTIAL_LAYOUT.items():
            if rest.startswith(theirs):
                state_dict[prefix + ours + rest[len(theirs):]] = state_dict.pop(key)


def projector_entries(state_dict: Mapping[str, torch.Tensor], legacy_name: str) -> dict[str, torch.Tensor]:
    """The projector's tensors out of a state dict that holds them under `legacy_name.` (a model state dict
    saved by this package before the projector moved to the regularizer, or a SimpleTuner checkpoint), or
    as the regularizer's own `projector.` keys, or bare (`norm.weight`, `0.weight`, ...). Keys are returned
    without that prefix; an empty dict when the state dict has none of these."""
    def projector_key(rest: str) -> bool:
        return rest.split(".", 1)[0] in ("norm", "linear", "conv", "0", "1")

    for prefix in (f"{legacy_name}.", "projector."):
        found = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and projector_key(k[len(prefix):])}
        if found:
            return found
    return dict(state_dict) if state_dict and all(projector_key(k) for k in state_dict) else {}
