"""The regularizer a disabled config builds (`crepa_enabled` / `urepa_enabled` false): a no-op.

`CrepaRegularizer.from_config(cfg, ...)` with the flag off returns a `DisabledRegularizer`, so the
README's lines run unchanged in a run without the flag, instead of four conditionals around them:

    reg = CrepaRegularizer.from_config(cfg, transformer=transformer, vae=vae)   # flag off: no-op
    reg_loss, logs = reg(latents=clean_latents, step=global_step)               # 0.0, {}
    (diffusion_loss + reg_loss).backward()

It registers no hook, holds no parameter and no state (`state_dict()` is empty), touches neither the
model nor the VAE, and its call returns a float32 scalar 0 (no gradient: adding it changes nothing)
and empty logs. The working regularizer's other calls a trainer makes (`set_max_train_steps`,
`end_step`, `detach`) are there and do nothing. `enabled` is False on it and True on the working regularizers.
"""

from __future__ import annotations

import torch
from torch import nn

from .inputs import TEACHER_INPUTS
from .value_rules import Int


class DisabledRegularizer(nn.Module):
    """No hooks, no parameters, empty state; `reg(..., step=...)` -> (tensor(0.), {})."""

    enabled = False

    def __init__(self, config, regularizer: str) -> None:
        super().__init__()
        object.__setattr__(self, "config", config)   # kept out of state_dict (it is no tensor anyway)
        self.regularizer = regularizer

    def forward(self, latents: torch.Tensor | None = None, *, step: int, **inputs) -> tuple[torch.Tensor, dict]:
        """Any call the working regularizer takes; the loss is placed on the device of a given tensor
        input (a 0-d CPU tensor also adds to a CUDA loss)."""
        given = [latents, *(inputs.get(name) for name in TEACHER_INPUTS[1:])]
        device = next((t.device for t in given if isinstance(t, torch.Tensor)), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device), {}

    def set_max_train_steps(self, max_train_steps: int | None) -> None:
        """Checked as the working regularizer checks it (so a trainer's bad value fails with the flag
        off too); nothing uses it."""
        Int(0, nullable=True).coerce("max_train_steps", max_train_steps)

    def end_step(self) -> None:
        """No similarity EMA to update."""

    def detach(self) -> None:
        """Nothing to remove (no hooks were registered)."""

    def extra_repr(self) -> str:
        prefix = self.config.PREFIX
        return f"{self.regularizer} disabled ({prefix}_enabled is false): loss 0, no logs, no hooks"
