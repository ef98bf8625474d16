"""Clean latents from a flow-matching trainer's noisy latents and target, for trainers that keep x0 private.

Some trainers hand their loss only `(pred, target, sigmas)` and the noisy input, never the clean latents
the regularizer decodes. Under the flow-matching convention of diffusers' FlowMatchEulerDiscreteScheduler
trainers (SD3, Flux, Wan, LTX, SimpleTuner):

    x_t    = (1 − σ)·x0 + σ·noise
    target = noise − x0
    x0     = x_t − σ·target          (exact: (1 − σ)·x0 + σ·noise − σ·noise + σ·x0)

The subtraction runs in float32 (bf16 latents lose about 3 significant digits to the cancellation
otherwise). Other parameterisations (epsilon, v-prediction) need their own formula; the other way out is
backbone mode (`crepa_use_backbone_features`), which needs no teacher input at all.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["clean_latents_from_flow_target"]


def _sigmas_for(sigmas, noisy: torch.Tensor) -> torch.Tensor:
    """A float, a (B,) tensor or a tensor broadcastable per sample ((B, 1, 1, 1), ...) -> (B, 1, ..., 1)."""
    if isinstance(sigmas, numbers.Real) and not isinstance(sigmas, bool):
        return torch.tensor(float(sigmas), dtype=torch.float32, device=noisy.device)
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point():
        raise TypeError(f"sigmas must be a float or a floating-point tensor of one sigma per sample, got "
                        f"{sigmas.dtype if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__}")
    batch = noisy.shape[0]
    per_sample = sigmas.numel() == batch and (sigmas.dim() <= 1 or
                                              (sigmas.dim() == noisy.dim() and sigmas.shape[0] == batch))
    if not (sigmas.numel() == 1 or per_sample):
        raise ValueError(f"sigmas must hold one sigma per sample ((B,) or (B, 1, ..., 1) with B={batch}) or one "
                         f"for the batch, got shape {tuple(sigmas.shape)} for noisy latents {tuple(noisy.shape)}")
    return sigmas.to(device=noisy.device, dtype=torch.float32).reshape((-1,) + (1,) * (noisy.dim() - 1))


def clean_latents_from_flow_target(noisy: torch.Tensor, sigmas, target: torch.Tensor) -> torch.Tensor:
    """x0 = x_t − σ·target for flow matching (target = noise − x0), as float32 and detached.

    noisy: the latents the model saw, x_t (B, C, [F,] H, W); sigmas: σ of each sample, a float, (B,) or
    (B, 1, ..., 1); target: the flow-matching target noise − x0, of the shape of `noisy`. Returns the clean
    latents (float32, no gradient) to pass as `reg(latents=...)`.
    """
    for name, value in (("noisy", noisy), ("target", target)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point latent tensor, got "
                            f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    if noisy.shape != target.shape:
        raise ValueError(f"noisy and target must have one shape (target = noise − x0 of the same latents), got "
                         f"{tuple(noisy.shape)} and {tuple(target.shape)}")
    sigma = _sigmas_for(sigmas, noisy)
    with torch.no_grad():
        return noisy.float() - sigma * target.to(noisy.device).float()
