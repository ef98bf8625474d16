"""The regularizer's own ops under CPU autocast: projector (both kinds), resampling to the teacher grid,
pooling and the spatial normalisation accumulate in float32, so a bf16-autocast training step gives the
loss and projector gradient of the same step without autocast (the model's bf16 activations aside: the
captured states are fed in float32 here, so only the regularizer's own arithmetic is under test)."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer, UrepaRegularizer

BASE = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(build, forward, features, autocast: bool):
    reg, model = build()
    captured = forward(model)                    # the model runs outside autocast: its states are float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, logs = reg(teacher_features=features, step=0)
    loss.backward()
    grads = [p.grad.clone() for p in reg.parameters()]
    reg.detach()
    return loss.detach(), grads, captured


@pytest.mark.parametrize("keys, features", [
    ({}, randn(2, 3, 15, 16, seed=1)),                                    # resampled 3x5 -> 2x3 grid
    ({"crepa_spatial_align": False}, randn(2, 3, 15, 16, seed=1)),        # pooled
    ({"irepa_enabled": True}, randn(2, 3, 15, 16, seed=1)),               # conv projector, spatial norm
], ids=["spatial", "pooled", "irepa"])
def test_crepa_under_cpu_bf16_autocast_matches_float32(keys, features):
    def build():
        model = tm.tiny_wan().train()
        reg = CrepaRegularizer.from_config({**BASE, **keys}, transformer=model, encoder=tm.tiny_dinov2(),
                                           impl="reference")
        return reg, model

    torch.manual_seed(0)
    plain = run(build, lambda m: tm.tiny_forward(m, randn(2, 4, 3, 4, 6)), features, autocast=False)
    torch.manual_seed(0)
    mixed = run(build, lambda m: tm.tiny_forward(m, randn(2, 4, 3, 4, 6)), features, autocast=True)
    assert mixed[0].dtype == torch.float32
    torch.testing.assert_close(mixed[0], plain[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(mixed[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_urepa_under_cpu_bf16_autocast_matches_float32():
    def build():
        unet = tm.tiny_unet().train()
        return UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_encoder_image_size": 16}, unet=unet,
                                            encoder=tm.tiny_dinov2(), impl="reference"), unet

    features = randn(2, 64, 16, seed=2)                  # 8 x 8 teacher grid: the 4 x 4 mid-block is upsampled
    torch.manual_seed(0)
    plain = run(build, lambda m: tm.tiny_forward(m, randn(2, 4, 8, 8)), features, autocast=False)
    torch.manual_seed(0)
    mixed = run(build, lambda m: tm.tiny_forward(m, randn(2, 4, 8, 8)), features, autocast=True)
    torch.testing.assert_close(mixed[0], plain[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(mixed[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
