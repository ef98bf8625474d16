#!/usr/bin/env python
"""Image REPA on a diffusers DiT (PixArt, SD3 or Flux): a training loop to copy into your trainer.

    python python/train_dit_repa.py --steps 20                   # tiny random PixArt, CPU
    python python/train_dit_repa.py --model sd3 --steps 20
    python python/train_dit_repa.py --model flux --steps 20
    accelerate launch python/train_dit_repa.py ...

REPA for images is CREPA with one frame: the same `CrepaRegularizer` and `crepa_*` keys (the neighbour
keys have nothing to act on). Out of the box the transformer, VAE and DINOv2 are tiny and random-init;
the lines marked REAL MODEL show what to put instead. The four regularizer lines are marked (1) to (4):

  (1) build the regularizer after the models, give its parameters (the projector) to the optimizer and
      register it for checkpointing (`save_state` then saves its projector and schedule state);
  (2) the usual forward (a hook captures block `crepa_block_index`; for Flux the double blocks come
      first, then the single blocks, as one sequence of indices, and text tokens are removed);
  (3) the regularizer call with this batch's clean latents (or `pixels=`, which skips the VAE decode);
  (4) add its loss to the diffusion loss.

The diffusion objective is the trainer's own; this script uses rectified flow for all three models
(SD3 and Flux train that way; PixArt-Sigma was trained with DDPM noise prediction) because REPA does not
depend on it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from repa_kernels.demo.data import moving_shapes
from repa_kernels.regularizer import CrepaConfig, CrepaRegularizer, add_argparse_args

TINY_ENCODER = "tiny-random"   # --crepa_encoder value that builds a tiny random Dinov2Model (no download)
LATENT_CHANNELS = 4
TEXT_DIM = 16
POOLED_DIM = 8
IMAGE_SIZE = 32


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("pixart", "sd3", "flux"), default="pixart", help="image DiT family")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="optimizer steps (the schedule's max_train_steps)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="1e-3 suits the tiny model; ~1e-5 for a real one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-input", choices=("latents", "pixels"), default="latents",
                        help="what the regularizer gets: the clean latents (it decodes them) or the clean images")
    parser.add_argument("--output-dir", default=None, help="if set, `accelerator.save_state` here at the end")
    add_argparse_args(parser, crepa=True, urepa=False)
    # Defaults for the tiny model. REAL MODEL: --crepa_block_index 8 (PixArt-Sigma XL, SD3.5 medium, Flux; the
    # REPA paper's depth 8 for a 28-block DiT) --crepa_encoder dinov2_vitb14 --crepa_encoder_image_size 224
    # (or 518) --crepa_lambda 0.5.
    parser.set_defaults(crepa_enabled=True, crepa_block_index=1, crepa_encoder=TINY_ENCODER,
                        crepa_encoder_image_size=IMAGE_SIZE)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ models

def build_models(family: str, seed: int):
    """(transformer, vae): tiny random-init stand-ins of the real classes."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    if family == "pixart":
        from diffusers import PixArtTransformer2DModel
        # REAL MODEL:
        #   repo = "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
        #   transformer = PixArtTransformer2DModel.from_pretrained(
        #       repo, subfolder="transformer", torch_dtype=torch.bfloat16)
        #   vae = AutoencoderKL.from_pretrained(repo, subfolder="vae")
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=4, cross_attention_dim=32, sample_size=IMAGE_SIZE // 2, patch_size=2, caption_channels=TEXT_DIM)
    elif family == "sd3":
        from diffusers import SD3Transformer2DModel
        # REAL MODEL:
        #   repo = "stabilityai/stable-diffusion-3.5-medium"
        #   transformer = SD3Transformer2DModel.from_pretrained(
        #       repo, subfolder="transformer", torch_dtype=torch.bfloat16)
        #   vae = AutoencoderKL.from_pretrained(repo, subfolder="vae")
        transformer = SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=POOLED_DIM, out_channels=LATENT_CHANNELS, pos_embed_max_size=IMAGE_SIZE // 2)
    else:
        from diffusers import FluxTransformer2DModel
        # REAL MODEL:
        #   repo = "black-forest-labs/FLUX.1-dev"
        #   transformer = FluxTransformer2DModel.from_pretrained(
        #       repo, subfolder="transformer", torch_dtype=torch.bfloat16)
        #   vae = AutoencoderKL.from_pretrained(repo, subfolder="vae")
        #   (crepa_block_index counts the 19 double blocks first, then the 38 single blocks)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
            axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0 if family != "pixart" else None)
    return transformer.train(), vae.eval().requires_grad_(False)


