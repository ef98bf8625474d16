"""UrepaRegularizer on a tiny UNet2DConditionModel (docs/contract.md §2.2, §3-§7)."""

import pytest
import torch

import tiny_models as tm
from repa_kernels import urepa_loss
from repa_kernels.regularizer import UrepaConfig, UrepaRegularizer
from repa_kernels.regularizer.grids import resample_grid

BASE = {"urepa_enabled": True, "urepa_encoder_image_size": 16}
LOG_KEYS = {"urepa_loss", "urepa_alignment_loss", "urepa_manifold_loss", "urepa_similarity", "urepa_weight",
            "urepa_cutoff", "urepa_similarity_ema"}


def _latents(seed=0, shape=(2, 4, 4, 6)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reg(**keys):
    unet = tm.tiny_unet().train()
    reg = UrepaRegularizer.from_config({**BASE, **keys}, unet=unet, vae=tm.tiny_image_vae(), encoder=tm.tiny_dinov2(),
                                       max_train_steps=100, impl="reference")
    return reg, unet


def _grads(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_documented_usage_trains_the_projector_down_path_and_mid_block_only():
    reg, unet = _reg()
    assert not hasattr(unet, "urepa_projector") and reg.projector.in_features == 16
    latents = _latents()
    tm.tiny_forward(unet, latents)
    loss, logs = reg(latents=latents, step=0)
    loss.backward()
    assert _grads(reg.projector) and _grads(unet.mid_block) and _grads(unet.down_blocks[0])
    assert not any(_grads(block) for block in unet.up_blocks)        # beyond the mid-block: nothing
    assert set(logs) == LOG_KEYS
    for value in logs.values():
        assert value.dim() == 0 and not value.requires_grad
    expected = 0.5 * (logs["urepa_alignment_loss"] + 3.0 * logs["urepa_manifold_loss"])
    assert torch.allclose(logs["urepa_loss"], expected, atol=1e-6)
    assert torch.allclose(logs["urepa_alignment_loss"], -logs["urepa_similarity"], atol=1e-6)
    assert reg.frames_encoded == 2


def test_projected_tokens_are_upsampled_to_the_encoder_grid():
    reg, unet = _reg()
    latents = _latents()
    tm.tiny_forward(unet, latents)
    captured = reg.capture.consume()
    assert captured.grid == (1, 2, 3)                                  # mid-block at half the latent size
    tm.tiny_forward(unet, latents)
    loss, _ = reg(latents=latents, step=0)
    # recompute by hand: project (B, 6, C) -> (B, 1, 2, 3, D), upsample to the encoder grid, align
    pixels = reg._teacher.decoder.decode(latents)
    teacher = reg._teacher.from_pixels(pixels, 1)
    assert teacher.shape[2:4] == (3, 5)                               # 8x12 frames at ~16x16 area, patch 4
    z = reg.projector(captured.student.detach()).reshape(2, 1, 2, 3, -1)
    z = resample_grid(z, (3, 5))
    expected = urepa_loss(z.flatten(2, 3), teacher.flatten(2, 3), manifold_weight=3.0, impl="reference").loss
    assert torch.allclose(loss, 0.5 * expected, atol=1e-6)


def test_pixels_and_teacher_features_paths():
    reg, unet = _reg()
    latents = _latents()
    pixels = reg._teacher.decoder.decode(latents)[:, 0]
    features = reg._teacher.from_pixels(pixels, 1).flatten(2, 3)
    losses = []
    for inputs in ({"latents": latents}, {"pixels": pixels}, {"teacher_features": features}):
        tm.tiny_forward(unet, latents)
        losses.append(reg(**inputs, step=1)[0].detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6) and torch.allclose(losses[0], losses[2], atol=1e-6)


def test_manifold_weight_zero_leaves_the_alignment_term():
    reg, unet = _reg(urepa_manifold_weight=0.0)
    tm.tiny_forward(unet, _latents())
    loss, logs = reg(latents=_latents(), step=0)
    assert torch.allclose(logs["urepa_loss"], 0.5 * logs["urepa_alignment_loss"])


def test_cutoff_skips_and_state_dict_resumes():
    reg, unet = _reg(urepa_cutoff_step=2, urepa_similarity_ema_decay=0.5)
    for step in range(3):
        tm.tiny_forward(unet, _latents(step))
        loss, logs = reg(latents=_latents(step), step=step)
    assert reg.frames_encoded == 4 and logs["urepa_weight"] == 0 and logs["urepa_cutoff"] == 1
    loss.backward()
    assert torch.count_nonzero(reg.projector.linear.weight.grad) == 0
    resumed, unet2 = _reg(urepa_cutoff_step=2, urepa_similarity_ema_decay=0.5)
    unet2.load_state_dict(unet.state_dict())
    resumed.load_state_dict(reg.state_dict())          # the projector and the schedule with the regularizer
    assert resumed.schedule.ema == reg.schedule.ema
    assert torch.equal(resumed.projector.linear.weight, reg.projector.linear.weight)


def test_image_tiny_autoencoder():
    unet, tae = tm.tiny_unet().train(), tm.tiny_image_tae()
    reg = UrepaRegularizer.from_config({**BASE, "urepa_use_tae": True}, unet=unet, tae=tae, encoder=tm.tiny_dinov2(),
                                       impl="reference")
    tm.tiny_forward(unet, _latents())
    assert torch.isfinite(reg(latents=_latents(), step=0)[0])


def test_errors():
    with pytest.raises(ValueError, match="urepa_enabled is false: UrepaRegularizer.from_config"):
        UrepaRegularizer(UrepaConfig.from_dict({"urepa_enabled": False}), unet=tm.tiny_unet())
    with pytest.raises(ValueError, match="CrepaRegularizer"):
        UrepaRegularizer.from_config(BASE, unet=tm.tiny_wan(), encoder=tm.tiny_dinov2())
    with pytest.raises(TypeError, match="UrepaConfig"):
        UrepaRegularizer(BASE, unet=tm.tiny_unet())
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        UrepaRegularizer.from_config({**BASE, "urepa_use_tae": True}, unet=tm.tiny_unet(), encoder=tm.tiny_dinov2())
    reg, unet = _reg()
    with pytest.raises(ValueError, match="exactly one of"):
        reg(step=0)
    tm.tiny_forward(unet, _latents())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        reg(latents=_latents(shape=(2, 4, 1, 4, 6)), step=0)
    assert isinstance(reg.config, UrepaConfig)
