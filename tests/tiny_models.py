"""Tiny random-weight diffusers / transformers models with a fixed seed, shared by the tests and demos.

Every builder returns a model in eval mode on CPU in float32, built from the real diffusers class with
a configuration small enough to run a forward pass in milliseconds. `tiny_forward(model, latents)`
runs one denoiser forward on *unpacked* latents the way the family's pipeline calls it (packing for
Flux and LTX-Video, channels-last for Kandinsky5), so tests and demos need not know each family's
signature.

Shapes the tests rely on:
- video latents (B, 4, F, H, W) with H, W even; image latents (B, 4, H, W) with H, W even.
- Wan, SanaVideo, Kandinsky5: patch (1, 2, 2); LTX-Video: patch 1; Flux: 2x2 packing;
  SD3, PixArt: patch 2; Sana: patch 1; UNet: mid-block at 1/2 of the latent resolution.
- Each transformer has 3 blocks (Flux: 2 double + 2 single = 4 indices), hidden size 16 (Kandinsky5: 24).
"""

from __future__ import annotations

import torch

SEED = 0
LATENT_CHANNELS = 4
TEXT_DIM = 16
TEXT_TOKENS = 3


def _seeded(build):
    torch.manual_seed(SEED)
    model = build()
    return model.eval()


def tiny_wan(num_layers: int = 3):
    from diffusers import WanTransformer3DModel
    return _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=num_layers,
        rope_max_seq_len=64))


def tiny_ltx(num_layers: int = 3):
    from diffusers import LTXVideoTransformer3DModel
    return _seeded(lambda: LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=num_layers,
        caption_channels=TEXT_DIM))


def tiny_sana_video(num_layers: int = 3):
    from diffusers import SanaVideoTransformer3DModel
    return _seeded(lambda: SanaVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=num_layers, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_DIM, mlp_ratio=2.0, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=64))


def tiny_kandinsky5(num_layers: int = 3):
    """Kandinsky5 zero-initialises its modulation layers (every block starts as the identity); they get
    small random weights here so the blocks transform their input like a trained model's."""
    from diffusers import Kandinsky5Transformer3DModel

    def build():
        model = Kandinsky5Transformer3DModel(
            in_visual_dim=LATENT_CHANNELS, in_text_dim=TEXT_DIM, in_text_dim2=8, time_dim=16,
            out_visual_dim=LATENT_CHANNELS, patch_size=(1, 2, 2), model_dim=24, ff_dim=32, num_text_blocks=1,
            num_visual_blocks=num_layers, axes_dims=(4, 4, 4))
        for module in model.modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                torch.nn.init.normal_(module.out_layer.weight, std=0.1)
                torch.nn.init.normal_(module.out_layer.bias, std=0.1)
        return model
    return _seeded(build)


def tiny_flux(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import FluxTransformer2DModel
    return _seeded(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4)))


def tiny_sd3(num_layers: int = 3):
    from diffusers import SD3Transformer2DModel
    return _seeded(lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=8,
        out_channels=LATENT_CHANNELS, pos_embed_max_size=16))


def tiny_pixart(num_layers: int = 3):
    from diffusers import PixArtTransformer2DModel
    return _seeded(lambda: PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=num_layers, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=TEXT_DIM))


def tiny_sana(num_layers: int = 3):
    from diffusers import SanaTransformer2DModel
    return _seeded(lambda: SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=num_layers, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_DIM, mlp_ratio=2.0, sample_size=8, patch_size=1))


def tiny_dit(num_layers: int = 3):
    """diffusers' class-conditional DiT: no dedicated family, captured as the generic `dit` (square
    latents only: its position embedding and unpatchify assume sample_size x sample_size)."""
    from diffusers import DiTTransformer2DModel
    return _seeded(lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10))


def tiny_hunyuan_dit(num_layers: int = 4):
    """HunyuanDiT (blocks in `blocks`, long skips between its halves: an even number of layers):
    captured as the generic `dit`."""
    from diffusers import HunyuanDiT2DModel
    return _seeded(lambda: HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=num_layers, cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=TEXT_DIM,
        pooled_projection_dim=8, text_len=TEXT_TOKENS, text_len_t5=TEXT_TOKENS,
        use_style_cond_and_image_meta_size=False, learn_sigma=False))


