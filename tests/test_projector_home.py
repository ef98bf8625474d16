"""The projector's home is the regularizer: how trainers save, load, freeze and cast never break it.

Replayed with diffusers', PEFT's and accelerate's own functions on tiny models:
- diffusers full fine-tune (train_text_to_image.py's save/load_model_hook: `save_pretrained`, then
  `from_pretrained` + strict `load_state_dict`), resumed in a fresh trainer and exported;
- diffusers PEFT LoRA (train_dreambooth_lora_sd3.py: `get_peft_model_state_dict`, `save_lora_weights`,
  the `lora_state_dict` check of `load_lora_weights`, `load_lora_into_transformer`);
- an accelerate trainer (`register_for_checkpointing`, `save_state` / `load_state`);
plus the cast, freeze, layout, identity and pickling rules of the projector and the schedule state.
"""

from __future__ import annotations

import io
import os
import warnings

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer, UrepaRegularizer

CREPA = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16,
         "crepa_similarity_ema_decay": 0.5}
UREPA = {"urepa_enabled": True, "urepa_encoder_image_size": 16, "urepa_similarity_ema_decay": 0.5}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def wan_reg(model=None):
    model = model if model is not None else tm.tiny_wan().train()
    return CrepaRegularizer.from_config(CREPA, transformer=model, encoder=tm.tiny_dinov2(), max_train_steps=10), model


def wan_step(model, reg, step, optimizer=None):
    pred = tm.tiny_forward(model, randn(2, 4, 3, 4, 6, seed=step))
    loss, logs = reg(teacher_features=randn(2, 3, 15, 16, seed=100 + step), step=step)
    (pred.square().mean() + loss).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    return logs


def projector_tensors(reg):
    return {k: v.clone() for k, v in reg.projector.state_dict().items()}


# ---- cast, freeze -----------------------------------------------------------------------------------------

def test_casting_the_model_leaves_the_projector_float32_and_casting_the_regularizer_is_refused():
    reg, model = wan_reg()
    model.to(torch.bfloat16)                              # a trainer's cast after building the regularizer
    assert {p.dtype for p in reg.parameters()} == {torch.float32}
    for cast in (lambda: reg.to(torch.bfloat16), lambda: reg.half(), lambda: reg.to("cpu", torch.float16)):
        with pytest.raises(TypeError, match="projector stays float32.*it was asked to become torch.(bfloat16|float16)"):
            cast()
    assert {p.dtype for p in reg.parameters()} == {torch.float32}
    reg.to("cpu")                                          # device moves are fine
    reg.float()


