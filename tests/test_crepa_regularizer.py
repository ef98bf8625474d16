"""CrepaRegularizer end to end on tiny random diffusers models (docs/contract.md §3-§7)."""

import json

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CaptureError, CrepaConfig, CrepaRegularizer
from repa_kernels.regularizer.vae import LatentDecoder

BASE = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16}
LOG_KEYS = {"crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_similarity", "crepa_weight",
            "crepa_cutoff", "crepa_alignment_score_ema"}


def _latents(shape=(2, 4, 3, 4, 6), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _wan_reg(transformer=None, vae=None, impl="reference", **keys):
    transformer = transformer if transformer is not None else tm.tiny_wan().train()
    vae = vae if vae is not None else tm.tiny_wan_vae()
    reg = CrepaRegularizer.from_config({**BASE, **keys}, transformer=transformer, vae=vae, encoder=tm.tiny_dinov2(),
                                       max_train_steps=1000, impl=impl)
    return reg, transformer, vae


def _block_grads(blocks):
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in blocks]


def test_the_documented_usage_trains_projector_and_blocks_up_to_the_captured_one():
    transformer, vae = tm.tiny_wan().train(), tm.tiny_wan_vae()
    reg = CrepaRegularizer.from_config(CrepaConfig.from_dict(BASE), transformer=transformer, vae=vae,
                                       encoder=tm.tiny_dinov2(), max_train_steps=10_000)
    # The projector is the regularizer's own: nothing is added to the model.
    assert not hasattr(transformer, "crepa_projector")
    assert not any(p is reg.projector.linear.weight for p in transformer.parameters())
    assert not any("projector" in k for k in transformer.state_dict())
    assert list(reg.parameters()) == list(reg.projector.parameters())
    assert sorted(reg.state_dict()) == ["_extra_state", "projector.linear.bias", "projector.linear.weight",
                                        "projector.norm.bias", "projector.norm.weight"]
    latents = _latents()
    pred = tm.tiny_forward(transformer, latents)
    reg_loss, logs = reg(latents=latents, step=0)
    reg_loss.backward()
    assert reg.projector.linear.weight.grad.abs().sum() > 0
    assert _block_grads(transformer.blocks) == [True, True, False]      # nothing beyond block 1
    assert transformer.patch_embedding.weight.grad.abs().sum() > 0
    assert set(logs) == LOG_KEYS
    for value in logs.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert torch.allclose(logs["crepa_loss"], -0.5 * logs["crepa_alignment_score"])   # normalize_by_frames: -λ·score
    assert torch.equal(logs["crepa_similarity"], logs["crepa_alignment_score"])
    assert logs["crepa_weight"] == 0.5 and logs["crepa_cutoff"] == 0
    assert reg_loss.dtype == torch.float32 and pred.requires_grad


def test_one_frame_encoded_per_latent_frame():
    reg, transformer, _ = _wan_reg()
    for step in range(2):
        tm.tiny_forward(transformer, _latents(seed=step))
        reg(latents=_latents(seed=step), step=step)
    assert reg.frames_encoded == 2 * 2 * 3          # steps x batch x latent frames
    assert reg.frames_decoded == 2 * 2 * 5          # the causal VAE decodes every pixel frame


def test_pixels_and_teacher_features_give_the_same_loss_as_latents():
    reg, transformer, vae = _wan_reg()
    latents = _latents()
    losses = []
    pixels = LatentDecoder(vae=vae, video=True).decode(latents)
    frames = pixels[:, [0, 2, 4]].flatten(0, 1)
    frames = torch.nn.functional.interpolate(frames, size=(12, 20), mode="bilinear", antialias=True)
    features = reg.encoder.encode(frames).reshape(2, 3, 15, 16)
    for inputs in ({"latents": latents}, {"pixels": pixels}, {"teacher_features": features}):
        tm.tiny_forward(transformer, latents)
        losses.append(reg(**inputs, step=5)[0].detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6) and torch.allclose(losses[0], losses[2], atol=1e-5)


def _family_setup(family):
    if family in tm.VIDEO_BUILDERS:
        latents = _latents((1, 4, 3, 4, 6))
        vae = {"ltx_video": tm.tiny_ltx_vae, "kandinsky5": tm.tiny_hunyuan_vae}.get(family, tm.tiny_wan_vae)()
    else:
        latents = _latents((1, 4, 4, 6))
        vae = tm.tiny_dc_vae() if family == "sana" else tm.tiny_image_vae()
    return tm.VIDEO_BUILDERS.get(family, tm.IMAGE_BUILDERS.get(family))().train(), vae, latents


