"""Reliability of the regularizer facade.

- Bad input matrix for `CrepaRegularizer` / `UrepaRegularizer` and their configs: block index out of
  range, unknown keys, wrong value types and ranges, unsupported model families, bad constructor
  arguments, bad call arguments (step, latents, pixels, teacher_features, token_grid). Each is an error
  naming what is wrong, or a documented result.
- Non-finite inputs: NaN/Inf propagate to the loss (documented) and are kept out of the similarity EMA;
  the opt-in `check_finite=True` raises FloatingPointError naming the tensor and the step.
- Gradient checkpointing: non-reentrant gives the same loss and gradients as none; reentrant is refused
  where it would hide the gradient (DiT blocks) and harmless where it does not (UNet mid-block).
- Memory hygiene: after `reg(...)` and backward nothing captured (hidden states, projector output,
  teacher tokens, decoded frames) stays alive; a call that raises leaves nothing captured either;
  `detach()` restores the model's forward and gradients exactly.
- A regularizer attached to a `torch.compile`d tiny transformer gives the eager loss and gradients.

The checks that tests/test_crepa_regularizer.py, test_capture.py and test_config.py already make are
not repeated here.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import re
import weakref

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import tiny_models as tm
from repa_kernels.regularizer import CaptureError, CrepaConfig, CrepaRegularizer, UrepaRegularizer
from repa_kernels.regularizer.config import UnsupportedFeatureError

CREPA = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16}
BACKBONE = {**CREPA, "crepa_use_backbone_features": True, "crepa_teacher_block_index": 2}
UREPA = {"urepa_enabled": True, "urepa_encoder_image_size": 16}
SUPPORTED = "supported: wan (WanTransformer3DModel); ltx_video (LTXVideoTransformer3DModel)"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def latents(batch=2, seed=0):
    return randn(batch, 4, 3, 4, 6, seed=seed)   # tiny Wan: token grid (3, 2, 3), 18 tokens


def features(batch=2, seed=1):
    return randn(batch, 3, 15, 16, seed=seed)    # tiny DINOv2 (width 16) on a 3 x 5 patch grid per frame


def crepa(keys=None, transformer=None, vae=True, **kwargs):
    transformer = transformer if transformer is not None else tm.tiny_wan().train()
    kwargs.setdefault("encoder", None if (keys or {}).get("crepa_use_backbone_features") else tm.tiny_dinov2())
    vae_model = tm.tiny_wan_vae() if vae is True else vae
    reg = CrepaRegularizer.from_config({**CREPA, **(keys or {})}, transformer=transformer, vae=vae_model,
                                       max_train_steps=100, **kwargs)
    return reg, transformer


# ---- bad inputs when building --------------------------------------------------------------------
# (id, builder, error, substrings)

def _build_crepa(keys, transformer=tm.tiny_wan, **kwargs):
    return lambda: CrepaRegularizer.from_config({**CREPA, **keys}, transformer=transformer(), encoder=tm.tiny_dinov2(),
                                                max_train_steps=100, **kwargs)


def _build_urepa(keys, unet=tm.tiny_unet, **kwargs):
    return lambda: UrepaRegularizer.from_config({**UREPA, **keys}, unet=unet(), encoder=tm.tiny_dinov2(),
                                                max_train_steps=100, **kwargs)


BAD_BUILDS = [
    ("block_index_past_the_end", _build_crepa({"crepa_block_index": 3}), CaptureError,
     ["crepa_block_index=3", "WanTransformer3DModel", "3 blocks", "valid indices 0..2", "hidden states not returned"]),
    ("block_index_far_past_the_end_flux", _build_crepa({"crepa_block_index": 100}, tm.tiny_flux), CaptureError,
     ["crepa_block_index=100", "FluxTransformer2DModel", "2 transformer_blocks + 2 single_transformer_blocks",
      "hidden states not returned"]),
    ("block_index_negative", _build_crepa({"crepa_block_index": -1}), ValueError,
     ["crepa_block_index must be an integer >= 0, got -1"]),
    ("teacher_block_past_the_end", _build_crepa({**BACKBONE, "crepa_teacher_block_index": 4}, tm.tiny_flux), CaptureError,
     ["crepa_teacher_block_index=4", "hidden states not returned"]),
    ("unknown_crepa_key", _build_crepa({"crepa_lamda": 0.3}), ValueError,
     ["unknown CrepaConfig key 'crepa_lamda'", "did you mean 'crepa_lambda'"]),
    ("unknown_urepa_key", _build_urepa({"urepa_manifold_wieght": 1.0}), ValueError,
     ["'urepa_manifold_wieght'", "did you mean 'urepa_manifold_weight'"]),
    ("hyphenated_crepa_key", _build_crepa({"crepa-lambda": 0.05}), ValueError,
     ["unknown CrepaConfig key 'crepa-lambda'", "did you mean 'crepa_lambda'"]),
    ("capitalised_urepa_key", _build_urepa({"URepa_Lambda": 0.05}), ValueError,
     ["unknown UrepaConfig key 'URepa_Lambda'", "did you mean 'urepa_lambda'"]),
    ("threshold_negative", _build_crepa({"crepa_similarity_threshold": -0.5}), ValueError,
     ["crepa_similarity_threshold=-0.5", "(0, 1.73576]", "crepa_loss is −λ·score"]),
    ("threshold_zero_urepa", _build_urepa({"urepa_similarity_threshold": 0}), ValueError,
     ["urepa_similarity_threshold=0", "(0, 1]"]),
    ("lambda_str", _build_crepa({"crepa_lambda": "abc"}), TypeError, ["crepa_lambda", "'abc'", ">= 0"]),
    ("lambda_negative_urepa", _build_urepa({"urepa_lambda": -1}), ValueError, ["urepa_lambda", "-1"]),
    ("block_index_float", _build_crepa({"crepa_block_index": 1.5}), TypeError, ["crepa_block_index", "1.5"]),
    ("enabled_str", _build_crepa({"crepa_enabled": "maybe"}), TypeError, ["crepa_enabled", "'maybe'", "bool"]),
    ("tau_zero", _build_crepa({"crepa_adjacent_tau": 0}), ValueError, ["crepa_adjacent_tau", "> 0", "got 0"]),
    ("distance_negative", _build_crepa({"crepa_adjacent_distance": -1}), ValueError, ["crepa_adjacent_distance", "-1"]),
    ("scheduler_unknown", _build_crepa({"crepa_scheduler": "exp"}), ValueError, ["crepa_scheduler", "'cosine'", "'exp'"]),
    ("threshold_mode_unknown", _build_crepa({"crepa_threshold_mode": "sometimes"}), ValueError,
     ["crepa_threshold_mode", "'recoverable'", "'sometimes'"]),
    ("encoder_dtype_unknown", _build_crepa({"crepa_encoder_dtype": "int8"}), ValueError,
     ["crepa_encoder_dtype", "'bfloat16'", "'int8'"]),
    ("unimplemented_feature_on", _build_crepa({"crepa_feature_source": "self_flow"}), UnsupportedFeatureError,
     ["Self-Flow", "does not implement"]),
    ("family_plain_module", _build_crepa({}, lambda: nn.Linear(3, 3)), CaptureError,
     ["Linear is not a supported model family", SUPPORTED]),
    ("family_transformers_model", _build_crepa({}, tm.tiny_dinov2), CaptureError,
     ["Dinov2Model is not a supported model family", SUPPORTED]),
    ("family_vae", _build_crepa({}, tm.tiny_image_vae), CaptureError, ["AutoencoderKL is not a supported model family"]),
    ("family_unet_for_crepa", _build_crepa({}, tm.tiny_unet), ValueError, ["is a UNet: use UrepaRegularizer"]),
    ("family_dit_for_urepa", _build_urepa({}, tm.tiny_wan), ValueError, ["is not a UNet", "use CrepaRegularizer"]),
    ("family_plain_module_urepa", _build_urepa({}, lambda: nn.Conv2d(3, 3, 1)), CaptureError,
     ["Conv2d is not a supported model family"]),
    ("transformer_none", _build_crepa({}, lambda: None), TypeError, ["transformer must be a diffusers model"]),
    ("transformer_empty_list", _build_crepa({}, lambda: []), TypeError, ["transformer must be a diffusers model"]),
    ("max_train_steps_str",
     lambda: CrepaRegularizer.from_config(CREPA, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2(), max_train_steps="x"),
     TypeError, ["max_train_steps", "'x'"]),
    ("max_train_steps_negative",
     lambda: CrepaRegularizer.from_config(CREPA, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2(), max_train_steps=-5),
     ValueError, ["max_train_steps", "-5"]),
    ("config_wrong_type", lambda: CrepaRegularizer.from_config([1], transformer=tm.tiny_wan()), TypeError,
     ["cfg must be a CrepaConfig, a dict or a path to a JSON file, got list"]),
    ("config_disabled_in_the_constructor",
     lambda: CrepaRegularizer(CrepaConfig.from_dict({**CREPA, "crepa_enabled": False}), transformer=tm.tiny_wan()),
     ValueError, ["crepa_enabled is false", "from_config(...) gives a no-op regularizer"]),
    ("config_disabled_misspelled_argument",
     lambda: CrepaRegularizer.from_config({**CREPA, "crepa_enabled": False}, transformer=tm.tiny_wan(), vea=None),
     TypeError, ["CrepaRegularizer.from_config", "vea"]),
    ("encoder_missing_offline", lambda: CrepaRegularizer.from_config(CREPA, transformer=tm.tiny_wan(),
                                                                     encoder="/nonexistent/dinov2"), Exception,
     ["/nonexistent/dinov2", "does not exist"]),
]


@pytest.mark.parametrize("case_id, build, error, fragments", BAD_BUILDS, ids=[c[0] for c in BAD_BUILDS])
def test_bad_builds_raise_a_named_error(case_id, build, error, fragments):
    with pytest.raises(error) as info:
        build()
    for fragment in fragments:
        assert fragment in str(info.value), f"{case_id}: {fragment!r} missing from: {info.value}"


def test_a_failed_build_leaves_no_hook_behind():
    model = tm.tiny_wan()
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(Exception):
        CrepaRegularizer.from_config(CREPA, transformer=model, encoder="/nonexistent/dinov2")
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(impl="gpu"), ValueError, "impl='gpu' is not valid"),
    (dict(hidden_size="16"), TypeError, "hidden_size must be a positive integer"),
    (dict(hidden_size=-3), ValueError, "hidden_size must be a positive integer"),
], ids=["impl_unknown", "hidden_size_str", "hidden_size_negative"])
def test_bad_constructor_arguments_fail_at_build_time(kwargs, error, fragment):
    """Found by this file and fixed: these once failed late (impl at the first call) or deep inside torch."""
    with pytest.raises(error, match=fragment):
        CrepaRegularizer.from_config(CREPA, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2(), **kwargs)


# ---- bad inputs when calling ---------------------------------------------------------------------

BAD_CALLS = [
    ("step_negative", dict(teacher_features=features(), step=-1), ValueError, ["step must be a Python int >= 0", "-1"]),
    ("step_bool", dict(teacher_features=features(), step=True), TypeError, ["step must be a Python int", "True (bool)"]),
    ("step_float", dict(teacher_features=features(), step=2.0), TypeError, ["step must be a Python int", "2.0"]),
    ("step_tensor", dict(teacher_features=features(), step=torch.tensor(3)), TypeError, ["step must be a Python int"]),
    ("step_none", dict(teacher_features=features(), step=None), TypeError, ["step must be a Python int", "None"]),
    ("no_teacher_input", dict(step=0), ValueError, ["pass exactly one of latents=, pixels=, teacher_features="]),
    ("two_teacher_inputs", dict(latents=latents(), teacher_features=features(), step=0), ValueError,
     ["exactly one of", "latents, teacher_features"]),
    ("latents_packed_rank", dict(latents=latents()[:, :, 0], step=0), ValueError,
     ["latents for wan must be unpacked (B, C, F, H, W)", "(2, 4, 4, 6)"]),
    ("latents_wrong_batch", dict(latents=latents(batch=1), step=0), ValueError, ["batch size 1", "have 2"]),
    ("latents_wrong_grid", dict(latents=randn(2, 4, 3, 4, 8), step=0), ValueError, ["token grid"]),
    ("features_rank_2", dict(teacher_features=features()[0, 0], step=0), ValueError,
     ["teacher_features must be (B, T, N, D) or (B, N, D)", "(15, 16)"]),
    ("features_int", dict(teacher_features=features().long(), step=0), TypeError, ["teacher_features must be a floating-point"]),
    ("features_complex", dict(teacher_features=features().to(torch.complex64), step=0), TypeError,
     ["teacher_features must be a floating-point"]),
    ("features_width", dict(teacher_features=features()[..., :8], step=0), ValueError, ["width 8", "encoder width 16"]),
    ("features_tokens", dict(teacher_features=features()[:, :, :7], step=0), ValueError, ["7 teacher_features tokens"]),
    ("features_batch", dict(teacher_features=features(batch=1), step=0), ValueError, ["batch size 1"]),
    ("features_frames", dict(teacher_features=features()[:, :2], step=0), ValueError, ["2 frames", "student has 3"]),
    ("pixels_channels", dict(pixels=torch.rand(2, 5, 4, 16, 24), step=0), ValueError,
     ["pixels must be (B, F, 3, H, W) or (B, 3, H, W)", "(2, 5, 4, 16, 24)"]),
    ("pixels_uint8", dict(pixels=torch.zeros(2, 5, 3, 16, 24, dtype=torch.uint8), step=0), TypeError,
     ["pixels must be a floating-point tensor in [0, 1]", "torch.uint8"]),
    ("pixels_too_few_frames", dict(pixels=torch.rand(2, 2, 3, 16, 24), step=0), ValueError,
     ["2 frames were given but the student has 3 frames"]),
    ("pixels_in_minus_one_to_one", dict(pixels=torch.rand(2, 5, 3, 16, 24) * 2 - 1, step=0), ValueError,
     ["pixels must lie in [0, 1]", "at step 0", "(pixels + 1) / 2"]),
    ("pixels_in_0_to_255", dict(pixels=torch.rand(2, 5, 3, 16, 24) * 255, step=0), ValueError,
     ["pixels must lie in [0, 1]", "pixels / 255"]),
    ("pixels_portrait_on_a_landscape_grid", dict(pixels=torch.rand(2, 5, 3, 32, 16), step=0), ValueError,
     ["pixels of shape (2, 5, 3, 32, 16)", "token grid (3, 2, 3)", "stretched"]),
]


def _host_reads(monkeypatch, call):
    """The device-to-host reads (item, tolist, float/bool/int of a tensor) that `call()` makes."""
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, functools.partialmethod(
            lambda self, *args, _original=original, _name=name, **kwargs: reads.append(_name) or _original(
                self, *args, **kwargs)))
    try:
        call()
    finally:
        monkeypatch.undo()
    return reads


@pytest.mark.parametrize("kind", ["crepa", "urepa", "urepa_decode"])
def test_frames_outside_0_1_are_refused_with_the_one_read_of_the_call(kind, monkeypatch):
    """pixels= (and the frames of a decode= callable) outside [0, 1] are an error naming them and the range;
    their min / max travel in the schedule's one host read of the call, so a good call still reads once."""
    if kind == "crepa":
        reg, model = crepa(vae=None)
        lat, good, bad = (latents(), dict(pixels=torch.rand(2, 5, 3, 16, 24)),
                           dict(pixels=torch.rand(2, 5, 3, 16, 24) * 2 - 1))
    else:
        model, lat = tm.tiny_unet().train(), randn(2, 4, 8, 8)
        decode = (lambda z: torch.rand(2, 3, 32, 32)) if kind == "urepa_decode" else None
        reg = UrepaRegularizer.from_config(UREPA, unet=model, encoder=tm.tiny_dinov2(), decode=decode)
        good, bad = dict(pixels=torch.rand(2, 3, 32, 32)), dict(pixels=torch.rand(2, 3, 32, 32) * 255)
        if kind == "urepa_decode":
            good = dict(latents=lat)
    tm.tiny_forward(model, lat)
    assert _host_reads(monkeypatch, lambda: reg(**good, step=0)) == ["tolist"]
    if kind == "urepa_decode":
        reg.set_decoder(lambda z: torch.rand(2, 3, 32, 32) * 2 - 1)    # a diffusers-range decoder, by mistake
        bad, name = dict(latents=lat), "the frames decode=test_frames_outside_0_1_are_refused_with_the_one_read"
    else:
        name = "pixels"
    tm.tiny_forward(model, lat)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}.* must lie in \[0, 1\].*got values in \["):
        reg(**bad, step=1)
    reg.detach()


@pytest.mark.parametrize("case", ["unet_latents_wider", "unet_pixels_wider", "pixart_pixels_portrait",
                                  "unet_latents_rounded"])
def test_a_teacher_input_of_another_aspect_or_size_is_refused_not_stretched(case):
    """U-REPA compares the latents with the forward's grid (CREPA always did); pixels whose aspect is not
    the token grid's are refused in both, naming both shapes; one token of rounding per side is fine."""
    if case.startswith("unet"):
        model = tm.tiny_unet()
        reg = UrepaRegularizer.from_config(UREPA, unet=model, encoder=tm.tiny_dinov2(), vae=tm.tiny_image_vae())
        forward = randn(2, 4, 8, 8)      # mid-block grid (1, 4, 4)
    else:
        model = tm.tiny_pixart()
        reg = crepa(transformer=model, vae=None)[0]
        forward = randn(2, 4, 8, 12)     # token grid (1, 4, 6)
    tm.tiny_forward(model, forward)
    call = {"unet_latents_wider": dict(latents=randn(2, 4, 8, 16)),
            "unet_pixels_wider": dict(pixels=torch.rand(2, 3, 64, 128)),
            "pixart_pixels_portrait": dict(pixels=torch.rand(2, 3, 48, 32)),
            "unet_latents_rounded": dict(latents=randn(2, 4, 7, 9))}[case]
    if case == "unet_latents_rounded":
        assert torch.isfinite(reg(**call, step=0)[0])
        return
    expected = {"unet_latents_wider": ["latents of shape (2, 4, 8, 16)", "mid-block grid (1, 4, 4)"],
                "unet_pixels_wider": ["pixels of shape (2, 1, 3, 64, 128)", "token grid (1, 4, 4)"],
                "pixart_pixels_portrait": ["pixels of shape (2, 1, 3, 48, 32)", "token grid (1, 4, 6)"]}[case]
    with pytest.raises(ValueError) as info:
        reg(**call, step=0)
    for fragment in expected:
        assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"


@pytest.mark.parametrize("case_id, kwargs, error, fragments", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_a_named_error_and_keep_nothing(case_id, kwargs, error, fragments):
    reg, transformer = crepa()
    refs = []
    transformer.blocks[1].register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    tm.tiny_forward(transformer, latents())
    with pytest.raises(error) as info:
        reg(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{case_id}: {fragment!r} missing from: {info.value}"
    # A trainer that catches the error and goes on must not accumulate captured graphs. An error raised
    # after the capture was consumed frees it at once; one raised while checking the arguments (before
    # the capture is used) leaves it for a corrected retry, and the next forward replaces it.
    del info
    gc.collect()
    if refs[0]() is not None:
        assert reg.capture.has_capture, f"{case_id}: the captured hidden state is held outside the capture"
        tm.tiny_forward(transformer, latents())
        gc.collect()
        assert refs[0]() is None, f"{case_id}: the next forward did not release the previous capture"


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(latents=latents().long(), step=0), TypeError, "latents must be a floating-point"),
    (dict(teacher_features=features(), step=0, token_grid=(3, 4)), ValueError, "token_grid must be"),
    (dict(teacher_features=features(), step=0, token_grid="abc"), (TypeError, ValueError), "token_grid must be"),
], ids=["latents_int", "token_grid_two_values", "token_grid_str"])
def test_bad_call_arguments_that_need_a_check(kwargs, error, fragment):
    """Found by this file and fixed: integer latents were decoded silently, a bad token_grid failed inside
    TokenGrid / int()."""
    reg, transformer = crepa()
    tm.tiny_forward(transformer, latents())
    with pytest.raises(error, match=fragment):
        reg(**kwargs)