class TinySiT(torch.nn.Module):
    """A plain SiT-style module (no diffusers config): patchify, `blocks`, unpatchify; `forward(x, t)`.

    block_output: "tensor" (B, S, C), "tuple" ((B, S, C), None), or "cls" (a class token prepended)."""

    def __init__(self, width: int = 16, patch_size: int = 2, num_layers: int = 3, block_output: str = "tensor"):
        super().__init__()
        torch.manual_seed(SEED)
        self.patch_size = patch_size
        self.block_output = block_output
        self.embed = torch.nn.Conv2d(LATENT_CHANNELS, width, patch_size, stride=patch_size)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, width))
        self.blocks = torch.nn.ModuleList(_SiTBlock(width, block_output) for _ in range(num_layers))
        self.head = torch.nn.Linear(width, LATENT_CHANNELS * patch_size * patch_size)
        self.eval()

    def forward(self, x, t):
        b, _, h, w = x.shape
        p = self.patch_size
        tokens = self.embed(x).flatten(2).transpose(1, 2) + t.view(-1, 1, 1) / 1000.0
        if self.block_output == "cls":
            tokens = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        tokens = tokens[:, 1:] if self.block_output == "cls" else tokens
        out = self.head(tokens).view(b, h // p, w // p, LATENT_CHANNELS, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, LATENT_CHANNELS, h, w)


class _SiTBlock(torch.nn.Module):
    def __init__(self, width: int, block_output: str):
        super().__init__()
        self.mix = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU())
        self.returns_tuple = block_output == "tuple"

    def forward(self, tokens):
        tokens = tokens + self.mix(tokens, tokens, tokens, need_weights=False)[0]
        tokens = tokens + self.mlp(tokens)
        return (tokens, None) if self.returns_tuple else tokens


def tiny_unet():
    from diffusers import UNet2DConditionModel
    return _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=TEXT_DIM,
        attention_head_dim=4))


def tiny_wan_vae():
    """AutoencoderKLWan with z_dim 4, spatial ratio 4, causal temporal ratio 2 (F latent -> 2(F-1)+1 frames)."""
    from diffusers import AutoencoderKLWan
    return _seeded(lambda: AutoencoderKLWan(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0],
        scale_factor_temporal=2, scale_factor_spatial=4))


def tiny_wan22_vae():
    """AutoencoderKLWan in Wan 2.2's layout (residual blocks, 2x2 patchified pixels): z_dim 4, temporal
    ratio 4 (F latent -> 4(F-1)+1 frames), spatial ratio 16."""
    from diffusers import AutoencoderKLWan
    return _seeded(lambda: AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=4,
        scale_factor_spatial=16))


def tiny_ltx_vae():
    """AutoencoderKLLTXVideo with 4 latent channels, ratios 2 (space and time), timestep conditioning on,
    scaling 0.5 and non-trivial latents_mean / latents_std buffers."""
    from diffusers import AutoencoderKLLTXVideo

    def build():
        vae = AutoencoderKLLTXVideo(
            latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
            down_block_types=("LTXVideoDownBlock3D", "LTXVideoDownBlock3D"), decoder_block_out_channels=(8, 8),
            layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
            decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
            downsample_type=("conv", "conv"), upsample_residual=(False, False), upsample_factor=(1, 1),
            timestep_conditioning=True, patch_size=1, patch_size_t=1, scaling_factor=0.5)
        vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
        vae.latents_std.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        return vae
    return _seeded(build)


def tiny_hunyuan_vae():
    """AutoencoderKLHunyuanVideo (Kandinsky5's VAE) with 4 latent channels, ratios 4 (space and time)."""
    from diffusers import AutoencoderKLHunyuanVideo
    return _seeded(lambda: AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8),
        down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4, mid_block_add_attention=False))


def tiny_dc_vae():
    """AutoencoderDC (Sana's VAE) with 4 latent channels, spatial ratio 2, scaling 0.4."""
    from diffusers import AutoencoderDC
    return _seeded(lambda: AutoencoderDC(
        latent_channels=LATENT_CHANNELS, attention_head_dim=4, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), scaling_factor=0.4))


def tiny_image_vae(scaling_factor: float = 0.5, shift_factor: float | None = 0.25, latents_mean=None,
                   latents_std=None):
    """AutoencoderKL with 4 latent channels and spatial ratio 2."""
    from diffusers import AutoencoderKL
    return _seeded(lambda: AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
        shift_factor=shift_factor, latents_mean=latents_mean, latents_std=latents_std))


def tiny_image_tae():
    """AutoencoderTiny with 4 latent channels and spatial ratio 2 (an image tiny decoder)."""
    from diffusers import AutoencoderTiny
    return _seeded(lambda: AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), latent_channels=LATENT_CHANNELS,
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)))