@pytest.mark.parametrize("family", list(tm.VIDEO_BUILDERS) + list(tm.IMAGE_BUILDERS))
def test_every_family_end_to_end(family):
    transformer, vae, latents = _family_setup(family)
    reg = CrepaRegularizer.from_config(BASE, transformer=transformer, vae=vae, encoder=tm.tiny_dinov2(),
                                       impl="reference")
    assert reg.family.name == family
    tm.tiny_forward(transformer, latents)
    loss, logs = reg(latents=latents, step=0)
    loss.backward()
    assert torch.isfinite(loss) and reg.projector.linear.weight.grad.abs().sum() > 0
    assert reg.frames_encoded == latents.shape[0] * (latents.shape[2] if latents.dim() == 5 else 1)


@pytest.mark.parametrize("builder", ["diffusers-dit", "plain-sit"])
def test_a_dit_of_no_known_family_end_to_end(builder):
    """docs/contract.md §7: any image DiT with a list of blocks (here diffusers' DiTTransformer2DModel, and a plain
    module without a config that needs hidden_size=)."""
    transformer = (tm.tiny_dit() if builder == "diffusers-dit" else tm.TinySiT()).train()
    latents = _latents((2, 4, 8, 8))
    reg = CrepaRegularizer.from_config(BASE, transformer=transformer, vae=tm.tiny_image_vae(),
                                       encoder=tm.tiny_dinov2(), impl="reference",
                                       hidden_size=None if builder == "diffusers-dit" else 16)
    assert reg.family.name == "dit"
    tm.tiny_forward(transformer, latents)
    loss, logs = reg(latents=latents, step=0)
    loss.backward()
    assert torch.isfinite(loss) and reg.projector.linear.weight.grad.abs().sum() > 0
    assert _block_grads(transformer.transformer_blocks if builder == "diffusers-dit" else transformer.blocks) == \
        [True, True, False]


def test_a_dit_whose_sequence_holds_more_than_the_image_tokens_is_refused():
    transformer = tm.TinySiT(block_output="cls").train()   # a class token before the 16 image tokens
    latents = _latents((1, 4, 8, 8))
    reg = CrepaRegularizer.from_config(BASE, transformer=transformer, vae=tm.tiny_image_vae(),
                                       encoder=tm.tiny_dinov2(), impl="reference", hidden_size=16)
    tm.tiny_forward(transformer, latents)
    with pytest.raises(ValueError, match="captured hidden states has 17 tokens but the token grid \\(1, 4, 4\\)"):
        reg(latents=latents, step=0)


def test_flux_with_pixels_lays_packed_tokens_on_the_frame_aspect():
    transformer = tm.tiny_flux().train()
    reg = CrepaRegularizer.from_config(BASE, transformer=transformer, encoder=tm.tiny_dinov2(), impl="reference")
    latents = _latents((2, 4, 4, 6))
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    tm.tiny_forward(transformer, latents)
    from_pixels = reg(pixels=pixels, step=1)[0]
    tm.tiny_forward(transformer, latents)
    explicit = reg(pixels=pixels, step=1, token_grid=(1, 2, 3))[0]
    assert torch.allclose(from_pixels, explicit)
    with pytest.raises(ValueError, match="disagrees"):
        tm.tiny_forward(transformer, latents)
        reg(latents=latents, step=1, token_grid=(1, 3, 2))


def test_backbone_mode_needs_no_encoder_or_vae_and_detaches_the_teacher():
    transformer = tm.tiny_wan(num_layers=4).train()
    reg = CrepaRegularizer.from_config({**BASE, "crepa_use_backbone_features": True, "crepa_teacher_block_index": 3},
                                       transformer=transformer, impl="reference")
    assert reg.encoder is None and (reg.projector.in_features, reg.projector.out_features) == (16, 16)
    latents = _latents()
    tm.tiny_forward(transformer, latents)
    loss, logs = reg(latents=latents, step=0)
    loss.backward()
    assert _block_grads(transformer.blocks) == [True, True, False, False]
    assert reg.frames_encoded == 0 and torch.isfinite(logs["crepa_alignment_score"])
    tm.tiny_forward(transformer, latents)
    assert torch.isfinite(reg(step=1)[0])                       # latents are optional in backbone mode
    with pytest.raises(ValueError, match="do not pass pixels"):
        tm.tiny_forward(transformer, latents)
        reg(pixels=torch.rand(2, 3, 3, 8, 8), step=2)


