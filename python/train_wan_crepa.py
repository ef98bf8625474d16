#!/usr/bin/env python
"""Video CREPA on a diffusers Wan (or LTX-Video) transformer: a training loop to copy into your trainer.

    python python/train_wan_crepa.py --steps 20                  # tiny random models, CPU, ~1 s a step
    python python/train_wan_crepa.py --model ltx --steps 20
    accelerate launch python/train_wan_crepa.py ...               # several GPUs / processes

Out of the box everything is tiny and random-init (transformer, VAE, DINOv2 teacher) so the loop runs on a
laptop CPU; the lines marked REAL MODEL show what to put instead. What the regularizer needs from a
trainer is four lines, marked (1) to (4):

  (1) build the regularizer after the models (and after any `requires_grad_(False)`, `.to(dtype)` or PEFT
      `add_adapter`: none of them reach its projector, which stays trainable and float32), give its
      parameters to the optimizer and register it for checkpointing (`save_state` saves its projector and
      schedule state; it averages the projector's gradients across processes itself);
  (2) run the transformer's forward as usual: a hook captures block `crepa_block_index`;
  (3) call the regularizer with the clean latents of the same batch (or `pixels=` when the trainer has the
      clean frames, which skips the VAE decode) and the optimizer step;
  (4) add its loss to the diffusion loss.

Every documented `crepa_*` key is an argument here (`--crepa_lambda 0.5`, `--crepa_scheduler cosine`, ...);
a JSON or SimpleTuner-style config works too: `CrepaRegularizer.from_config("config.json", ...)`.
"""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from repa_kernels.demo.data import moving_shapes, to_vae_input
from repa_kernels.regularizer import CrepaConfig, CrepaRegularizer, add_argparse_args

TINY_ENCODER = "tiny-random"   # --crepa_encoder value that builds a tiny random Dinov2Model (no download)
LATENT_CHANNELS = 8
TEXT_DIM = 16


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("wan", "ltx"), default="wan", help="video transformer family")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="optimizer steps (the schedule's max_train_steps)")
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="1e-3 suits the tiny model; ~1e-5 for a real one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-input", choices=("latents", "pixels"), default="latents",
                        help="what the regularizer gets: the clean latents (it decodes them) or the clean frames")
    parser.add_argument("--output-dir", default=None, help="if set, `accelerator.save_state` here at the end")
    add_argparse_args(parser, crepa=True, urepa=False)
    # Defaults for the tiny model. REAL MODEL (Wan 2.1 / LTX-Video): --crepa_block_index 8
    # --crepa_encoder dinov2_vitb14 --crepa_encoder_image_size 224 (518 for the most detail)
    # --crepa_encoder_dtype bfloat16; text-to-video preset: --crepa_scheduler cosine --crepa_warmup_steps 100
    # --crepa_lambda_end 0.1 --crepa_similarity_threshold 0.85.
    parser.set_defaults(crepa_enabled=True, crepa_block_index=1, crepa_encoder=TINY_ENCODER,
                        crepa_encoder_image_size=24)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ models

def build_models(family: str, seed: int):
    """(transformer, vae): tiny random-init stand-ins of the real classes."""
    torch.manual_seed(seed)
    if family == "wan":
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        # REAL MODEL:
        #   repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        #   transformer = WanTransformer3DModel.from_pretrained(
        #       repo, subfolder="transformer", torch_dtype=torch.bfloat16)
        #   vae = AutoencoderKLWan.from_pretrained(repo, subfolder="vae", torch_dtype=torch.float32)
        #   (Wan 2.2 A14B has two experts, transformer and transformer_2: pass both,
        #    CrepaRegularizer.from_config(cfg, transformer=[transformer, transformer_2], ...), one shared projector)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64)
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=2,
            scale_factor_spatial=4)
    else:
        from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
        # REAL MODEL:
        #   repo = "Lightricks/LTX-Video"
        #   transformer = LTXVideoTransformer3DModel.from_pretrained(
        #       repo, subfolder="transformer", torch_dtype=torch.bfloat16)
        #   vae = AutoencoderKLLTXVideo.from_pretrained(repo, subfolder="vae", torch_dtype=torch.float32)
        transformer = LTXVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1, patch_size_t=1,
            num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32, num_layers=4,
            caption_channels=TEXT_DIM)
        vae = AutoencoderKLLTXVideo(
            latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8),
            down_block_types=("LTXVideoDownBlock3D",) * 3,
            decoder_block_out_channels=(8, 8, 8), layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, False, False), decoder_spatio_temporal_scaling=(True, False, False),
            decoder_inject_noise=(False,) * 4, downsample_type=("conv",) * 3, upsample_residual=(False,) * 3,
            upsample_factor=(1,) * 3, patch_size=2, patch_size_t=1)
    return transformer.train(), vae.eval().requires_grad_(False)


