"""Latent decoding with each VAE class's pipeline denormalisation, tiny decoders, dropping the encoder
(docs/contract.md §7)."""

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer.vae import LatentDecoder, denormalizer_for, drop_vae_encoder

MEAN = torch.tensor([0.1, -0.2, 0.3, -0.4])
STD = torch.tensor([1.5, 0.5, 2.0, 1.0])


def _z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _frames(decoded):
    """What the decoder must return for a diffusers decode output (B, 3, [F,] H, W) in [-1, 1]."""
    if decoded.dim() == 4:
        decoded = decoded.unsqueeze(2)
    return (decoded.permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0, 1)


def test_wan_decode_matches_the_wan_pipeline():
    vae = tm.tiny_wan_vae()
    z = _z(2, 4, 3, 4, 6)
    with torch.no_grad():   # WanPipeline: latents / (1 / std) + mean, from the config lists
        expected = _frames(vae.decode(z / (1.0 / STD.view(1, 4, 1, 1, 1)) + MEAN.view(1, 4, 1, 1, 1)).sample)
    frames = LatentDecoder(vae=vae, video=True).decode(z)
    assert frames.shape == (2, 5, 3, 16, 24)              # causal: 2 * (3 - 1) + 1 frames
    assert torch.allclose(frames, expected, atol=1e-5)
    assert frames.min() >= 0 and frames.max() <= 1


def test_ltx_decode_uses_buffers_scaling_and_a_zero_decode_timestep():
    vae = tm.tiny_ltx_vae()
    z = _z(1, 4, 3, 4, 6)
    den = denormalizer_for(vae)(z)
    assert torch.allclose(den, z * STD.view(1, 4, 1, 1, 1) / 0.5 + MEAN.view(1, 4, 1, 1, 1))
    with torch.no_grad():
        expected = _frames(vae.decode(den, torch.zeros(1)).sample)
    assert torch.allclose(LatentDecoder(vae=vae, video=True).decode(z), expected, atol=1e-5)
    vae.__class__ = type("MyLTXVideoVAE", (type(vae),), {})   # a trainer's subclass: same rules, temb too
    assert torch.allclose(LatentDecoder(vae=vae, video=True).decode(z), expected, atol=1e-5)


def test_hunyuan_and_dc_divide_by_the_scaling_factor():
    hunyuan = tm.tiny_hunyuan_vae()
    z = _z(1, 4, 2, 2, 3)
    assert torch.allclose(denormalizer_for(hunyuan)(z), z / hunyuan.config.scaling_factor)
    with torch.no_grad():
        expected = _frames(hunyuan.decode(z / hunyuan.config.scaling_factor).sample)
    assert torch.allclose(LatentDecoder(vae=hunyuan, video=True).decode(z), expected, atol=1e-5)
    dc = tm.tiny_dc_vae()
    z = _z(1, 4, 4, 6)
    assert torch.allclose(denormalizer_for(dc)(z), z / 0.4)
    frames = LatentDecoder(vae=dc, video=False).decode(z)
    assert frames.shape == (1, 1, 3, 8, 12)


def test_autoencoder_kl_rules_shift_no_shift_and_mean_std():
    z = _z(1, 4, 4, 6)
    assert torch.allclose(denormalizer_for(tm.tiny_image_vae(0.5, 0.25))(z), z / 0.5 + 0.25)
    assert torch.allclose(denormalizer_for(tm.tiny_image_vae(0.5, None))(z), z / 0.5)
    vae = tm.tiny_image_vae(0.5, None, latents_mean=MEAN.tolist(), latents_std=STD.tolist())
    assert torch.allclose(denormalizer_for(vae)(z), z * STD.view(1, 4, 1, 1) / 0.5 + MEAN.view(1, 4, 1, 1))
    tiny = tm.tiny_image_tae()
    assert torch.allclose(denormalizer_for(tiny)(z), z / tiny.config.scaling_factor + tiny.config.shift_factor)
    vae = tm.tiny_image_vae()
    with torch.no_grad():
        expected = _frames(vae.decode(z / 0.5 + 0.25).sample)
    assert torch.allclose(LatentDecoder(vae=vae, video=False).decode(z), expected, atol=1e-5)