def test_backbone_mode_block_errors():
    with pytest.raises(CaptureError, match="hidden states not returned"):
        CrepaRegularizer.from_config({**BASE, "crepa_use_backbone_features": True, "crepa_teacher_block_index": 7},
                                     transformer=tm.tiny_wan())
    with pytest.raises(ValueError, match="crepa_teacher_block_index"):
        CrepaRegularizer.from_config({**BASE, "crepa_use_backbone_features": True, "crepa_teacher_block_index": 1},
                                     transformer=tm.tiny_wan())


@pytest.mark.parametrize("keys", [{"crepa_spatial_align": False}, {"crepa_encoder_tokens": "cls"},
                                  {"crepa_adjacent_distance": 2, "crepa_cumulative_neighbors": True,
                                   "crepa_normalize_neighbour_sum": True}])
def test_pooling_cls_and_neighbour_options(keys):
    reg, transformer, _ = _wan_reg(**keys)
    tm.tiny_forward(transformer, _latents())
    loss, logs = reg(latents=_latents(), step=0)
    loss.backward()
    assert torch.isfinite(loss) and reg.projector.linear.weight.grad.abs().sum() > 0
    if keys.get("crepa_normalize_neighbour_sum"):
        assert -1 <= logs["crepa_alignment_score"] <= 1


def test_step_cutoff_skips_decode_and_encode_but_touches_the_projector():
    reg, transformer, vae = _wan_reg(crepa_cutoff_step=2)
    decodes = []
    vae.register_forward_pre_hook(lambda *a: decodes.append(1))
    original_decode = vae.decode
    vae.decode = lambda *a, **k: decodes.append(1) or original_decode(*a, **k)
    tm.tiny_forward(transformer, _latents())
    reg(latents=_latents(), step=1)
    assert len(decodes) == 1 and reg.frames_encoded == 6
    tm.tiny_forward(transformer, _latents())
    loss, logs = reg(latents=_latents(), step=2)
    assert len(decodes) == 1 and reg.frames_encoded == 6 and not reg.capture.has_capture
    assert logs["crepa_weight"] == 0 and logs["crepa_cutoff"] == 1 and "crepa_alignment_score" not in logs
    loss.backward()
    grad = reg.projector.linear.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def _aligned_at_the_first_call(reg):
    """Negate the projector's output: the tiny models' first score, -0.075, becomes +0.075, above a
    threshold of 0.05 (a threshold must be > 0, so a score that exceeds one is made, not a threshold lowered)."""
    with torch.no_grad():
        reg.projector.linear.weight.neg_()
        reg.projector.linear.bias.neg_()
    return reg


def test_permanent_similarity_cutoff_stops_decoding_for_good():
    reg, transformer, _ = _wan_reg(crepa_similarity_threshold=0.05, crepa_similarity_ema_decay=0.5)
    _aligned_at_the_first_call(reg)
    tm.tiny_forward(transformer, _latents())
    loss, logs = reg(latents=_latents(), step=0)
    assert logs["crepa_weight"] == 0.5 and not reg.schedule.permanently_off   # step 0 ends at step 1's call
    for step in (1, 2):
        tm.tiny_forward(transformer, _latents())
        loss, logs = reg(latents=_latents(), step=step)
        assert logs["crepa_weight"] == 0 and logs["crepa_cutoff"] == 1 and reg.schedule.permanently_off
    assert reg.frames_encoded == 6
    assert "crepa_alignment_score_ema" in logs


def test_recoverable_similarity_cutoff_keeps_measuring():
    reg, transformer, _ = _wan_reg(crepa_similarity_threshold=0.05, crepa_threshold_mode="recoverable")
    _aligned_at_the_first_call(reg)
    for step in range(2):
        tm.tiny_forward(transformer, _latents())
        loss, logs = reg(latents=_latents(), step=step)
    assert logs["crepa_weight"] == 0 and logs["crepa_cutoff"] == 1 and reg.frames_encoded == 12
    assert loss.detach() == 0 and torch.isfinite(logs["crepa_alignment_score"])