def build_encoder(cfg: CrepaConfig, seed: int):
    """The teacher for `encoder=`: None lets the regularizer load `crepa_encoder` (a name such as
    dinov2_vitb14, a hub id or a local directory); TINY_ENCODER builds a random tiny Dinov2Model."""
    if cfg.crepa_encoder != TINY_ENCODER or cfg.crepa_use_backbone_features:
        return None
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(seed + 1)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=24, patch_size=4))


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Clean frames (B, F, 3, H, W) in [0, 1] -> normalised latents (B, C, F', H', W'), as the pipelines do."""
    raw = vae.encode(to_vae_input(pixels).to(vae.dtype)).latent_dist.sample()
    view = (1, -1, 1, 1, 1)
    if type(vae).__name__ == "AutoencoderKLWan":   # WanPipeline: (z - mean) / std, config lists
        mean = torch.tensor(vae.config.latents_mean, device=raw.device).view(view)
        std = torch.tensor(vae.config.latents_std, device=raw.device).view(view)
        return (raw - mean) / std
    mean, std = vae.latents_mean.view(view).to(raw), vae.latents_std.view(view).to(raw)   # LTXPipeline
    return (raw - mean) * vae.config.scaling_factor / std


def predict(family: str, transformer, noisy: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One forward on unpacked latents (B, C, F, H, W); returns the prediction in the same layout."""
    if family == "wan":
        return transformer(noisy, timestep, text, return_dict=False)[0]
    b, c, f, h, w = noisy.shape
    packed = noisy.flatten(2).transpose(1, 2)                          # LTX packs tokens (patch size 1)
    mask = torch.ones(b, text.shape[1], device=noisy.device)
    out = transformer(hidden_states=packed, encoder_hidden_states=text, timestep=timestep,
                      encoder_attention_mask=mask, num_frames=f, height=h, width=w, return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, f, h, w)


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

    # REAL MODEL: your video dataset of clean clips (B, F, 3, H, W) in [0, 1], and your text encoder's output
    # (umT5 for Wan, T5 for LTX) instead of the fixed random caption below.
    clips = moving_shapes(16, 9, 48, 48, seed=args.seed)
    loader = DataLoader(TensorDataset(clips), batch_size=args.batch_size, shuffle=True, drop_last=True)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    if len(loader) == 0:  # drop_last with fewer samples than a batch: the loop below would never end
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(loader.dataset)} samples per "
                         "process; use a smaller batch")
    caption = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(args.seed)).to(accelerator.device)

    step = 0
    while step < args.steps:
        for (pixels,) in loader:
            latents = encode(vae, pixels)
            noise = torch.randn_like(latents)
            sigmas = torch.sigmoid(torch.randn(latents.shape[0], device=latents.device))   # logit-normal
            s = sigmas.view(-1, 1, 1, 1, 1)
            noisy = (1 - s) * latents + s * noise                                         # rectified flow
            with accelerator.accumulate(transformer):
                # (2) the usual forward; the hook captures block crepa_block_index
                pred = predict(args.model, transformer, noisy, sigmas * 1000, caption.expand(latents.shape[0], -1, -1))
                loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
                logs = {}
                if reg is not None:
                    # (3) clean latents of this batch (or pixels=pixels: skips the decode)
                    teacher_input = {"latents": latents} if args.teacher_input == "latents" else {"pixels": pixels}
                    reg_loss, logs = reg(**teacher_input, step=step)
                    loss = loss + reg_loss                                                # (4)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                # logs are detached tensors: accelerator.log(...) / wandb take them as they are
                shown = " ".join(f"{k}={v.item():.4f}" for k, v in logs.items())
                accelerator.print(f"step {step + 1}/{args.steps} loss={loss.item():.4f} {shown}")
                step += 1
                if step >= args.steps:
                    break
    if args.output_dir:
        accelerator.save_state(args.output_dir)   # the model, and the regularizer's projector and schedule
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
