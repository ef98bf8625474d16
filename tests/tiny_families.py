"""Tiny random-weight models of the families beyond tiny_models.py, each run the way its diffusers 0.42
pipeline runs it.

One `FamilyCase` per family: `build()` returns the model (eval mode, float32, CPU, fixed seed);
`forward(model, latents, text_lengths)` runs one denoiser forward on *unpacked* latents with the inputs
the family's pipeline passes (packing, position ids, masks, audio, register/reference tokens) and returns
the prediction; `text_lengths` gives each sample's number of valid caption tokens (padded to the longest:
families whose pipeline passes a caption mask get one, the others see every token as valid).

Latents are (B, 4, F, H, W) for video and (B, 4, H, W) for images, except Flux2, whose pipeline feeds the
transformer the VAE latents after 2x2 patchification and batch-norm, (B, 16, H/2, W/2) here (4 VAE channels
x 2 x 2), one token per latent pixel. `edit=True` (Flux2, Qwen-Image) appends a reference image's tokens
after the target's, as the edit pipelines do.

Measured (CPU time, one thread, batch 2, latents 3 x 8 x 12): 3-12 ms per no-grad forward (LTX-2 and
HunyuanVideo 1.5 the slowest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tiny_models import LATENT_CHANNELS, SEED, TEXT_DIM, _seeded

WIDTH = 16                    # hidden size of every model here
HEADS, HEAD_DIM = 2, 8


def _generator(offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def text_and_mask(text_lengths, dim: int = TEXT_DIM, offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption embeddings (B, max(L), dim), zero past each sample's length, and the 0/1 mask (B, max(L))
    a tokenizer pads to."""
    longest = max(text_lengths)
    text = torch.randn(len(text_lengths), longest, dim, generator=_generator(offset))
    mask = torch.zeros(len(text_lengths), longest, dtype=torch.long)
    for i, n in enumerate(text_lengths):
        mask[i, :n] = 1
    return text * mask[..., None], mask


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline / ChromaPipeline / QwenImagePipeline packing."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_ids(rows: int, cols: int) -> torch.Tensor:
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(-1, 3)


# --------------------------------------------------------------------------------------------------
# Flux2 (Flux2Pipeline / Flux2KleinPipeline)

FLUX2_CHANNELS = LATENT_CHANNELS * 4


def tiny_flux2(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import Flux2Transformer2DModel
    return _seeded(lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=FLUX2_CHANNELS, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True))


def _flux2_ids(latents: torch.Tensor, t: int = 0) -> torch.Tensor:
    # Flux2Pipeline._prepare_latent_ids / _prepare_image_ids: (T, H, W, L) per latent pixel, row-major
    b, _, h, w = latents.shape
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(b, -1, -1)


