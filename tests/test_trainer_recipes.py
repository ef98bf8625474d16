"""What README tells a trainer to write works as written: the clean-latents helper for flow-matching
trainers that keep x0 private, and the log keys README lists are the keys a call returns (both
regularizers, a computing call and a call the schedule skips)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer, UrepaRegularizer, clean_latents_from_flow_target

README = Path(__file__).resolve().parent.parent / "README.md"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sigma_form", ["per_sample_4d", "per_sample_1d", "float"])
def test_clean_latents_from_a_flow_matching_target(sigma_form):
    x0, noise = randn(3, 4, 2, 6, 8, seed=1), randn(3, 4, 2, 6, 8, seed=2)
    sigma = torch.tensor([0.1, 0.5, 0.93])
    if sigma_form == "float":
        sigma = torch.full((3,), 0.4)
    view = sigma.view(3, 1, 1, 1, 1)
    noisy = ((1 - view) * x0 + view * noise).to(torch.bfloat16)   # as a bf16 trainer holds them
    target = (noise - x0).to(torch.bfloat16)
    given = {"per_sample_4d": view, "per_sample_1d": sigma, "float": 0.4}[sigma_form]
    got = clean_latents_from_flow_target(noisy, given, target)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert torch.allclose(got, x0, atol=0.05), (got - x0).abs().max()


def test_clean_latents_helper_refuses_mismatched_inputs():
    noisy = randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"sigmas must hold one sigma per sample.*\(3,\)"):
        clean_latents_from_flow_target(noisy, torch.ones(3), noisy)
    with pytest.raises(ValueError, match="noisy and target must have one shape"):
        clean_latents_from_flow_target(noisy, 0.5, noisy[:, :3])
    with pytest.raises(TypeError, match="sigmas must be a float or a floating-point tensor"):
        clean_latents_from_flow_target(noisy, torch.ones(2, dtype=torch.long), noisy)


def readme_log_keys(label: str) -> set[str]:
    line = next(l for l in README.read_text().splitlines() if l.strip().startswith(f"- {label} logs:"))
    text = line
    lines = README.read_text().splitlines()
    following = lines[lines.index(line) + 1]
    if not following.strip().startswith("-"):
        text += following
    return set(re.findall(r"`(\w+)`", text))


@pytest.mark.parametrize("kind", ["crepa", "urepa"])
def test_readme_lists_the_log_keys_a_call_returns(kind):
    if kind == "crepa":
        model, lat, call = tm.tiny_wan().train(), randn(2, 4, 3, 4, 6), dict(teacher_features=randn(2, 3, 15, 16))
        build = lambda keys: CrepaRegularizer.from_config(   # noqa: E731
            {"crepa_enabled": True, "crepa_block_index": 1, **keys}, transformer=model, encoder=tm.tiny_dinov2())
        label = "CREPA"
    else:
        model, lat, call = tm.tiny_unet().train(), randn(2, 4, 8, 8), dict(teacher_features=randn(2, 16, 16))
        build = lambda keys: UrepaRegularizer.from_config(   # noqa: E731
            {"urepa_enabled": True, **keys}, unet=model, encoder=tm.tiny_dinov2())
        label = "U-REPA"
    listed = readme_log_keys(label)
    reg = build({})
    tm.tiny_forward(model, lat)
    _, logs = reg(**call, step=0)
    assert set(logs) == listed
    reg.detach()
    skipping = build({f"{kind}_lambda": 0.0})
    tm.tiny_forward(model, lat)
    _, logs = skipping(**call, step=0)
    assert set(logs) == {f"{kind}_loss", f"{kind}_weight", f"{kind}_cutoff"} and set(logs) <= listed
    skipping.detach()


@pytest.mark.parametrize("kind", ["crepa", "urepa"])
def test_a_disabled_config_gives_a_no_op_regularizer(kind):
    """README's lines run unchanged without the flag: no hooks, no parameters, empty state, loss 0, no logs."""
    model = tm.tiny_wan().train() if kind == "crepa" else tm.tiny_unet().train()
    lat = randn(2, 4, 3, 4, 6) if kind == "crepa" else randn(2, 4, 8, 8)
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    keys = {f"{kind}_enabled": False, f"{kind}_scheduler": "cosine"}   # would need max_train_steps if enabled
    if kind == "crepa":
        reg = CrepaRegularizer.from_config(keys, transformer=model, vae=tm.tiny_wan_vae())
    else:
        reg = UrepaRegularizer.from_config(keys, unet=model, vae=None)
    assert not reg.enabled and list(reg.parameters()) == [] and reg.state_dict() == {}
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks
    pred = tm.tiny_forward(model, lat)
    reg_loss, logs = reg(latents=lat, step=0)
    assert logs == {} and reg_loss.dtype == torch.float32 and reg_loss.shape == () and float(reg_loss) == 0.0
    (pred.square().mean() + reg_loss).backward()
    reg.load_state_dict(reg.state_dict())
    reg.detach()


