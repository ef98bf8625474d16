"""The tiny models of `repa-kernels demo`: a video transformer, its VAE and a DINOv2 teacher.

All are the real diffusers / transformers classes with configurations small enough to train on a
laptop CPU in seconds per step; weights are random, drawn from a fixed seed. Shapes (defaults):

- clips (B, 3, 9, 48, 48) pixels -> VAE (spatial ratio 4, causal temporal ratio 2) ->
  latents (B, 8, 5, 12, 12), normalised per channel with the dataset's own mean and std (stored in
  the VAE config / buffers, where the regularizer's denormalisation reads them);
- Wan: patch (1, 2, 2) -> a 5 x 6 x 6 token grid; LTX-Video: patch 1, packed -> 5 x 12 x 12 tokens;
  hidden size 32, 4 blocks;
- DINOv2: patch 4, hidden 32, 2 layers; at 24 x 24 pixels per frame it gives 6 x 6 patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LATENT_CHANNELS = 8
TEXT_DIM = 16
TEXT_TOKENS = 4
HIDDEN_HEADS = 2
HEAD_DIM = 16
NUM_BLOCKS = 4
STUDENT_BLOCK = 1          # crepa_block_index
TEACHER_BLOCK = 3          # crepa_teacher_block_index in backbone mode
ENCODER_GRID_SIDE = 6      # patch tokens per side the encoder should see (the Wan student grid side)
FAMILIES = ("wan", "ltx")


@dataclass
class VideoModels:
    """The trained transformer, its frozen VAE, and the family name ("wan" or "ltx")."""

    family: str
    transformer: nn.Module
    vae: nn.Module

    @property
    def transformer_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def build_video_models(family: str, seed: int) -> VideoModels:
    """A tiny transformer (train mode) and VAE (eval, frozen) of `family`, random weights from `seed`."""
    if family == "wan":
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        transformer = _seeded(seed, lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=HIDDEN_HEADS, attention_head_dim=HEAD_DIM,
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=32,
            ffn_dim=4 * HIDDEN_HEADS * HEAD_DIM, num_layers=NUM_BLOCKS, rope_max_seq_len=64))
        vae = _seeded(seed + 1, lambda: AutoencoderKLWan(
            base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True], latents_mean=[0.0] * LATENT_CHANNELS,
            latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=2, scale_factor_spatial=4))
    elif family == "ltx":
        from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
        transformer = _seeded(seed, lambda: LTXVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1, patch_size_t=1,
            num_attention_heads=HIDDEN_HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=HIDDEN_HEADS * HEAD_DIM,
            num_layers=NUM_BLOCKS, caption_channels=TEXT_DIM))
        vae = _seeded(seed + 1, lambda: AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8),
            down_block_types=("LTXVideoDownBlock3D",) * 3, decoder_block_out_channels=(8, 8, 8),
            layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, False, False), decoder_spatio_temporal_scaling=(True, False, False),
            decoder_inject_noise=(False,) * 4, downsample_type=("conv",) * 3, upsample_residual=(False,) * 3,
            upsample_factor=(1,) * 3, patch_size=2, patch_size_t=1))
    else:
        raise ValueError(f"model family {family!r} is not a demo family; valid: {', '.join(FAMILIES)}")
    vae.eval().requires_grad_(False)
    transformer.train()
    return VideoModels(family, transformer, vae)


def build_random_dinov2(seed: int, patch_size: int = 4) -> nn.Module:
    """A randomly initialised transformers `Dinov2Model` (hidden 32, 2 layers, patch 4)."""
    from transformers import Dinov2Config, Dinov2Model
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=patch_size * ENCODER_GRID_SIDE, patch_size=patch_size)
    return _seeded(seed + 2, lambda: Dinov2Model(config)).eval().requires_grad_(False)


@torch.no_grad()
def encode_to_latents(vae: nn.Module, clips: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, 3, F, H, W) in [-1, 1] -> raw latents (N, C, F', H', W') (the posterior mode), in chunks."""
    chunks = [vae.encode(clips[i:i + batch_size]).latent_dist.mode() for i in range(0, clips.shape[0], batch_size)]
    return torch.cat(chunks)


def normalise_latents(vae: nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """Store the per-channel mean/std of `raw` where the family's pipeline reads them and return the
    normalised latents the transformer trains on (what a real VAE's published statistics do).

    Wan: z = (x - latents_mean) / latents_std (config lists); LTX: z = (x - mean) * scaling / std (buffers).
    """
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)
    name = type(vae).__name__
    if name == "AutoencoderKLWan":
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        scale = 1.0
    elif name == "AutoencoderKLLTXVideo":
        vae.latents_mean.copy_(mean)
        vae.latents_std.copy_(std)
        scale = float(vae.config.scaling_factor)
    else:
        raise ValueError(f"normalise_latents does not know the VAE class {name}")
    view = (1, -1, 1, 1, 1)
    return (raw - mean.view(view)) * scale / std.view(view)


def caption_embedding(batch: int, seed: int) -> torch.Tensor:
    """A fixed random 'caption' (B, TEXT_TOKENS, TEXT_DIM): the demo has no text encoder."""
    generator = torch.Generator().manual_seed(seed + 3)
    return torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator).expand(batch, -1, -1)


def predict_velocity(models: VideoModels, noisy: torch.Tensor, sigmas: torch.Tensor,
                     caption: torch.Tensor) -> torch.Tensor:
    """One transformer forward on unpacked latents (B, C, F, H, W) at noise levels sigmas (B,) in [0, 1],
    called the way the family's diffusers pipeline calls it (timestep = 1000 * sigma); returns the
    prediction in the same unpacked layout."""
    timestep = sigmas * 1000.0
    if models.family == "wan":
        return models.transformer(noisy, timestep, caption, return_dict=False)[0]
    b, c, f, h, w = noisy.shape
    packed = noisy.flatten(2).transpose(1, 2)                      # (B, F*H*W, C), LTXPipeline._pack_latents
    mask = torch.ones(b, caption.shape[1], device=noisy.device)
    out = models.transformer(hidden_states=packed, encoder_hidden_states=caption, timestep=timestep,
                             encoder_attention_mask=mask, num_frames=f, height=h, width=w, return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, f, h, w)
