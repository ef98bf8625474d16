"""The trainable projector from the denoiser's hidden size to the teacher's width (SPEC §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentProjector(nn.Module):
    """LayerNorm(C) + Linear(C, D), computed in float32 with autocast disabled.

    x: (..., C) of any float dtype -> (..., D) float32. Parameters are created in float32; if a later
    `.to(dtype)` casts them, the forward still computes in float32 (autograd casts the gradients back).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.norm = nn.LayerNorm(in_features, dtype=torch.float32)
        self.linear = nn.Linear(in_features, out_features, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"projector expects width {self.in_features}, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), (self.in_features,), self.norm.weight.float(), self.norm.bias.float(),
                             self.norm.eps)
            return F.linear(x, self.linear.weight.float(), self.linear.bias.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype=float32"


def attach_projector(models: list[nn.Module], in_features: int, out_features: int,
                     name: str) -> AlignmentProjector:
    """The projector registered on every model as attribute `name` (crepa_projector / urepa_projector), so
    the models' parameters(), state_dict() and PEFT `modules_to_save` include it.

    A projector of the right shape already registered there (a regularizer built again on the same model)
    is reused, so its trained weights carry over; anything else under that name is an error.
    """
    projector = None
    for model in models:
        existing = getattr(model, name, None)
        if existing is None:
            continue
        if not (isinstance(existing, AlignmentProjector) and existing.in_features == in_features
                and existing.out_features == out_features) or (projector is not None and existing is not projector):
            raise ValueError(f"{type(model).__name__} already has an attribute {name!r} ({existing!r}) that is not a "
                             f"projector {in_features} -> {out_features} shared by all models; remove it "
                             f"(delattr(model, {name!r})) before building the regularizer")
        projector = existing
    if projector is None:
        projector = AlignmentProjector(in_features, out_features)
    for model in models:
        model.add_module(name, projector)
    return projector