def test_zero_weight_warmup_step_still_gives_the_projector_a_zero_gradient():
    reg, transformer, _ = _wan_reg(crepa_warmup_steps=10)
    tm.tiny_forward(transformer, _latents())
    loss, logs = reg(latents=_latents(), step=0)
    loss.backward()
    assert logs["crepa_weight"] == 0 and torch.count_nonzero(reg.projector.linear.weight.grad) == 0


def test_state_dict_resume_continues_the_schedule_exactly():
    keys = {"crepa_similarity_threshold": 1.2, "crepa_similarity_ema_decay": 0.5, "crepa_scheduler": "cosine",
            "crepa_warmup_steps": 2}
    first, transformer, _ = _wan_reg(**keys)
    for step in range(3):
        tm.tiny_forward(transformer, _latents(seed=step))
        first(latents=_latents(seed=step), step=step)
    state = first.state_dict()
    assert "_extra_state" in state and "projector.linear.weight" in state
    resumed, transformer2, _ = _wan_reg(**keys)
    transformer2.load_state_dict(transformer.state_dict())
    resumed.load_state_dict(state)
    assert resumed.schedule.ema == first.schedule.ema
    assert torch.equal(resumed.projector.linear.weight, first.projector.linear.weight)
    outputs = []
    for reg, model in ((first, transformer), (resumed, transformer2)):
        tm.tiny_forward(model, _latents(seed=9))
        loss, logs = reg(latents=_latents(seed=9), step=3)
        outputs.append((loss.detach(), logs["crepa_weight"], reg.schedule.ema, reg.schedule.weight(4)))
    assert outputs[0] == outputs[1]


def test_two_experts_share_one_projector():
    high, low = tm.tiny_wan().train(), tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config(BASE, transformer=[high, low], vae=tm.tiny_wan_vae(),
                                       encoder=tm.tiny_dinov2(), impl="reference")
    assert not hasattr(high, "crepa_projector") and not hasattr(low, "crepa_projector")
    for expert in (high, low):
        tm.tiny_forward(expert, _latents())
        reg(latents=_latents(), step=0)[0].backward()
        assert _block_grads(expert.blocks)[:2] == [True, True]


def test_config_from_a_json_trainer_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "crepa_scheduler": "linear", "max_train_steps": 50,
                                "learning_rate": 1e-4, "model_family": "wan"}))
    reg = CrepaRegularizer.from_config(str(path), transformer=tm.tiny_wan(), vae=tm.tiny_wan_vae(),
                                       encoder=tm.tiny_dinov2())
    assert reg.schedule.weight(50) == 0.0 and reg.schedule.weight(25) == pytest.approx(0.25)


def test_max_train_steps_can_be_set_after_construction():
    """diffusers trainers compute max_train_steps from epochs after accelerator.prepare(dataloader), after
    the regularizer is built: building needs no max_train_steps; the first call whose weight needs it
    raises (leaving nothing captured), and reg.set_max_train_steps sets it."""
    transformer = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config({**BASE, "crepa_scheduler": "cosine", "crepa_warmup_steps": 1},
                                       transformer=transformer, vae=tm.tiny_wan_vae(), encoder=tm.tiny_dinov2())
    tm.tiny_forward(transformer, _latents())
    assert reg(latents=_latents(), step=0)[1]["crepa_weight"] == 0.0       # warmup: needs no max_train_steps
    tm.tiny_forward(transformer, _latents())
    with pytest.raises(ValueError, match=r"step 1 .*needs max_train_steps.*reg.set_max_train_steps\(n\)"):
        reg(latents=_latents(), step=1)
    assert not reg.capture.has_capture
    reg.set_max_train_steps(21)
    tm.tiny_forward(transformer, _latents())
    loss, logs = reg(latents=_latents(), step=11)                         # halfway through the cosine decay
    assert logs["crepa_weight"].item() == pytest.approx(0.25) and torch.isfinite(loss)