def test_calling_twice_after_one_forward_is_an_error():
    reg, transformer = crepa(BACKBONE, vae=None)
    tm.tiny_forward(transformer, latents())
    reg(step=0)
    with pytest.raises(CaptureError, match="once per regularizer call"):
        reg(step=1)


def test_teacher_features_in_another_dtype_are_cast():
    """Documented result: fp16 / fp64 teacher features give the fp32 features' loss."""
    reg, transformer = crepa()
    values = []
    for dtype in (torch.float32, torch.float16, torch.float64):
        tm.tiny_forward(transformer, latents())
        values.append(reg(teacher_features=features().to(dtype), step=0)[0].detach())
    assert torch.allclose(values[1], values[0], atol=1e-3) and torch.allclose(values[2], values[0], atol=1e-6)


# ---- non-finite values -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["teacher_features", "latents"])
def test_non_finite_inputs_give_a_nan_loss_and_stay_out_of_the_ema(where, value):
    """Documented: NaN/Inf propagate to the loss (checking would cost a host sync); the schedule leaves the
    non-finite score out of the similarity EMA with one warning, so the cutoff decision stays sane."""
    reg, transformer = crepa({"crepa_similarity_threshold": 0.99})
    tm.tiny_forward(transformer, latents())
    ema = reg(teacher_features=features(), step=0)[1]["crepa_alignment_score_ema"].item()   # step 0's score
    assert math.isfinite(ema)
    bad = (features() if where == "teacher_features" else latents()).clone()
    bad.view(-1)[7] = value
    tm.tiny_forward(transformer, latents())
    with pytest.warns(RuntimeWarning, match="not finite"):
        loss, logs = reg(**{where: bad}, step=1)
    assert torch.isnan(loss) and torch.isnan(logs["crepa_alignment_score"])
    assert reg.schedule.ema == ema and logs["crepa_alignment_score_ema"] == ema


