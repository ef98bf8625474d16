"""iREPA: the convolutional projector over the token grid and the spatially normalised teacher, on CREPA
(tiny Wan, rectangular 2 x 3 grid), REPA (tiny SD3) and U-REPA (tiny UNet), and every config error."""

from __future__ import annotations

import argparse

import pytest
import torch

import tiny_models as tm
from backend_params import impl_param
from repa_kernels.regularizer import CrepaConfig, CrepaRegularizer, UrepaConfig, UrepaRegularizer
from repa_kernels.regularizer.config import add_argparse_args
from repa_kernels.regularizer.grids import spatially_normalize
from repa_kernels.regularizer.projector import ConvAlignmentProjector

CREPA = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16, "irepa_enabled": True}
UREPA = {"urepa_enabled": True, "urepa_encoder_image_size": 16, "irepa_enabled": True}


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def spatial_norm_float64(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """The formula written out in float64: per (b, t, d), over the h * w tokens of the frame."""
    b, t, h, w, d = y.shape
    x = y.double().reshape(b, t, h * w, d)
    n = h * w
    mean = x.sum(dim=2, keepdim=True) / n
    std = (((x - mean) ** 2).sum(dim=2, keepdim=True) / (n - 1)).sqrt()
    return ((x - alpha * mean) / (std + 1e-6)).reshape(b, t, h, w, d)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 8), (1, 1, 3, 7, 33)])
def test_spatial_normalisation_matches_the_float64_formula(alpha, shape):
    y = randn(*shape) * 3 + 2
    got = spatially_normalize(y, alpha)
    assert got.dtype == torch.float32 and got.shape == y.shape
    torch.testing.assert_close(got.double(), spatial_norm_float64(y, alpha), rtol=2e-6, atol=2e-6)
    if alpha == 1.0:
        assert got.mean(dim=(2, 3)).abs().max() < 1e-5      # the spatial mean is gone


def test_spatial_normalisation_needs_two_tokens_and_a_grid():
    with pytest.raises(ValueError, match="at least 2 teacher tokens per frame"):
        spatially_normalize(randn(1, 2, 1, 1, 4), 0.6)
    with pytest.raises(ValueError, match=r"\(B, T, h, w, D\)"):
        spatially_normalize(randn(2, 6, 4), 0.6)


def _wan_call(impl, seed=0):
    model = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config(CREPA, transformer=model, encoder=tm.tiny_dinov2(), impl=impl)
    tm.tiny_forward(model, randn(2, 4, 3, 4, 6, seed=seed))
    loss, logs = reg(teacher_features=randn(2, 3, 15, 16, seed=seed + 1), step=0)
    loss.backward()
    return reg, model, loss, logs


@pytest.mark.parametrize("impl", [impl_param("cpp"), impl_param("triton")])
def test_crepa_on_a_rectangular_video_grid_agrees_across_backends(impl):
    ref, ref_model, ref_loss, _ = _wan_call("reference")
    assert isinstance(ref.projector, ConvAlignmentProjector) and ref.projector.kernel_size == 3
    assert ref.projector.conv.weight.grad.abs().sum() > 0
    reg, model, loss, _ = _wan_call(impl)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg.projector.conv.weight.grad, ref.projector.conv.weight.grad, rtol=1e-4, atol=1e-6)


