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