def _nan_at(tensor, index=7):
    tensor = tensor.clone()
    tensor.view(-1)[index] = math.nan
    return tensor


@pytest.mark.parametrize("where", ["teacher_features", "latents", "pixels", "hidden_states", "urepa_teacher_features"])
def test_opt_in_finite_check_names_the_tensor_and_the_step(where):
    """The regularizer offers an opt-in finite check (check_finite=True, one host sync per tensor)."""
    if where == "urepa_teacher_features":
        model = tm.tiny_unet().train()
        reg = UrepaRegularizer.from_config(UREPA, unet=model, encoder=tm.tiny_dinov2(), max_train_steps=100,
                                           check_finite=True)
        tm.tiny_forward(model, randn(2, 4, 8, 8, seed=8))
        call, name = dict(teacher_features=_nan_at(randn(2, 16, 16, seed=9))), "teacher_features"
    else:
        reg, model = crepa(check_finite=True)
        lat = latents()
        if where == "hidden_states":
            with torch.no_grad():
                model.blocks[0].ffn.net[0].proj.weight[0, 0] = math.nan   # a diverged block before the captured one
        tm.tiny_forward(model, lat)
        call = {"teacher_features": dict(teacher_features=_nan_at(features())), "latents": dict(latents=_nan_at(lat)),
                "pixels": dict(pixels=_nan_at(torch.rand(2, 5, 3, 16, 24))),
                "hidden_states": dict(teacher_features=features())}[where]
        name = "captured hidden states" if where == "hidden_states" else where
    with pytest.raises(FloatingPointError, match=f"{name}.*step 3"):
        reg(**call, step=3)