def test_the_teacher_is_normalised_before_the_loss():
    """The loss with iREPA on equals CREPA's loss on spatially normalised teacher features, with the same
    (convolutional) projector: only the teacher side changes."""
    reg, model, loss, logs = _wan_call("reference")
    features = randn(2, 3, 15, 16, seed=1)
    normalised = spatial_norm_float64(features.reshape(2, 3, 3, 5, 16), 0.6).float().reshape(2, 3, 15, 16)
    reg.detach()
    plain = CrepaRegularizer.from_config({**CREPA, "irepa_spatial_norm_alpha": 0.0}, transformer=model,
                                         encoder=tm.tiny_dinov2(), impl="reference")
    plain.projector.load_state_dict(reg.projector.state_dict())
    # alpha 0 still divides by the std: undo it by feeding features whose per-frame std is 1 already
    tm.tiny_forward(model, randn(2, 4, 3, 4, 6, seed=0))
    again, again_logs = plain(teacher_features=normalised, step=0)
    torch.testing.assert_close(again_logs["crepa_alignment_score"], logs["crepa_alignment_score"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_repa_on_sd3_and_urepa_on_a_unet_train_and_restore_the_conv_projector():
    sd3 = tm.tiny_sd3().train()
    reg = CrepaRegularizer.from_config({**CREPA, "irepa_projector_kernel_size": 5}, transformer=sd3,
                                       encoder=tm.tiny_dinov2())
    tm.tiny_forward(sd3, randn(2, 4, 8, 12))                          # a 4 x 6 token grid
    loss, logs = reg(teacher_features=randn(2, 24, 16, seed=3), step=0)
    loss.backward()
    assert torch.isfinite(loss) and reg.projector.conv.weight.grad.abs().sum() > 0
    assert reg.projector.conv.weight.shape[-2:] == (5, 5)

    unet = tm.tiny_unet().train()
    ureg = UrepaRegularizer.from_config(UREPA, unet=unet, encoder=tm.tiny_dinov2())
    tm.tiny_forward(unet, randn(2, 4, 8, 8))
    loss, logs = ureg(teacher_features=randn(2, 16, 16, seed=4), step=0)
    loss.backward()
    assert torch.isfinite(loss) and ureg.projector.conv.weight.grad.abs().sum() > 0
    state = ureg.state_dict()
    assert {"projector.conv.weight", "projector.conv.bias", "_extra_state"} == set(state)
    fresh = UrepaRegularizer.from_config(UREPA, unet=tm.tiny_unet(), encoder=tm.tiny_dinov2())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.projector.conv.weight, ureg.projector.conv.weight)
    with pytest.raises(TypeError, match="projector stays float32"):
        fresh.to(torch.bfloat16)


@pytest.mark.parametrize("keys, message", [
    ({"irepa_enabled": True}, "neither crepa_enabled nor urepa_enabled is true"),
    ({**CREPA, "crepa_encoder_tokens": "cls"}, "irepa_enabled=true with crepa_encoder_tokens='cls'"),
    ({**CREPA, "crepa_spatial_align": False}, "irepa_enabled=true with crepa_spatial_align=false"),
    ({**CREPA, "irepa_projector_kernel_size": 4}, "irepa_projector_kernel_size must be odd"),
    ({**CREPA, "irepa_projector_kernel_size": 0}, "irepa_projector_kernel_size"),
    ({**CREPA, "irepa_spatial_norm_alpha": 1.5}, "irepa_spatial_norm_alpha must be .*<= 1"),
    ({**CREPA, "irepa_spatial_norm_alpha": -0.1}, "irepa_spatial_norm_alpha must be .*>= 0"),
])
def test_config_errors(keys, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CrepaConfig.from_dict(keys)


def test_the_keys_ride_on_either_regularizer_and_argparse_registers_them_once():
    assert UrepaConfig.from_dict(UREPA).irepa_enabled and CrepaConfig.from_dict(CREPA).irepa_enabled
    assert not CrepaConfig.from_dict({"crepa_enabled": True}).irepa_enabled
    parser = add_argparse_args(argparse.ArgumentParser())        # both groups: no duplicate option error
    args = parser.parse_args(["--urepa_enabled", "--irepa_enabled", "--irepa_spatial_norm_alpha", "1.0"])
    assert UrepaConfig.from_args(args).irepa_spatial_norm_alpha == 1.0 and UrepaConfig.from_args(args).irepa_enabled
    assert not CrepaConfig.from_args(args).irepa_enabled             # CREPA is off: iREPA rides on U-REPA
    with pytest.raises(ValueError, match="neither crepa_enabled nor urepa_enabled"):
        UrepaConfig.from_args(parser.parse_args(["--irepa_enabled"]))