def flux2_forward(model, latents, text_lengths, timestep: float = 500.0, edit: bool = False):
    b = latents.shape[0]
    text, _ = text_and_mask(text_lengths)
    text_ids = torch.stack([torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                                 torch.arange(text.shape[1]))] * b)
    tokens = latents.flatten(2).transpose(1, 2)                                  # Flux2Pipeline._pack_latents
    ids = _flux2_ids(latents)
    if edit:   # Flux2Pipeline with an input image: the reference tokens follow the target's, t = 10
        reference = torch.randn(latents[:, :, : latents.shape[2] // 2].shape, generator=_generator(7))
        tokens = torch.cat([tokens, reference.flatten(2).transpose(1, 2)], dim=1)
        ids = torch.cat([ids, _flux2_ids(reference, t=10)], dim=1)
    out = model(hidden_states=tokens, timestep=torch.full((b,), timestep) / 1000, guidance=torch.full((b,), 4.0),
                encoder_hidden_states=text, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    return out[:, : latents.shape[2] * latents.shape[3]]


# --------------------------------------------------------------------------------------------------
# Chroma (ChromaPipeline: Flux packing, a caption mask extended over the image tokens)

def tiny_chroma(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import ChromaTransformer2DModel
    return _seeded(lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(2, 2, 4), approximator_num_channels=16, approximator_hidden_dim=16, approximator_layers=1))


def chroma_forward(model, latents, text_lengths, timestep: float = 500.0):
    b, _, h, w = latents.shape
    text, mask = text_and_mask(text_lengths)
    image_tokens = (h // 2) * (w // 2)
    attention_mask = torch.cat([mask.bool(), torch.ones(b, image_tokens, dtype=torch.bool)], dim=1)
    return model(hidden_states=pack_2x2(latents), timestep=torch.full((b,), timestep) / 1000,
                 encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3), img_ids=_flux_ids(h // 2, w // 2),
                 attention_mask=attention_mask, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# HiDream (HiDreamImagePipeline: 4-D latents; T5 + Llama-3 layers, no caption mask)

HIDREAM_MAX_RESOLUTION = (16, 16)   # latents; non-square inputs are padded to 16*16/4 = 64 tokens


def tiny_hidream(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import HiDreamImageTransformer2DModel
    return _seeded(lambda: HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        caption_channels=[TEXT_DIM, TEXT_DIM], text_emb_dim=8, num_routed_experts=2, num_activated_experts=1,
        axes_dims_rope=(4, 2, 2), max_resolution=HIDREAM_MAX_RESOLUTION,
        llama_layers=list(range(num_layers + num_single_layers))))


def hidream_forward(model, latents, text_lengths, timestep: float = 500.0):
    b = latents.shape[0]
    t5, _ = text_and_mask(text_lengths)
    layers = len(model.config.llama_layers)
    llama = torch.stack([text_and_mask(text_lengths, offset=2 + i)[0] for i in range(layers)])
    pooled = torch.randn(b, 8, generator=_generator(9))
    out = model(hidden_states=latents, timesteps=torch.full((b,), timestep), encoder_hidden_states_t5=t5,
                encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
    return -out


# --------------------------------------------------------------------------------------------------
# AuraFlow (AuraFlowPipeline: 4-D latents, no caption mask; 8 register tokens lead the text stream)

def tiny_auraflow(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import AuraFlowTransformer2DModel
    return _seeded(lambda: AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_mmdit_layers=num_layers,
        num_single_dit_layers=num_single_layers, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=WIDTH, out_channels=LATENT_CHANNELS,
        pos_embed_max_size=64))


def auraflow_forward(model, latents, text_lengths, timestep: float = 500.0):
    b = latents.shape[0]
    text, _ = text_and_mask(text_lengths)
    return model(latents, encoder_hidden_states=text, timestep=torch.full((b,), timestep / 1000),
                 return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# Lumina2 (Lumina2Pipeline: 4-D latents, caption mask; each sample's caption is unpadded in the joint
# sequence, its image tokens follow, padding last)

def tiny_lumina2(num_layers: int = 3):
    from diffusers import Lumina2Transformer2DModel
    return _seeded(lambda: Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, hidden_size=WIDTH, num_layers=num_layers,
        num_refiner_layers=1, num_attention_heads=HEADS, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4),
        axes_lens=(64, 64, 64), cap_feat_dim=TEXT_DIM))


def lumina2_forward(model, latents, text_lengths, timestep: float = 500.0):
    b = latents.shape[0]
    text, mask = text_and_mask(text_lengths)
    return model(hidden_states=latents, timestep=torch.full((b,), 1 - timestep / 1000), encoder_hidden_states=text,
                 encoder_attention_mask=mask.bool(), return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# LTX-2 (LTX2Pipeline: packed video tokens beside audio tokens; blocks return (video, audio))

AUDIO_TOKENS = 5


def tiny_ltx2(num_layers: int = 3):
    from diffusers import LTX2VideoTransformer3DModel
    return _seeded(lambda: LTX2VideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1, patch_size_t=1,
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, cross_attention_dim=WIDTH, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=HEADS, audio_attention_head_dim=HEAD_DIM,
        audio_cross_attention_dim=WIDTH, num_layers=num_layers, caption_channels=TEXT_DIM))


def ltx2_forward(model, latents, text_lengths, timestep: float = 500.0):
    b, _, frames, height, width = latents.shape
    text, mask = text_and_mask(text_lengths)
    audio = torch.randn(b, AUDIO_TOKENS, 4, generator=_generator(11))
    t = torch.full((b,), timestep)
    return model(hidden_states=latents.flatten(2).transpose(1, 2), audio_hidden_states=audio,
                 encoder_hidden_states=text, audio_encoder_hidden_states=text, timestep=t, sigma=t,
                 encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=frames, height=height,
                 width=width, fps=24.0, audio_num_frames=AUDIO_TOKENS, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# Qwen-Image (QwenImagePipeline: 2x2 packing, caption mask, img_shapes; the edit pipeline appends the
# reference image's tokens and its shape)

def tiny_qwen_image(num_layers: int = 3):
    from diffusers import QwenImageTransformer2DModel
    return _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=LATENT_CHANNELS * 4, out_channels=LATENT_CHANNELS, num_layers=num_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(2, 2, 4)))


def qwen_image_forward(model, latents, text_lengths, timestep: float = 500.0, edit: bool = False):
    b, _, h, w = latents.shape
    text, mask = text_and_mask(text_lengths)
    tokens = pack_2x2(latents)
    shapes = [(1, h // 2, w // 2)]
    if edit:   # QwenImageEditPipeline: torch.cat([latents, image_latents], dim=1); a half-height reference
        reference = torch.randn(b, latents.shape[1], h // 2, w, generator=_generator(7))
        tokens = torch.cat([tokens, pack_2x2(reference)], dim=1)
        shapes.append((1, h // 4, w // 2))
    out = model(hidden_states=tokens, timestep=torch.full((b,), timestep) / 1000, encoder_hidden_states_mask=mask,
                encoder_hidden_states=text, img_shapes=[shapes] * b, return_dict=False)[0]
    return out[:, : (h // 2) * (w // 2)]


# --------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5 (HunyuanVideo15Pipeline: latents, condition latents and mask concatenated on channels;
# Qwen + ByT5 captions with masks; zero image embeddings for text-to-video)

def tiny_hunyuan_video15(num_layers: int = 3):
    from diffusers import HunyuanVideo15Transformer3DModel
    return _seeded(lambda: HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM, num_layers=num_layers, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=TEXT_DIM, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4)))


def hunyuan_video15_forward(model, latents, text_lengths, timestep: float = 500.0):
    b, c, f, h, w = latents.shape
    text, mask = text_and_mask(text_lengths)
    glyph, glyph_mask = text_and_mask([1] * b, dim=8, offset=5)
    model_input = torch.cat([latents, torch.zeros_like(latents), torch.zeros(b, 1, f, h, w)], dim=1)
    return model(hidden_states=model_input, image_embeds=torch.zeros(b, 3, 8), timestep=torch.full((b,), timestep),
                 encoder_hidden_states=text, encoder_attention_mask=mask, encoder_hidden_states_2=glyph,
                 encoder_attention_mask_2=glyph_mask, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# HunyuanVideo 1.0 (HunyuanVideoPipeline: 5-D latents; double then single blocks, video first)

def tiny_hunyuan_video(num_layers: int = 2, num_single_layers: int = 2):
    from diffusers import HunyuanVideoTransformer3DModel
    return _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM, num_layers=num_layers, num_single_layers=num_single_layers,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4)))


def hunyuan_video_forward(model, latents, text_lengths, timestep: float = 500.0):
    b = latents.shape[0]
    text, mask = text_and_mask(text_lengths)
    return model(hidden_states=latents, timestep=torch.full((b,), timestep), encoder_hidden_states=text,
                 encoder_attention_mask=mask, pooled_projections=torch.randn(b, 8, generator=_generator(9)),
                 guidance=torch.full((b,), 6000.0), return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# Cosmos (CosmosTextToWorldPipeline: 5-D latents; video tokens only). Built without the padding-mask
# channel: concatenating it resizes the mask with torchvision, which the test environment does not have.

def tiny_cosmos(num_layers: int = 3):
    from diffusers import CosmosTransformer3DModel
    return _seeded(lambda: CosmosTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=1,
        attention_head_dim=WIDTH, num_layers=num_layers, mlp_ratio=2.0, text_embed_dim=TEXT_DIM,
        adaln_lora_dim=8, max_size=(8, 32, 32), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=False))


def cosmos_forward(model, latents, text_lengths, timestep: float = 500.0):
    b = latents.shape[0]
    text, _ = text_and_mask(text_lengths)
    return model(hidden_states=latents, timestep=torch.full((b,), timestep / 1000), encoder_hidden_states=text,
                 fps=24, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilyCase:
    name: str                       # the regularizer's family name
    build: Callable
    forward: Callable               # (model, latents, text_lengths) -> prediction
    video: bool
    latent_channels: int = LATENT_CHANNELS
    edit_forward: Callable | None = None   # the edit pipeline's forward (reference tokens appended)


CASES = {case.name: case for case in (
    FamilyCase("flux2", tiny_flux2, flux2_forward, False, FLUX2_CHANNELS,
               edit_forward=lambda m, x, n: flux2_forward(m, x, n, edit=True)),
    FamilyCase("chroma", tiny_chroma, chroma_forward, False),
    FamilyCase("hidream", tiny_hidream, hidream_forward, False),
    FamilyCase("auraflow", tiny_auraflow, auraflow_forward, False),
    FamilyCase("lumina2", tiny_lumina2, lumina2_forward, False),
    FamilyCase("ltx2", tiny_ltx2, ltx2_forward, True),
    FamilyCase("qwen_image", tiny_qwen_image, qwen_image_forward, False,
               edit_forward=lambda m, x, n: qwen_image_forward(m, x, n, edit=True)),
    FamilyCase("hunyuan_video15", tiny_hunyuan_video15, hunyuan_video15_forward, True),
    FamilyCase("hunyuan_video", tiny_hunyuan_video, hunyuan_video_forward, True),
    FamilyCase("cosmos", tiny_cosmos, cosmos_forward, True),
)}


# --------------------------------------------------------------------------------------------------
# UNets of the U-REPA user docs, fed as StableDiffusionPipeline / StableDiffusionXLPipeline /
# KolorsPipeline feed them (SD1.5 is tiny_models.tiny_unet).

def tiny_sdxl_unet(text_proj_dim: int | None = None):
    """SDXL's UNet: linear-projection transformers, `text_time` added conditioning (pooled text + 6 size
    ids). text_proj_dim: Kolors' UNet, which also projects its (ChatGLM) caption width down first."""
    from diffusers import UNet2DConditionModel
    pooled = text_proj_dim or 8
    extra = dict(encoder_hid_dim_type="text_proj", encoder_hid_dim=text_proj_dim) if text_proj_dim else {}
    return _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=pooled + 6 * 4, **extra))


def tiny_kolors_unet():
    return tiny_sdxl_unet(text_proj_dim=24)


def unet_forward(model, latents, timestep: float = 500.0):
    b = latents.shape[0]
    t = torch.full((b,), timestep)
    config = model.config
    if config.addition_embed_type != "text_time":
        text, _ = text_and_mask([3] * b)
        return model(latents, t, text, return_dict=False)[0]
    width = config.encoder_hid_dim or TEXT_DIM
    text, _ = text_and_mask([3] * b, dim=width)
    pooled = torch.randn(b, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,
                         generator=_generator(9))
    size_ids = torch.tensor([[8.0 * latents.shape[2], 8.0 * latents.shape[3], 0, 0, 8.0 * latents.shape[2],
                              8.0 * latents.shape[3]]] * b)
    return model(latents, t, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": size_ids},
                 return_dict=False)[0]


# --------------------------------------------------------------------------------------------------
# VAEs of the new families' pipelines (4 latent channels, spatial ratio 2; non-trivial statistics)

def tiny_flux2_vae():
    """AutoencoderKLFlux2: batch-norm running statistics over the 2x2-patchified 16 channels."""
    from diffusers import AutoencoderKLFlux2

    def build():
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
            latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=16)
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 4 * LATENT_CHANNELS))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 4 * LATENT_CHANNELS))
        return vae
    return _seeded(build)


def tiny_qwen_image_vae():
    """AutoencoderKLQwenImage (a causal video VAE that Qwen-Image runs on one frame)."""
    from diffusers import AutoencoderKLQwenImage
    return _seeded(lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0]))


def tiny_ltx2_vae():
    """AutoencoderKLLTX2Video with timestep conditioning, scaling 0.5 and non-trivial mean / std buffers."""
    from diffusers import AutoencoderKLLTX2Video

    def build():
        vae = AutoencoderKLLTX2Video(
            latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8),
            down_block_types=("LTX2VideoDownBlock3D", "LTX2VideoDownBlock3D"), decoder_block_out_channels=(8, 8),
            layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
            decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
            downsample_type=("spatiotemporal", "spatial"), upsample_type=("spatiotemporal", "spatial"),
            upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=True, patch_size=1,
            patch_size_t=1, scaling_factor=0.5)
        vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
        vae.latents_std.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
        return vae
    return _seeded(build)


def tiny_hunyuan_video15_vae():
    from diffusers import AutoencoderKLHunyuanVideo15
    return _seeded(lambda: AutoencoderKLHunyuanVideo15(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8), layers_per_block=1,
        spatial_compression_ratio=2, temporal_compression_ratio=1, scaling_factor=0.5))