def test_a_finished_schedule_skips_the_finite_check_with_everything_else():
    """After crepa_cutoff_step nothing reads the inputs, so the opt-in check adds no host sync there."""
    reg, model = crepa({"crepa_cutoff_step": 2}, check_finite=True)
    tm.tiny_forward(model, latents())
    loss, logs = reg(latents=_nan_at(latents()), step=5)
    assert loss.item() == 0.0 and logs["crepa_weight"].item() == 0.0


def test_finite_check_flag_is_validated_and_off_by_default():
    with pytest.raises(TypeError, match="check_finite"):
        crepa(check_finite="yes")
    assert crepa(check_finite=np.True_)[0].check_finite is True   # a numpy bool is a bool
    reg, model = crepa()
    tm.tiny_forward(model, latents())
    with pytest.warns(RuntimeWarning, match="not finite"):
        loss, _ = reg(teacher_features=_nan_at(features()), step=0)
    assert torch.isnan(loss)


# ---- gradient checkpointing -------------------------------------------------------------------------

def _checkpointing_run(family, use_reentrant):
    if family == "wan":
        model = tm.tiny_wan().train()
        reg, lat, inputs = crepa(BACKBONE, transformer=model, vae=None)[0], latents(), {}
    else:
        model = tm.tiny_unet().train()
        reg = UrepaRegularizer.from_config(UREPA, unet=model, encoder=tm.tiny_dinov2(), max_train_steps=100)
        lat, inputs = randn(2, 4, 8, 8, seed=4), {"teacher_features": randn(2, 16, 16, seed=3)}
    if use_reentrant is not None:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=use_reentrant))
    pred = tm.tiny_forward(model, lat)
    loss, _ = reg(**inputs, step=0)
    (loss + pred.square().mean()).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, variants", [("wan", (False, True)), ("unet", (True,))])