def test_encoder_config_keys_reach_the_encoder():
    reg, transformer, _ = _wan_reg(crepa_encoder_frames_batch_size=2, crepa_encoder_dtype="bfloat16")
    calls = []
    reg.encoder.model.register_forward_hook(lambda *a: calls.append(1))
    tm.tiny_forward(transformer, _latents())
    loss, _ = reg(latents=_latents(), step=0)
    assert len(calls) == 3 and next(reg.encoder.model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(loss)


def test_drop_vae_encoder_key():
    vae = tm.tiny_wan_vae()
    reg, transformer, _ = _wan_reg(vae=vae, crepa_drop_vae_encoder=True)
    assert getattr(vae, "encoder", None) is None
    tm.tiny_forward(transformer, _latents())
    assert torch.isfinite(reg(latents=_latents(), step=0)[0])


def test_detach_restores_the_transformer():
    reg, transformer, _ = _wan_reg()
    latents = _latents()
    with torch.no_grad():
        hooked = tm.tiny_forward(transformer, latents)
    reg.detach()
    with torch.no_grad():
        assert torch.equal(tm.tiny_forward(transformer, latents), hooked)
    with pytest.raises(CaptureError, match="no hidden states captured"):
        reg(latents=latents, step=0)


def test_default_impl_auto():
    reg, transformer, _ = _wan_reg(impl="auto")
    tm.tiny_forward(transformer, _latents())
    auto, _ = reg(latents=_latents(), step=0)
    reg.impl = "reference"
    tm.tiny_forward(transformer, _latents())
    reference, _ = reg(latents=_latents(), step=0)
    assert torch.allclose(auto, reference, atol=1e-5)


def test_facade_errors():
    with pytest.raises(ValueError, match=r"crepa_enabled is false: CrepaRegularizer.from_config\(...\) gives a no-op"):
        CrepaRegularizer(CrepaConfig.from_dict({**BASE, "crepa_enabled": False}), transformer=tm.tiny_wan())
    with pytest.raises(TypeError, match="CrepaConfig, a dict or a path"):
        CrepaRegularizer.from_config(3, transformer=tm.tiny_wan())
    with pytest.raises(ValueError, match="UrepaRegularizer"):
        CrepaRegularizer.from_config(BASE, transformer=tm.tiny_unet(), encoder=tm.tiny_dinov2())
    with pytest.raises(ValueError, match="needs the tiny video decoder"):
        CrepaRegularizer.from_config({**BASE, "crepa_use_tae": True}, transformer=tm.tiny_wan(),
                                     vae=tm.tiny_wan_vae(), encoder=tm.tiny_dinov2())
    with pytest.raises(ValueError, match="impl='gpu' is not valid"):
        CrepaRegularizer.from_config(BASE, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2(), impl="gpu")
    with pytest.raises(TypeError, match="hidden_size must be a positive integer"):
        CrepaRegularizer.from_config(BASE, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2(), hidden_size="16")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        CrepaRegularizer.from_config(BASE, transformer=tm.tiny_wan(), encoder=tm.tiny_dinov2(), hidden_size=-3)
    reg, transformer, _ = _wan_reg()
    latents = _latents()
    with pytest.raises(TypeError, match="latents must be a floating-point tensor"):
        reg(latents=latents.long(), step=0)
    with pytest.raises(ValueError, match="token_grid must be"):
        tm.tiny_forward(transformer, latents)
        reg(latents=latents, step=0, token_grid=(3, 4))
    with pytest.raises(CaptureError, match="run the model's forward"):
        reg(latents=latents, step=0)
    with pytest.raises(ValueError, match="exactly one of"):
        reg(step=0)
    with pytest.raises(ValueError, match="exactly one of"):
        reg(latents=latents, pixels=torch.rand(2, 5, 3, 16, 24), step=0)
    tm.tiny_forward(transformer, latents)
    with pytest.raises(ValueError, match="token grid"):
        reg(latents=_latents((2, 4, 3, 4, 8)), step=0)
    tm.tiny_forward(transformer, latents)
    with pytest.raises(ValueError, match="batch size 1"):
        reg(pixels=torch.rand(1, 5, 3, 16, 24), step=0)
    tm.tiny_forward(transformer, latents)
    with pytest.raises(ValueError, match="width 8"):
        reg(teacher_features=torch.rand(2, 3, 15, 8), step=0)
    tm.tiny_forward(transformer, latents)
    with pytest.raises(TypeError, match="step"):
        reg(latents=latents, step=1.5)
    no_vae = CrepaRegularizer.from_config(BASE, transformer=transformer.__class__.from_config(transformer.config),
                                          encoder=tm.tiny_dinov2())
    tm.tiny_forward(no_vae.capture.models[0], latents)
    with pytest.raises(ValueError, match="no VAE"):
        no_vae(latents=latents, step=0)


def test_reentrant_checkpointing_is_refused_through_the_regularizer():
    import functools

    import torch.utils.checkpoint

    reg, transformer, _ = _wan_reg()
    transformer.enable_gradient_checkpointing(
        gradient_checkpointing_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    with pytest.raises(CaptureError, match="non-reentrant"):
        tm.tiny_forward(transformer, _latents())


def test_a_training_forward_run_without_grad_is_refused():
    reg, transformer, _ = _wan_reg()
    with torch.no_grad():
        tm.tiny_forward(transformer, _latents())
    with pytest.raises(CaptureError, match="without gradient"):
        reg(latents=_latents(), step=0)
    transformer.eval()
    with torch.no_grad():                       # validation: forward and regularizer both without grad
        tm.tiny_forward(transformer, _latents())
        loss, logs = reg(latents=_latents(), step=0)
    assert torch.isfinite(loss) and not loss.requires_grad


def test_peft_lora_freezing_the_model_leaves_the_projector_trainable():
    """PEFT's add_adapter freezes every non-adapter parameter of the model; the projector is not in the model."""
    peft = pytest.importorskip("peft")
    reg, transformer, _ = _wan_reg()
    transformer.requires_grad_(False)
    transformer.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"]))
    tm.tiny_forward(transformer, _latents())
    reg(latents=_latents(), step=0)[0].backward()
    assert reg.projector.linear.weight.grad is not None and reg.projector.linear.weight.grad.abs().sum() > 0
    assert not any("projector" in k for k in peft.get_peft_model_state_dict(transformer))


def test_the_similarity_ema_counts_optimizer_steps_under_gradient_accumulation():
    """accelerate's `accumulate` with gradient_accumulation_steps=2: four micro-batches are two optimizer
    steps and two EMA updates (four before), each with the mean of the step's scores; validation calls
    (eval mode, no grad) at the step just taken change nothing; `end_step()` ends the last step."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState
    transformer = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config({**BASE, "crepa_similarity_ema_decay": 0.5}, transformer=transformer,
                                       encoder=tm.tiny_dinov2(), impl="reference")
    parameters = list({id(p): p for p in [*transformer.parameters(), *reg.parameters()]}.values())
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    try:
        model, optimizer = accelerator.prepare(transformer, torch.optim.SGD(parameters, lr=0.3))
        global_step, scores, logged, states = 0, [], [], []
        for micro_batch in range(4):
            with accelerator.accumulate(model):
                latents = _latents(seed=micro_batch)
                pred = tm.tiny_forward(model, latents)
                features = torch.randn(2, 3, 15, 16, generator=torch.Generator().manual_seed(micro_batch))
                loss, logs = reg(teacher_features=features, step=global_step)
                accelerator.backward(pred.square().mean() + loss)
                optimizer.step()
                optimizer.zero_grad()
            scores.append(logs["crepa_alignment_score"].item())
            logged.append(logs["crepa_alignment_score_ema"].item())
            if accelerator.sync_gradients:
                global_step += 1
                states.append(reg.schedule.state_dict())
                model.eval()
                with torch.no_grad():                    # validation at the new step: not a training call
                    tm.tiny_forward(model, _latents(seed=9))
                    reg(teacher_features=features, step=global_step)
                model.train()
                assert reg.schedule.state_dict() == states[-1]
    finally:
        AcceleratorState._reset_state(True)
    first, second = (scores[0] + scores[1]) / 2, (scores[2] + scores[3]) / 2
    assert global_step == 2 and len(set(scores)) == 4
    assert [state["num_updates"] for state in states] == [0, 1]   # step 0 ends at step 1's first call
    assert reg.schedule.ema == pytest.approx(first)
    assert logged[1] == pytest.approx(first) and logged[3] == pytest.approx(0.5 * first + 0.5 * second, abs=1e-6)
    reg.end_step()
    assert reg.schedule.ema == pytest.approx(0.5 * first + 0.5 * second)
    assert reg.schedule.state_dict()["num_updates"] == 2


def test_a_disabled_regularizer_takes_the_trainer_calls_of_a_working_one():
    """set_max_train_steps and end_step are in a trainer's loop whether the flag is on or off."""
    reg = CrepaRegularizer.from_config({**BASE, "crepa_enabled": False, "crepa_scheduler": "cosine"},
                                       transformer=tm.tiny_wan())
    reg.set_max_train_steps(100)
    reg.end_step()
    with pytest.raises(ValueError, match="max_train_steps must be an integer >= 0 or None, got -1"):
        reg.set_max_train_steps(-1)
