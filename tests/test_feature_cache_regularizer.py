"""CrepaRegularizer with a teacher-feature cache on the tiny Wan (VAE, DINOv2, transformer).

- A hit gives the live features rounded to the storage dtype: with float32 storage the loss of a hit
  equals the loss of the live (miss) call; with bfloat16 it is within bf16 rounding; and it equals a
  `teacher_features=` call with the stored features exactly.
- The second epoch of a tiny training run calls neither `vae.decode` nor the encoder (counted by
  wrapping them, not by the regularizer's own counters).
- A changed encoder (weights), image size, VAE or augmentation in the key misses.
- A hit whose grid disagrees with the call's is a miss with a warning; a half-cached batch decodes and
  encodes only its missing samples.
- Precompute from latents, then training: no decode at all.
- Bad uses are clear errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer

BASE = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16}
SHAPE = (1, 4, 3, 4, 6)   # B, C, F, H, W: 3 latent frames -> 5 pixel frames of 16 x 24


def latents_for(sample: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sample))


class Counted:
    """Counts calls of vae.decode and of the encoder model's forward."""

    def __init__(self, vae, encoder_model):
        self.decodes = self.encoder_forwards = 0
        decode = vae.decode

        def counted_decode(*args, **kwargs):
            self.decodes += 1
            return decode(*args, **kwargs)

        vae.decode = counted_decode
        encoder_model.register_forward_pre_hook(lambda *_: setattr(self, "encoder_forwards",
                                                                   self.encoder_forwards + 1))


def build(root, *, transformer=None, vae=None, encoder=None, dtype="bfloat16", **keys):
    transformer = transformer if transformer is not None else tm.tiny_wan().train()
    vae = vae if vae is not None else tm.tiny_wan_vae()
    encoder = encoder if encoder is not None else tm.tiny_dinov2()
    reg = CrepaRegularizer.from_config({**BASE, **keys}, transformer=transformer, vae=vae, encoder=encoder,
                                       max_train_steps=1000, impl="reference", feature_cache=root,
                                       feature_cache_dtype=dtype)
    return reg, transformer, vae, Counted(vae, reg.encoder.model)


def call(reg, transformer, latents, step=0, **inputs):
    tm.tiny_forward(transformer, latents)
    teacher_input = {} if "teacher_features" in inputs else {"latents": latents}
    loss, _ = reg(**teacher_input, **inputs, step=step)
    return loss


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_a_hit_equals_the_live_features_to_the_storage_rounding(tmp_path, dtype, tolerance):
    reg, transformer, _, counted = build(tmp_path, dtype=dtype)
    latents = latents_for(0)
    with torch.no_grad():
        live = call(reg, transformer, latents, cache_keys=["clip-0"])
        hit = call(reg, transformer, latents, cache_keys=["clip-0"])
        entry = reg.feature_cache("latents").get("clip-0")
        features = entry.features.float().flatten(1, 2).unsqueeze(0)
        given = call(reg, transformer, latents, teacher_features=features)
    assert counted.decodes == 1 and counted.encoder_forwards == 1
    assert torch.equal(hit, given)
    assert torch.allclose(hit, live, rtol=tolerance, atol=tolerance * abs(float(live)))
    if dtype == "bfloat16":
        assert not torch.equal(hit, live)   # the rounding is real, so the tolerance above is not vacuous