def test_gradient_checkpointing(family, variants):
    """Non-reentrant: the same loss and gradients as without checkpointing. Reentrant: refused on DiT blocks
    (the hook would see a tensor without grad); on a UNet, whose mid-block is not itself checkpointed, the
    hook sees a tensor with grad and the gradients are right: documented as working."""
    base_loss, base_grads = _checkpointing_run(family, None)
    for use_reentrant in variants:
        if family == "wan" and use_reentrant:
            with pytest.raises(CaptureError, match="non-reentrant"):
                _checkpointing_run(family, use_reentrant)
            continue
        loss, grads = _checkpointing_run(family, use_reentrant)
        assert torch.allclose(loss, base_loss, rtol=1e-6, atol=1e-8), use_reentrant
        assert grads.keys() == base_grads.keys()
        for name in grads:
            assert torch.allclose(grads[name], base_grads[name], rtol=1e-5, atol=1e-7), (use_reentrant, name)


# ---- memory hygiene --------------------------------------------------------------------------------

def _watch(module, refs, name, pick=lambda out: out):
    module.register_forward_hook(lambda m, a, out: refs.setdefault(name, []).append(weakref.ref(pick(out))))


@pytest.mark.parametrize("mode", ["encoder_from_latents", "backbone", "urepa"])
def test_nothing_captured_stays_alive_after_the_call_and_backward(mode):
    refs = {}
    if mode == "urepa":
        model = tm.tiny_unet().train()
        vae = tm.tiny_image_vae()
        reg = UrepaRegularizer.from_config(UREPA, unet=model, vae=vae, encoder=tm.tiny_dinov2(), max_train_steps=100)
        lat = randn(2, 4, 8, 8, seed=5)
        _watch(model.mid_block, refs, "student")
    else:
        reg, model = crepa(BACKBONE if mode == "backbone" else {}, vae=None if mode == "backbone" else True)
        lat = latents()
        _watch(model.blocks[1], refs, "student")
        if mode == "backbone":
            _watch(model.blocks[2], refs, "teacher block")
    _watch(reg.projector, refs, "projector output")
    if reg.encoder is not None:
        _watch(reg.encoder.model, refs, "encoder tokens", lambda out: out.last_hidden_state)
        _watch(reg._teacher.decoder.decoder.decoder, refs, "decoded frames")   # LatentDecoder -> VAE -> its decoder
    for step in range(2):
        pred = tm.tiny_forward(model, lat)
        loss, logs = reg(latents=lat, step=step)
        (loss + pred.square().mean()).backward()
        del pred, loss
    # The logs are kept (a trainer logs them later): they must hold no graph.
    assert all(not v.requires_grad and v.grad_fn is None for v in logs.values())
    alive = {name: sum(r() is not None for r in rs) for name, rs in refs.items()}
    assert all(refs.values()) and len(refs) >= 2
    if any(alive.values()):
        gc.collect()
        still = {name: sum(r() is not None for r in rs) for name, rs in refs.items()}
        assert not any(still.values()), f"held after the call and backward: {still}"
        pytest.fail(f"only freed by the cycle collector (a reference cycle keeps the graph until gc runs): {alive}")
    assert not reg.capture.has_capture


