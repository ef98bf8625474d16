"""One regularizer call's inputs are checked once, before the costly work (regularizer/inputs.py), and the
teacher is decided once, when the regularizer is built (regularizer/teacher.py)."""

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer, UrepaRegularizer
from repa_kernels.regularizer.grids import TokenGrid
from repa_kernels.regularizer.inputs import CallInputs
from repa_kernels.regularizer.teacher import BackboneTeacher, EncoderTeacher

BASE = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16}


def _latents(batch=2, seed=0):
    return torch.randn(batch, 4, 3, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_inputs_are_laid_out_once():
    inputs = CallInputs.check(pixels=torch.rand(2, 3, 8, 8), token_grid=[1, 2, 2])
    assert inputs.pixels.shape == (2, 1, 3, 8, 8) and inputs.token_grid == TokenGrid(1, 2, 2)
    assert inputs.teacher_input == "pixels" and inputs.teacher_batch == 2
    inputs = CallInputs.check(teacher_features=torch.rand(3, 5, 7))
    assert inputs.teacher_features.shape == (3, 1, 5, 7) and inputs.teacher_batch == 3
    backbone = CallInputs.check(latents=_latents(), backbone_block=2)
    assert backbone.teacher_input is None and backbone.teacher_batch is None   # latents only check the grid
    with pytest.raises(ValueError, match="block 2; do not pass pixels or teacher_features"):
        CallInputs.check(pixels=torch.rand(2, 3, 8, 8), backbone_block=2)


def test_a_batch_mismatch_is_refused_before_the_vae_decodes():
    transformer, vae = tm.tiny_wan().train(), tm.tiny_wan_vae()
    reg = CrepaRegularizer.from_config(BASE, transformer=transformer, vae=vae, encoder=tm.tiny_dinov2(),
                                       max_train_steps=1000, impl="reference")
    decodes = []
    vae.decoder.register_forward_hook(lambda *a: decodes.append(1))
    tm.tiny_forward(transformer, _latents())
    with pytest.raises(ValueError, match="batch size 1 but the captured hidden states have 2"):
        reg(latents=_latents(batch=1), step=0)
    assert decodes == [] and reg.frames_decoded == 0 and reg.frames_encoded == 0


def test_a_bad_input_leaves_nothing_captured():
    transformer = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config(BASE, transformer=transformer, vae=tm.tiny_wan_vae(),
                                       encoder=tm.tiny_dinov2(), max_train_steps=1000, impl="reference")
    tm.tiny_forward(transformer, _latents())
    with pytest.raises(ValueError, match="pixels must be"):
        reg(pixels=torch.rand(2, 5, 4, 16, 24), step=0)
    assert not reg.capture.has_capture


def test_the_teacher_is_decided_when_the_regularizer_is_built():
    encoder_reg = CrepaRegularizer.from_config(BASE, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2())
    assert isinstance(encoder_reg.teacher, EncoderTeacher) and encoder_reg.teacher.width == 16
    backbone_reg = CrepaRegularizer.from_config({**BASE, "crepa_use_backbone_features": True,
                                                 "crepa_teacher_block_index": 2}, transformer=tm.tiny_wan())
    assert isinstance(backbone_reg.teacher, BackboneTeacher) and backbone_reg.teacher.block_index == 2
    assert backbone_reg.teacher_description == "backbone block 2"
    urepa = UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_encoder_image_size": 16}, unet=tm.tiny_unet(),
                                         encoder=tm.tiny_dinov2())
    assert isinstance(urepa.teacher, EncoderTeacher) and urepa.teacher.features.cls_tokens is False