def test_freezing_the_model_does_not_freeze_the_projector_and_a_frozen_projector_warns_once():
    reg, model = wan_reg()
    model.requires_grad_(False)                            # diffusers LoRA scripts after loading
    assert all(p.requires_grad for p in reg.parameters())
    model.requires_grad_(True)
    reg.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"projector is frozen.*reg\.requires_grad_\(True\).*reg\.parameters\(\)"):
        wan_step(model, reg, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wan_step(model, reg, 1)                            # once only


# ---- state dict layouts and identity ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["simpletuner", "this package before the move"])
def test_projector_weights_in_a_model_state_dict_load(layout):
    reg, model = wan_reg()
    names = {"norm": "0", "linear": "1"} if layout == "simpletuner" else {"norm": "norm", "linear": "linear"}
    saved = {f"crepa_projector.{names[k.split('.')[0]]}.{k.split('.')[1]}": torch.randn_like(v)
             for k, v in reg.projector.state_dict().items()}
    checkpoint = {**model.state_dict(), **saved}          # the projector among the model's keys
    reg.load_projector_state_dict(checkpoint)
    for key, value in reg.projector.state_dict().items():
        module, tensor = key.split(".")
        assert torch.equal(value, saved[f"crepa_projector.{names[module]}.{tensor}"]), key
    # the same keys through load_state_dict, next to a schedule state (strict)
    other, _ = wan_reg()
    other.load_state_dict({**saved, "_extra_state": reg.state_dict()["_extra_state"]})
    assert all(torch.equal(a, b) for a, b in zip(other.projector.state_dict().values(),
                                                   reg.projector.state_dict().values()))
    with pytest.raises(KeyError, match="no projector weights.*crepa_projector.0.weight"):
        reg.load_projector_state_dict(model.state_dict())


def test_schedule_state_names_its_regularizer():
    crepa_reg, model = wan_reg()
    wan_step(model, crepa_reg, 0)
    unet = tm.tiny_unet()
    urepa_reg = UrepaRegularizer.from_config(UREPA, unet=unet, encoder=tm.tiny_dinov2(), max_train_steps=10)
    state = {**urepa_reg.state_dict(), "_extra_state": crepa_reg.state_dict()["_extra_state"]}
    with pytest.raises(ValueError, match="belongs to a crepa regularizer; UrepaRegularizer keeps urepa state"):
        urepa_reg.load_state_dict(state)
    # a schedule state without identity (this package before, or SimpleTuner) loads with one warning
    other, _ = wan_reg()
    with pytest.warns(UserWarning, match="names no regularizer"):
        other.load_state_dict({**other.state_dict(), "_extra_state": {"schedule": crepa_reg.schedule.state_dict()}})
    assert other.schedule.ema == crepa_reg.schedule.ema


def test_pickling_the_regularizer_says_what_to_checkpoint():
    reg, _ = wan_reg()
    with pytest.raises(TypeError, match=r"cannot be pickled.*checkpoint reg\.state_dict\(\).*register_for_checkpointing"):
        torch.save({"crepa": reg}, io.BytesIO())
    buffer = io.BytesIO()
    torch.save({"crepa": reg.state_dict()}, buffer)       # what the message says works


# ---- trainer patterns ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_diffusers_full_finetune_with_its_model_hooks_resumes_and_exports(tmp_path):
    """train_text_to_image.py: hooks that save/load every prepared model as the UNet; the regularizer is
    registered for checkpointing beside them (README), so the hooks stay as diffusers wrote them."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    def trainer():
        accelerator = Accelerator(cpu=True)
        unet = tm.tiny_unet().train()
        reg = UrepaRegularizer.from_config(UREPA, unet=unet, encoder=tm.tiny_dinov2(), max_train_steps=10)
        accelerator.register_for_checkpointing(reg)                                   # README
        optimizer = torch.optim.AdamW([*unet.parameters(), *reg.parameters()], lr=1e-2)  # README

        def save_model_hook(models, weights, output_dir):                             # diffusers' own
            for model in models:
                model.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

        def load_model_hook(models, input_dir):                                       # diffusers' own
            for _ in range(len(models)):
                model = models.pop()
                load_model = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.register_to_config(**load_model.config)
                model.load_state_dict(load_model.state_dict())
                del load_model

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        return accelerator, unet, reg, optimizer

    def step(unet, reg, optimizer, i):
        pred = tm.tiny_forward(unet, randn(2, 4, 8, 8, seed=i))
        loss, logs = reg(teacher_features=randn(2, 16, 16, seed=50 + i), step=i)
        (pred.square().mean() + loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        return logs

    accelerator, unet, reg, optimizer = trainer()
    for i in range(2):
        step(unet, reg, optimizer, i)
    accelerator.save_state(tmp_path / "checkpoint")
    want = [step(unet, reg, optimizer, 2)]

    accelerator2, unet2, reg2, optimizer2 = trainer()
    accelerator2.load_state(tmp_path / "checkpoint")
    got = [step(unet2, reg2, optimizer2, 2)]
    for key in want[0]:
        assert torch.equal(got[0][key], want[0][key]), key
    for a, b in zip(reg2.parameters(), reg.parameters()):
        assert torch.equal(a, b)

    unet2.save_pretrained(tmp_path / "export")                                       # the pipeline's UNet
    exported = load_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == unet2.state_dict().keys() and not any("projector" in k for k in exported)
    UNet2DConditionModel.from_pretrained(tmp_path / "export").load_state_dict(unet2.state_dict())   # strict


@pytest.mark.slow
def test_diffusers_peft_lora_export_loads_with_diffusers_own_loader(tmp_path):
    """train_dreambooth_lora_sd3.py: freeze, add_adapter, train, get_peft_model_state_dict, save_lora_weights;
    then the checks and the loading load_lora_weights does."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = tm.tiny_sd3().train()
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    reg = CrepaRegularizer.from_config(CREPA, transformer=transformer, encoder=tm.tiny_dinov2(), max_train_steps=10)
    params = [p for p in transformer.parameters() if p.requires_grad] + list(reg.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = projector_tensors(reg)
    for i in range(2):
        pred = tm.tiny_forward(transformer, randn(2, 4, 8, 8, seed=i))
        loss, _ = reg(teacher_features=randn(2, 16, 16, seed=70 + i), step=i)
        (pred.square().mean() + loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(before[k], v) for k, v in reg.projector.state_dict().items())   # it trained

    lora = get_peft_model_state_dict(transformer)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=lora)
    state = StableDiffusion3Pipeline.lora_state_dict(tmp_path / "lora")
    assert all("lora" in key for key in state)           # load_lora_weights' "Invalid LoRA checkpoint" check
    fresh = tm.tiny_sd3().eval()
    StableDiffusion3Pipeline.load_lora_into_transformer(state, transformer=fresh)
    reg.detach()
    transformer.eval()
    with torch.no_grad():
        inputs = randn(1, 4, 8, 8, seed=9)
        assert torch.allclose(tm.tiny_forward(fresh, inputs), tm.tiny_forward(transformer, inputs), atol=1e-6)
    torch.save(reg.state_dict(), tmp_path / "crepa.pt")   # the projector beside the LoRA, for resuming
    other, _ = wan_reg(tm.tiny_sd3())
    other.load_state_dict(torch.load(tmp_path / "crepa.pt"))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), reg.parameters()))


@pytest.mark.slow
def test_accelerate_save_state_and_load_state_restore_projector_and_schedule(tmp_path):
    from accelerate import Accelerator

    def trainer():
        accelerator = Accelerator(cpu=True)
        reg, model = wan_reg()
        accelerator.register_for_checkpointing(reg)
        optimizer = torch.optim.AdamW([*model.parameters(), *reg.parameters()], lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        return accelerator, model, reg, optimizer

    accelerator, model, reg, optimizer = trainer()
    for i in range(3):
        wan_step(model, reg, i, optimizer)
    accelerator.save_state(tmp_path / "state")
    accelerator2, model2, reg2, optimizer2 = trainer()
    accelerator2.load_state(tmp_path / "state")
    assert reg2.schedule.state_dict() == reg.schedule.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(reg2.parameters(), reg.parameters()))
    want, got = wan_step(model, reg, 3, optimizer), wan_step(model2, reg2, 3, optimizer2)
    assert all(torch.equal(got[k], want[k]) for k in want)