def _state_of(model):
    return [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["encoder", "backbone", "urepa"])
def test_detach_restores_forward_and_gradients_exactly(mode):
    """Pristine model vs the same model after attach, a training step and detach(): the same hooks, the same
    forward output and the same gradients of a diffusion loss, bit for bit. The projector (the regularizer's
    own) takes no part in the forward."""
    if mode == "urepa":
        model, lat = tm.tiny_unet().train(), randn(2, 4, 8, 8, seed=6)
    else:
        model, lat = tm.tiny_wan().train(), latents()

    def diffusion_step():
        model.zero_grad(set_to_none=True)
        pred = tm.tiny_forward(model, lat)
        pred.square().mean().backward()
        return pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    hooks = _state_of(model)
    before_out, before_grads = diffusion_step()
    if mode == "urepa":
        reg = UrepaRegularizer.from_config(UREPA, unet=model, encoder=tm.tiny_dinov2(), max_train_steps=100)
        call = dict(teacher_features=randn(2, 16, 16, seed=7))
    else:
        reg = crepa(BACKBONE if mode == "backbone" else {}, transformer=model, vae=None)[0]
        call = {} if mode == "backbone" else dict(teacher_features=features())
    pred = tm.tiny_forward(model, lat)
    reg(**call, step=0)[0].backward()
    del pred
    reg.detach()
    after_out, after_grads = diffusion_step()
    existing = {h[0] for h in hooks}
    assert [h for h in _state_of(model) if h[0] in existing] == hooks
    assert all(not (f or p or b) for name, f, p, b in _state_of(model) if name not in existing)
    assert torch.equal(after_out, before_out)
    projector_params = {n for n in after_grads if "_projector." in n}
    assert not projector_params, f"the detached projector still receives gradients: {projector_params}"
    assert after_grads.keys() == before_grads.keys()
    for name in before_grads:
        assert torch.equal(after_grads[name], before_grads[name]), name
    with pytest.raises(CaptureError, match="no hidden states captured"):
        reg(**call, step=1)