def test_unknown_vae_needs_a_denormalize_callable():
    class MyVAE(torch.nn.Module):
        def decode(self, z):
            return (torch.tanh(z[:, :3]),)

    with pytest.raises(ValueError, match="denormalize="):
        LatentDecoder(vae=MyVAE(), video=False)
    decoder = LatentDecoder(vae=MyVAE(), denormalize=lambda z: z * 2, video=False)
    z = _z(1, 4, 4, 6)
    assert torch.allclose(decoder.decode(z), _frames(torch.tanh(2 * z[:, :3])))
    with pytest.raises(TypeError, match="callable"):
        LatentDecoder(vae=MyVAE(), denormalize=3, video=False)


def test_tae_for_video_needs_a_module_and_uses_the_vae_rule():
    with pytest.raises(ValueError, match="tae=") as info:
        LatentDecoder(vae=tm.tiny_wan_vae(), use_tae=True, video=True)
    assert "no video tiny autoencoder" in str(info.value)
    seen = {}

    def tiny_video_decoder(z):   # what a wrapped TAEHV looks like
        seen["z"] = z
        return torch.tanh(z[:, :3])

    vae = tm.tiny_wan_vae()
    z = _z(1, 4, 3, 2, 2)
    frames = LatentDecoder(vae=vae, tae=tiny_video_decoder, use_tae=True, video=True).decode(z)
    assert frames.shape == (1, 3, 3, 2, 2)
    assert torch.allclose(seen["z"], z * STD.view(1, 4, 1, 1, 1) + MEAN.view(1, 4, 1, 1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="denormalize="):
        LatentDecoder(tae=tiny_video_decoder, use_tae=True, video=True)


def test_tae_for_images_is_an_autoencoder_tiny_with_its_own_rule():
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        LatentDecoder(vae=tm.tiny_image_vae(), use_tae=True, video=False)
    tae = tm.tiny_image_tae()
    z = _z(2, 4, 4, 6)
    frames = LatentDecoder(vae=tm.tiny_image_vae(), tae=tae, use_tae=True, video=False).decode(z)
    with torch.no_grad():
        expected = _frames(tae.decode(z / tae.config.scaling_factor + tae.config.shift_factor).sample)
    assert frames.shape == (2, 1, 3, 8, 12) and torch.allclose(frames, expected, atol=1e-5)


def test_decode_errors_without_vae_and_on_channel_mismatch():
    with pytest.raises(ValueError, match="vae="):
        LatentDecoder(video=True).decode(_z(1, 4, 3, 2, 2))
    with pytest.raises(ValueError, match="8 channels .* expects 4"):
        LatentDecoder(vae=tm.tiny_wan_vae(), video=True).decode(_z(1, 8, 3, 2, 2))


def test_drop_vae_encoder_keeps_decoding():
    vae = tm.tiny_image_vae()
    z = _z(1, 4, 4, 6)
    before = LatentDecoder(vae=vae, video=False).decode(z)
    assert drop_vae_encoder(vae)
    assert getattr(vae, "encoder", None) is None
    assert torch.equal(LatentDecoder(vae=vae, video=False).decode(z), before)
    assert not drop_vae_encoder(vae)          # already gone: nothing to do


def test_decode_runs_without_grad_in_the_vae_dtype():
    vae = tm.tiny_image_vae().to(torch.bfloat16)
    z = _z(1, 4, 4, 6).requires_grad_()
    frames = LatentDecoder(vae=vae, video=False).decode(z)
    assert frames.dtype == torch.float32 and not frames.requires_grad


# ---- the VAEs of the Flux2, Qwen-Image, LTX-2 and HunyuanVideo 1.5 pipelines ------------------------------

def test_flux2_decode_undoes_the_batch_norm_and_the_2x2_patchify_like_its_pipeline():
    import tiny_families as tf
    vae = tf.tiny_flux2_vae()
    z = _z(2, 16, 3, 4)                       # what Flux2Pipeline packs: (B, 4C, H/2, W/2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    x = z * std + mean                        # Flux2Pipeline: latents * bn_std + bn_mean, then unpatchify
    x = x.reshape(2, 4, 2, 2, 3, 4).permute(0, 1, 4, 2, 5, 3).reshape(2, 4, 6, 8)
    with torch.no_grad():
        expected = _frames(vae.decode(x).sample)
    frames = LatentDecoder(vae=vae, video=False).decode(z)
    assert frames.shape == (2, 1, 3, 12, 16) and torch.allclose(frames, expected, atol=1e-5)
    with pytest.raises(ValueError, match="latents have 4 channels but AutoencoderKLFlux2 expects 16"):
        LatentDecoder(vae=vae, video=False).decode(_z(2, 4, 6, 8))


def test_qwen_image_decodes_image_latents_as_one_frame_with_the_config_mean_and_std():
    import tiny_families as tf
    vae = tf.tiny_qwen_image_vae()
    z = _z(2, 4, 4, 6)
    with torch.no_grad():   # QwenImagePipeline: latents / (1 / std) + mean on (B, C, 1, H, W), frame 0 kept
        expected = _frames(vae.decode((z / (1.0 / STD.view(1, 4, 1, 1)) + MEAN.view(1, 4, 1, 1)).unsqueeze(2))
                           .sample[:, :, 0])
    frames = LatentDecoder(vae=vae, video=False).decode(z)
    assert frames.shape == (2, 1, 3, 8, 12) and torch.allclose(frames, expected, atol=1e-5)
    assert torch.allclose(LatentDecoder(vae=vae, video=False).decode(z.unsqueeze(2)), expected, atol=1e-5)


def test_ltx2_decode_uses_buffers_scaling_and_a_zero_decode_timestep():
    import tiny_families as tf
    vae = tf.tiny_ltx2_vae()
    z = _z(1, 4, 3, 4, 6)
    den = z * STD.view(1, 4, 1, 1, 1) / 0.5 + MEAN.view(1, 4, 1, 1, 1)
    assert torch.allclose(denormalizer_for(vae)(z), den)
    with torch.no_grad():
        expected = _frames(vae.decode(den, torch.zeros(1)).sample)
    assert torch.allclose(LatentDecoder(vae=vae, video=True).decode(z), expected, atol=1e-5)


def test_hunyuan_video15_divides_by_the_scaling_factor():
    import tiny_families as tf
    vae = tf.tiny_hunyuan_video15_vae()
    z = _z(2, 4, 2, 4, 6)
    with pytest.raises(RuntimeError):    # diffusers' own batched decode fails (its causal mask broadcast)
        with torch.no_grad():
            vae.decode(z / 0.5)
    with torch.no_grad():                # so the samples are decoded one at a time
        expected = _frames(torch.cat([vae.decode(z[i:i + 1] / 0.5).sample for i in range(2)]))
    assert torch.allclose(LatentDecoder(vae=vae, video=True).decode(z), expected, atol=1e-5)


@pytest.mark.parametrize("build, latents_shape", [(tm.tiny_wan_vae, (2, 4, 4, 4, 6)), (tm.tiny_wan22_vae, (1, 4, 4, 2, 3))],
                         ids=["wan2.1", "wan2.2"])
def test_a_wan_vae_decodes_a_causal_prefix_exactly(build, latents_shape):
    """Context parallelism decodes only the latent prefix a rank's frames need: for every pixel frame p,
    the prefix causal_prefix names decodes frames 0..p bit for bit as the whole clip's decode does."""
    decoder = LatentDecoder(vae=build(), video=True)
    latents = torch.randn(*latents_shape, generator=torch.Generator().manual_seed(3))
    total, latent_frames_for = decoder.causal_prefix(latents)
    whole = decoder.decode(latents)
    assert whole.shape[1] == total
    for frame in range(total):
        count = latent_frames_for(frame)
        prefix = decoder.decode(latents[:, :, :count])
        assert frame < prefix.shape[1]
        assert torch.equal(prefix, whole[:, :prefix.shape[1]])
        if count > 1:   # the prefix is the shortest: one latent frame fewer does not reach frame p
            assert decoder.decode(latents[:, :, :count - 1]).shape[1] <= frame


def test_only_frame_by_frame_causal_decoders_decode_a_prefix():
    latents = torch.randn(1, 4, 3, 4, 4)
    assert LatentDecoder(vae=tm.tiny_ltx_vae(), video=True).causal_prefix(latents) is None   # not causal
    assert LatentDecoder(decode=lambda z: torch.zeros(1, 5, 3, 8, 8), video=True).causal_prefix(latents) is None
    assert LatentDecoder(vae=tm.tiny_wan_vae(), video=True).causal_prefix(latents[:, :, 0]) is None   # images
