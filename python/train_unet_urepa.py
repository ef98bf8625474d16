#!/usr/bin/env python
"""U-REPA on a diffusers `UNet2DConditionModel` (SD1.5, SDXL, Kolors): a training loop to copy into your trainer.

    python python/train_unet_urepa.py --steps 20                 # tiny random UNet, CPU
    accelerate launch python/train_unet_urepa.py ...

U-REPA aligns the UNet mid-block with DINOv2 patch features (the projected mid-block tokens are upsampled
to the encoder grid) and adds a manifold loss that matches the token-to-token similarity structure:
λ · (−mean cosine + urepa_manifold_weight · manifold). Out of the box the UNet, VAE and DINOv2 are tiny and
random-init; the lines marked REAL MODEL show what to put instead. The four regularizer lines are marked:

  (1) build the regularizer after the models, give its parameters (the projector) to the optimizer and
      register it for checkpointing (`save_state` then saves its projector and schedule state);
  (2) the usual UNet forward (a hook captures the mid-block output);
  (3) the regularizer call with this batch's clean latents (or `pixels=`, which skips the VAE decode);
  (4) add its loss to the diffusion loss.

Every documented `urepa_*` key is an argument (`--urepa_lambda 0.5`, `--urepa_manifold_weight 3.0`, ...);
`UrepaRegularizer.from_config("config.json", ...)` takes a JSON / trainer config instead.
"""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from repa_kernels.demo.data import moving_shapes
from repa_kernels.regularizer import UrepaConfig, UrepaRegularizer, add_argparse_args

TINY_ENCODER = "tiny-random"   # --urepa_model value that builds a tiny random Dinov2Model (no download)
LATENT_CHANNELS = 4
TEXT_DIM = 16
IMAGE_SIZE = 32


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="optimizer steps (the schedule's max_train_steps)")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="1e-3 suits the tiny model; ~1e-5 for a real one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-input", choices=("latents", "pixels"), default="latents",
                        help="what the regularizer gets: the clean latents (it decodes them) or the clean images")
    parser.add_argument("--output-dir", default=None, help="if set, `accelerator.save_state` here at the end")
    add_argparse_args(parser, crepa=False, urepa=True)
    # Defaults for the tiny model. REAL MODEL (SDXL / SD1.5): --urepa_model dinov2_vitb14
    # --urepa_encoder_image_size 224 (or 518) --urepa_lambda 0.5 --urepa_manifold_weight 3.0.
    parser.set_defaults(urepa_enabled=True, urepa_model=TINY_ENCODER, urepa_encoder_image_size=IMAGE_SIZE)
    return parser.parse_args(argv)


def build_models(seed: int):
    """(unet, vae, noise scheduler): tiny random-init stand-ins of the real classes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    torch.manual_seed(seed)
    # REAL MODEL (SD1.5; for SDXL use "stabilityai/stable-diffusion-xl-base-1.0", whose UNet also needs
    # added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}, and the fp16-safe VAE
    # "madebyollin/sdxl-vae-fp16-fix"):
    #   repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    #   unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    #   vae = AutoencoderKL.from_pretrained(repo, subfolder="vae")
    #   noise_scheduler = DDPMScheduler.from_pretrained(repo, subfolder="scheduler")
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_DIM,
        attention_head_dim=8)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
        sample_size=IMAGE_SIZE, scaling_factor=1.0)
    return unet.train(), vae.eval().requires_grad_(False), DDPMScheduler(num_train_timesteps=1000)


def build_encoder(cfg: UrepaConfig, seed: int):
    """None lets the regularizer load `urepa_model` (name, hub id or local directory); TINY_ENCODER builds
    a random tiny Dinov2Model."""
    if cfg.urepa_model != TINY_ENCODER:
        return None
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(seed + 1)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=IMAGE_SIZE, patch_size=4))


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Clean images (B, 3, H, W) in [0, 1] -> latents * scaling_factor (the Stable Diffusion convention)."""
    return vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator()
    unet, vae, noise_scheduler = build_models(args.seed)
    vae.to(accelerator.device)
    cfg = UrepaConfig.from_args(args)

    # (1) the regularizer, before the optimizer
    reg = None
    if cfg.urepa_enabled:
        reg = UrepaRegularizer.from_config(cfg, unet=unet, vae=vae, encoder=build_encoder(cfg, args.seed),
                                           max_train_steps=args.steps)
        reg.to(accelerator.device)                    # where the prepared model will run
        accelerator.register_for_checkpointing(reg)   # save_state / load_state: its projector and schedule
    # the projector is the regularizer's own: its parameters go to the optimizer beside the model's (it
    # averages its own gradients across processes; nothing to prepare or wrap)
    params = list(unet.parameters()) + (list(reg.parameters()) if reg is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    # REAL MODEL: your image dataset (B, 3, H, W) in [0, 1] and your CLIP text encoder's output instead of
    # the fixed random caption below.
    images = moving_shapes(32, 1, IMAGE_SIZE, IMAGE_SIZE, seed=args.seed)[:, 0]
    loader = DataLoader(TensorDataset(images), batch_size=args.batch_size, shuffle=True, drop_last=True)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    if len(loader) == 0:  # drop_last with fewer samples than a batch: the loop below would never end
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(loader.dataset)} samples per "
                         "process; use a smaller batch")
    caption = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(args.seed)).to(accelerator.device)

    step = 0
    while step < args.steps:
        for (pixels,) in loader:
            latents = encode(vae, pixels)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with accelerator.accumulate(unet):
                pred = unet(noisy, timesteps, caption.expand(latents.shape[0], -1, -1), return_dict=False)[0]   # (2)
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())          # epsilon prediction
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