@pytest.mark.parametrize("kind", ["crepa", "urepa"])
def test_a_second_regularizer_on_a_model_is_refused_and_a_deep_copy_trains_alone(kind):
    """Building another regularizer on a hooked model (a notebook cell run twice) names the one attached and
    detach(); an EMA copy made with copy.deepcopy runs as a plain model beside the regularizer."""
    if kind == "urepa":
        model, lat, call = tm.tiny_unet().train(), randn(2, 4, 8, 8, seed=6), dict(teacher_features=randn(2, 16, 16))

        def build():
            return UrepaRegularizer.from_config(UREPA, unet=model, encoder=tm.tiny_dinov2(), max_train_steps=100)
    else:
        model, lat, call = tm.tiny_wan().train(), latents(), dict(teacher_features=features())

        def build():
            return crepa(transformer=model, vae=None)[0]
    first = build()
    name = "UrepaRegularizer (block 0)" if kind == "urepa" else "CrepaRegularizer (block 1)"
    with pytest.raises(CaptureError, match=rf"already has a {re.escape(name)} attached.*reg\.detach\(\)"):
        build()
    ema = copy.deepcopy(model)
    tm.tiny_forward(model, lat)
    with torch.no_grad():
        tm.tiny_forward(ema, lat)            # after the model's forward: it must not replace the capture
    loss, _ = first(**call, step=0)
    assert loss.requires_grad
    first.detach()
    second = build()
    tm.tiny_forward(model, lat)
    assert second.capture.has_capture and not first.capture.has_capture
    second.detach()