def test_the_second_epoch_decodes_and_encodes_nothing(tmp_path):
    reg, transformer, _, counted = build(tmp_path)
    optimizer = torch.optim.SGD([p for p in transformer.parameters() if p.requires_grad], lr=1e-3)
    samples = [(f"clip-{i}", latents_for(i, (2,) + SHAPE[1:])) for i in range(3)]
    per_epoch = []
    for epoch in range(2):
        before = (counted.decodes, counted.encoder_forwards)
        for step, (key, latents) in enumerate(samples):
            loss = call(reg, transformer, latents, step=epoch * 3 + step, cache_keys=[f"{key}-a", f"{key}-b"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        reg.flush_feature_cache()
        per_epoch.append((counted.decodes - before[0], counted.encoder_forwards - before[1]))
    assert per_epoch == [(3, 3), (0, 0)]
    assert reg.frames_decoded == 3 * 2 * 5 and reg.frames_encoded == 3 * 2 * 3


def test_a_changed_encoder_size_vae_or_augmentation_misses(tmp_path):
    latents = latents_for(0)
    reg, transformer, vae, counted = build(tmp_path)
    call(reg, transformer, latents, cache_keys=[{"id": 0, "flip": False}])
    call(reg, transformer, latents, cache_keys=[{"flip": False, "id": 0}])
    assert counted.decodes == 1
    call(reg, transformer, latents, cache_keys=[{"id": 0, "flip": True}])
    assert counted.decodes == 2
    reg.flush_feature_cache()   # other regularizers (processes) see written shards only
    other_weights = tm.tiny_dinov2()
    with torch.no_grad():
        other_weights.embeddings.patch_embeddings.projection.weight[0, 0, 0, 0] += 0.5
    cases = {"encoder weights": dict(encoder=other_weights), "image size": dict(crepa_encoder_image_size=24),
             "vae": dict(vae=tm.tiny_wan_vae())}
    with torch.no_grad():
        next(cases["vae"]["vae"].parameters()).mul_(1.01)
    for what, change in cases.items():
        other, other_transformer, _, other_counted = build(tmp_path, transformer=tm.tiny_wan().train(), **change)
        call(other, other_transformer, latents, cache_keys=[{"id": 0, "flip": False}])
        assert other_counted.decodes == 1, what
    same, same_transformer, _, same_counted = build(tmp_path, transformer=tm.tiny_wan().train())
    call(same, same_transformer, latents, cache_keys=[{"id": 0, "flip": False}])
    assert same_counted.decodes == 0   # the first run's entry, read from disk by another regularizer


def test_a_grid_mismatch_is_a_warned_miss_and_half_cached_batches_compute_half(tmp_path):
    reg, transformer, _, counted = build(tmp_path)
    call(reg, transformer, latents_for(0), cache_keys=["a"])
    with pytest.warns(RuntimeWarning, match=r"cached with the student token grid \(3, 2, 3\).*this call has \(3, 3, 3\)"):
        call(reg, transformer, latents_for(0, (1, 4, 3, 6, 6)), cache_keys=["a"])
    assert counted.decodes == 2
    batch = torch.cat([latents_for(0), latents_for(1)])
    before = reg.frames_decoded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(reg, transformer, batch, cache_keys=["a", "b"])
    assert reg.frames_decoded - before == 5   # only "b" was decoded
    hit_both = call(reg, transformer, batch, cache_keys=["a", "b"])
    entries = [reg.feature_cache("latents").get(k).features.float().flatten(1, 2) for k in ("a", "b")]
    assert torch.equal(hit_both, call(reg, transformer, batch, teacher_features=torch.stack(entries)))


def test_precomputed_latents_train_without_a_decode(tmp_path):
    reg, transformer, _, counted = build(tmp_path)
    samples = [(f"clip-{i}", latents_for(i)[0]) for i in range(3)]
    report = reg.precompute_teacher_features(samples, source="latents", progress=False)
    assert (report.computed, report.skipped) == (3, 0) and counted.decodes == 3
    again = reg.precompute_teacher_features(samples, source="latents", progress=False)
    assert (again.computed, again.skipped) == (0, 3) and counted.decodes == 3
    trainer, trainer_transformer, _, trainer_counted = build(tmp_path, transformer=tm.tiny_wan().train())
    for key, latents in samples:
        call(trainer, trainer_transformer, latents[None], cache_keys=[key])
    assert (trainer_counted.decodes, trainer_counted.encoder_forwards) == (0, 0)


def test_bad_uses_are_clear_errors(tmp_path):
    reg, transformer, _, _ = build(tmp_path)
    with pytest.raises(ValueError, match="cache_keys has 2 keys but the batch has 1 samples"):
        call(reg, transformer, latents_for(0), cache_keys=["a", "b"])
    with pytest.raises(TypeError, match="cache_keys must be a list with one key per sample"):
        call(reg, transformer, latents_for(0), cache_keys="a")
    with pytest.raises(ValueError, match="feature_cache_dtype must be one of bfloat16, float16, float32, got 'int8'"):
        build(tmp_path, dtype="int8")
    plain = CrepaRegularizer.from_config(BASE, transformer=tm.tiny_wan().train(), vae=tm.tiny_wan_vae(),
                                         encoder=tm.tiny_dinov2(), max_train_steps=10, impl="reference")
    with pytest.raises(ValueError, match="cache_keys= needs a feature cache: build the regularizer with feature_cache="):
        call(plain, plain.capture.models[0], latents_for(0), cache_keys=["a"])
    with pytest.raises(ValueError, match="backbone mode .* has no encoder to cache"):
        CrepaRegularizer.from_config({**BASE, "crepa_use_backbone_features": True, "crepa_teacher_block_index": 2},
                                     transformer=tm.tiny_wan().train(), max_train_steps=10, feature_cache=tmp_path)


def test_urepa_serves_hits_and_precomputed_entries_without_a_decode(tmp_path):
    from repa_kernels.regularizer import UrepaRegularizer

    unet, vae = tm.tiny_unet().train(), tm.tiny_image_vae()
    reg = UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_encoder_image_size": 16}, unet=unet, vae=vae,
                                       encoder=tm.tiny_dinov2(), max_train_steps=100, impl="reference",
                                       feature_cache=tmp_path)
    counted = Counted(vae, reg.encoder.model)
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    report = reg.precompute_teacher_features([("image-1", latents[1])], progress=False)   # stored without a grid
    assert report.computed == 1 and counted.decodes == 1
    losses = []
    for _ in range(2):
        tm.tiny_forward(unet, latents)
        losses.append(reg(latents=latents, cache_keys=["image-0", "image-1"], step=0)[0])
    assert (counted.decodes, counted.encoder_forwards) == (2, 2)   # image-0 once; image-1 never at training time
    assert torch.allclose(losses[0], losses[1], rtol=2e-2)