def tiny_dinov2(with_registers: bool = False, patch_size: int = 4):
    """A random Dinov2Model (or Dinov2WithRegistersModel with 2 registers): hidden 16, one layer."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=16,
                  patch_size=patch_size)
    if with_registers:
        return _seeded(lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **common)))
    return _seeded(lambda: Dinov2Model(Dinov2Config(**common)))


# Tiny vision teachers beyond DINOv2: token stride 4 each (Qwen-VL: patch 2 x merge 2), width 16 (Qwen-VL: 24
# after the merger), one or two layers. SigLIP / SigLIP2 / Qwen-VL are the whole checkpoints (text model or
# language model included), as the hub holds them.
_TINY_VIT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
_TINY_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)


def tiny_dinov3(num_register_tokens: int = 4):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    return _seeded(lambda: DINOv3ViTModel(DINOv3ViTConfig(patch_size=4, image_size=16,
                                                          num_register_tokens=num_register_tokens, **_TINY_VIT)))


def tiny_siglip():
    """A whole SiglipModel (vision + text): the teacher takes its vision model."""
    from transformers import SiglipConfig, SiglipModel
    return _seeded(lambda: SiglipModel(SiglipConfig(text_config=_TINY_TEXT,
                                                    vision_config=dict(image_size=16, patch_size=4, **_TINY_VIT))))


def tiny_siglip2():
    """A whole Siglip2Model (NaFlex vision + text), 16 position embeddings (a 4x4 grid)."""
    from transformers import Siglip2Config, Siglip2Model
    return _seeded(lambda: Siglip2Model(Siglip2Config(text_config=_TINY_TEXT,
                                                      vision_config=dict(num_patches=16, patch_size=4, **_TINY_VIT))))


def tiny_vit():
    from transformers import ViTConfig, ViTModel
    return _seeded(lambda: ViTModel(ViTConfig(image_size=16, patch_size=4, **_TINY_VIT)))


_TINY_QWEN_TEXT = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=64)


def tiny_qwen2_5_vl():
    """A whole Qwen2_5_VLForConditionalGeneration: vision tower (patch 2, merge 2, windows of 2x2 merged
    tokens, block 1 full attention) and a one-layer language model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24, patch_size=2,
                  window_size=8, fullatt_block_indexes=[1])
    return _seeded(lambda: Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=_TINY_QWEN_TEXT, vision_config=vision, bos_token_id=0, eos_token_id=1)))


def tiny_qwen3_vl():
    """A whole Qwen3VLForConditionalGeneration: vision tower (patch 2, merge 2, a 4x4 position grid, one
    deepstack layer) and a one-layer language model."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24, patch_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return _seeded(lambda: Qwen3VLForConditionalGeneration(
        Qwen3VLConfig(text_config={**_TINY_QWEN_TEXT, "head_dim": 12}, vision_config=vision)))

# --------------------------------------------------------------------------------------------------
# One forward per family from unpacked latents.

def _text(batch: int, dim: int = TEXT_DIM, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(batch, tokens, dim, generator=generator)


def pack_flux(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), the FluxPipeline packing."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def pack_ltx(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F*H*W, C), the LTXPipeline packing with patch sizes 1."""
    return latents.flatten(2).transpose(1, 2)


def tiny_forward(model, latents: torch.Tensor, timestep: float = 500.0):
    """Run `model` once on unpacked latents; returns the prediction tensor."""
    name = type(getattr(model, "_orig_mod", model)).__name__   # torch.compile'd models keep the original
    batch = latents.shape[0]
    t = torch.full((batch,), timestep)
    if name == "WanTransformer3DModel":
        return model(latents, t, _text(batch), return_dict=False)[0]
    if name == "SanaVideoTransformer3DModel":
        return model(latents, _text(batch), t, return_dict=False)[0]
    if name == "LTXVideoTransformer3DModel":
        _, _, frames, height, width = latents.shape
        mask = torch.ones(batch, TEXT_TOKENS)
        return model(pack_ltx(latents), _text(batch), t, mask, num_frames=frames, height=height, width=width,
                     return_dict=False)[0]
    if name == "Kandinsky5Transformer3DModel":
        _, _, frames, height, width = latents.shape
        rope = [torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)]
        return model(latents.permute(0, 2, 3, 4, 1), _text(batch), t, _text(batch, 8, 1)[:, 0], rope,
                     torch.arange(TEXT_TOKENS), return_dict=False)
    if name == "FluxTransformer2DModel":
        _, _, height, width = latents.shape
        return model(pack_flux(latents), _text(batch), _text(batch, 8, 1)[:, 0], t / 1000.0,
                     flux_image_ids(height, width), torch.zeros(TEXT_TOKENS, 3), return_dict=False)[0]
    if name == "SD3Transformer2DModel":
        return model(latents, _text(batch), _text(batch, 8, 1)[:, 0], t, return_dict=False)[0]
    if name == "PixArtTransformer2DModel":
        return model(latents, encoder_hidden_states=_text(batch), timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    if name == "SanaTransformer2DModel":
        return model(latents, _text(batch), t, return_dict=False)[0]
    if name == "DiTTransformer2DModel":
        return model(latents, timestep=t.long(), class_labels=torch.ones(batch, dtype=torch.long),
                     return_dict=False)[0]
    if name == "HunyuanDiT2DModel":
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        rows, cols = latents.shape[2] // 2, latents.shape[3] // 2
        rope = get_2d_rotary_pos_embed(8, ((0, 0), (rows, cols)), (rows, cols))
        mask = torch.ones(batch, TEXT_TOKENS)
        return model(latents, t, encoder_hidden_states=_text(batch), text_embedding_mask=mask,
                     encoder_hidden_states_t5=_text(batch), text_embedding_mask_t5=mask, image_rotary_emb=rope,
                     return_dict=False)[0]
    if name == "TinySiT":
        return model(latents, t)
    if name == "UNet2DConditionModel":
        return model(latents, t, _text(batch), return_dict=False)[0]
    raise ValueError(f"tiny_forward does not know {name}")


VIDEO_BUILDERS = {"wan": tiny_wan, "ltx_video": tiny_ltx, "sana_video": tiny_sana_video, "kandinsky5": tiny_kandinsky5}
IMAGE_BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart, "sana": tiny_sana}