# ---- compiled transformer -------------------------------------------------------------------------------

@pytest.mark.slow
def test_regularizer_on_a_compiled_transformer_matches_eager():
    """torch.compile'd tiny Wan (aot_eager: Dynamo traces the hooks, AOTAutograd the graph; Inductor gave the
    same result to 4.5e-8 in 89 s here, too slow for CI) with the regularizer attached: the same losses and
    gradients as eager over two steps."""
    def run(compiled):
        torch._dynamo.reset()
        model = tm.tiny_wan(num_layers=2).train()
        runner = torch.compile(model, backend="aot_eager") if compiled else model
        reg = CrepaRegularizer.from_config(CREPA, transformer=runner, encoder=tm.tiny_dinov2(), max_train_steps=100)
        losses = []
        for step in range(2):
            pred = tm.tiny_forward(runner, latents(seed=step))
            loss, logs = reg(teacher_features=features(seed=step), step=step)
            (loss + pred.square().mean()).backward()
            losses.append(loss.detach())
        named = [*model.named_parameters(), *(("reg." + n, p) for n, p in reg.named_parameters())]
        return losses, {n: p.grad.clone() for n, p in named if p.grad is not None}

    eager_losses, eager_grads = run(False)
    compiled_losses, compiled_grads = run(True)
    assert torch.allclose(torch.stack(compiled_losses), torch.stack(eager_losses), rtol=1e-6, atol=1e-8)
    assert compiled_grads.keys() == eager_grads.keys() and any(n.startswith("reg.projector.") for n in eager_grads)
    for name in eager_grads:
        assert torch.allclose(compiled_grads[name], eager_grads[name], rtol=1e-5, atol=1e-7), name