class CustomVAE(torch.nn.Module):
    """A VAE of no diffusers class: decode gives (B, 3, 4H, 4W) in [-1, 1], or a wrong layout."""

    def __init__(self, layout="images"):
        super().__init__()
        self.layout = layout

    def decode(self, z):
        frames = torch.tanh(z[:, :3]).repeat_interleave(4, -1).repeat_interleave(4, -2)
        return frames[0] if self.layout == "unbatched" else frames


def test_the_vae_or_a_decode_callable_can_be_given_after_construction():
    from repa_kernels.regularizer.vae import LatentDecoder
    model, vae, lat = tm.tiny_wan().train(), tm.tiny_wan_vae(), randn(2, 4, 3, 4, 6)
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1,
                                        "crepa_encoder_image_size": 16}, transformer=model, encoder=tm.tiny_dinov2())
    tm.tiny_forward(model, lat)
    with pytest.raises(ValueError, match=r"reg\.set_vae\(vae\) / reg\.set_decoder\(decode\)"):
        reg(latents=lat, step=0)
    reg.set_vae(vae)                                     # loaded inside the loop
    tm.tiny_forward(model, lat)
    with_vae, _ = reg(latents=lat, step=0)
    reference = LatentDecoder(vae=vae, video=True)
    reg.set_decoder(lambda z: reference.decode(z))       # (B, F, 3, H, W) in [0, 1]
    tm.tiny_forward(model, lat)
    with_decode, _ = reg(latents=lat, step=0)
    assert torch.allclose(with_vae, with_decode) and reg.frames_decoded == 2 * 2 * 5
    reg.set_decoder(lambda z: reference.decode(z).permute(0, 2, 1, 3, 4))   # a diffusers layout, by mistake
    tm.tiny_forward(model, lat)
    with pytest.raises(ValueError, match=r"returned shape \(2, 3, 5, 16, 24\).*permute\(0, 2, 1, 3, 4\).*"
                                         r"frames: a float tensor in \[0, 1\], \(B, F, 3, H, W\)"):
        reg(latents=lat, step=0)
    reg.detach()


def test_a_custom_vae_class_works_through_decode_and_a_wrong_layout_names_the_contract():
    unet, lat = tm.tiny_unet().train(), randn(2, 4, 8, 8)
    keys = {"urepa_enabled": True, "urepa_encoder_image_size": 16}
    with pytest.raises(ValueError, match="not a VAE class with a known latent normalisation"):
        UrepaRegularizer.from_config(keys, unet=unet, encoder=tm.tiny_dinov2(), vae=CustomVAE())
    custom = CustomVAE()
    reg = UrepaRegularizer.from_config(keys, unet=unet, encoder=tm.tiny_dinov2(),
                                       decode=lambda z: custom.decode(z) * 0.5 + 0.5)
    tm.tiny_forward(unet, lat)
    loss, _ = reg(latents=lat, step=0)
    assert torch.isfinite(loss) and reg.frames_decoded == 2
    reg.set_vae(CustomVAE("unbatched"), denormalize=lambda z: z)   # the VAE path: its own layout check
    tm.tiny_forward(unet, lat)
    with pytest.raises(ValueError, match=r"CustomVAE.decode returned shape \(3, 32, 32\).*B=2.*pass "
                                         r"decode=<callable> \(reg.set_decoder\(decode\)\): decode\(latents\)"):
        reg(latents=lat, step=0)
    with pytest.raises(ValueError, match="decode= does the whole decode"):
        UrepaRegularizer.from_config(keys, unet=tm.tiny_unet(), encoder=tm.tiny_dinov2(), vae=custom,
                                     decode=custom.decode)
    reg.detach()