def build_encoder(cfg: CrepaConfig, seed: int):
    """None lets the regularizer load `crepa_encoder` (name, hub id or local directory); TINY_ENCODER
    builds a random tiny Dinov2Model."""
    if cfg.crepa_encoder != TINY_ENCODER or cfg.crepa_use_backbone_features:
        return None
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(seed + 1)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=IMAGE_SIZE, patch_size=4))


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Clean images (B, 3, H, W) in [0, 1] -> normalised latents (B, C, H/2, W/2) as the pipelines do:
    (z - shift_factor) * scaling_factor (SD3, Flux), z * scaling_factor (PixArt)."""
    raw = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.sample()
    return (raw - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def _flux_ids(height: int, width: int, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    image_ids = torch.zeros(height // 2, width // 2, 3, device=device)
    image_ids[..., 1] += torch.arange(height // 2, device=device)[:, None]
    image_ids[..., 2] += torch.arange(width // 2, device=device)[None, :]
    return image_ids.reshape(-1, 3), torch.zeros(text_tokens, 3, device=device)


def predict(family: str, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
            pooled: torch.Tensor) -> torch.Tensor:
    """One forward on latents (B, C, H, W) at noise levels sigmas (B,) in [0, 1]; returns (B, C, H, W)."""
    timestep = sigmas * 1000
    if family == "pixart":
        return transformer(noisy, encoder_hidden_states=text, timestep=timestep,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    if family == "sd3":
        return transformer(noisy, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                           return_dict=False)[0]
    b, c, h, w = noisy.shape                                             # FluxPipeline packs 2x2 latent patches
    packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    image_ids, text_ids = _flux_ids(h, w, text.shape[1], noisy.device)
    out = transformer(packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigmas,
                      img_ids=image_ids, txt_ids=text_ids, return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------ training

def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator()
    transformer, vae = build_models(args.model, args.seed)
    vae.to(accelerator.device)
    cfg = CrepaConfig.from_args(args)

    # (1) the regularizer, before the optimizer
    reg = None
    if cfg.crepa_enabled:
        reg = CrepaRegularizer.from_config(cfg, transformer=transformer, vae=vae, encoder=build_encoder(cfg, args.seed),
                                           max_train_steps=args.steps)
        reg.to(accelerator.device)                    # where the prepared model will run
        accelerator.register_for_checkpointing(reg)   # save_state / load_state: its projector and schedule
    # the projector is the regularizer's own: its parameters go to the optimizer beside the model's (it
    # averages its own gradients across processes; nothing to prepare or wrap)
    params = list(transformer.parameters()) + (list(reg.parameters()) if reg is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    # REAL MODEL: your image dataset (B, 3, H, W) in [0, 1] and your text encoders' outputs (T5 for PixArt;
    # CLIP-L/G + T5 for SD3; CLIP-L pooled + T5 for Flux) instead of the fixed random ones below.
    images = moving_shapes(32, 1, IMAGE_SIZE, IMAGE_SIZE, seed=args.seed)[:, 0]
    loader = DataLoader(TensorDataset(images), batch_size=args.batch_size, shuffle=True, drop_last=True)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    if len(loader) == 0:  # drop_last with fewer samples than a batch: the loop below would never end
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(loader.dataset)} samples per "
                         "process; use a smaller batch")
    generator = torch.Generator().manual_seed(args.seed)
    caption = torch.randn(1, 4, TEXT_DIM, generator=generator).to(accelerator.device)
    pooled = torch.randn(1, POOLED_DIM, generator=generator).to(accelerator.device)

    step = 0
    while step < args.steps:
        for (pixels,) in loader:
            latents = encode(vae, pixels)
            noise = torch.randn_like(latents)
            sigmas = torch.sigmoid(torch.randn(latents.shape[0], device=latents.device))   # logit-normal
            s = sigmas.view(-1, 1, 1, 1)
            noisy = (1 - s) * latents + s * noise
            b = latents.shape[0]
            with accelerator.accumulate(transformer):
                pred = predict(args.model, transformer, noisy, sigmas, caption.expand(b, -1, -1),
                               pooled.expand(b, -1))                                      # (2)
                loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
                logs = {}
                if reg is not None:
                    teacher_input = {"latents": latents} if args.teacher_input == "latents" else {"pixels": pixels}
                    reg_loss, logs = reg(**teacher_input, step=step)                     # (3)
                    loss = loss + reg_loss                                                # (4)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                shown = " ".join(f"{k}={v.item():.4f}" for k, v in logs.items())
                accelerator.print(f"step {step + 1}/{args.steps} loss={loss.item():.4f} {shown}")
                step += 1
                if step >= args.steps:
                    break
    if args.output_dir:
        accelerator.save_state(args.output_dir)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
