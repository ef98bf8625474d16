#!/usr/bin/env python
"""Video CREPA on a Wan transformer whose token sequence is sharded across ranks (diffusers context
parallelism, Ulysses), on a data x context mesh: a training loop to copy into your trainer.

    python python/train_wan_crepa_context_parallel.py --context 2 --steps 5          # 2 CPU processes (gloo)
    python python/train_wan_crepa_context_parallel.py --data 2 --context 2 --steps 5 # 4: 2 data x 2 context

The script starts its own gloo processes on the CPU, with tiny random-init models (transformer, VAE,
DINOv2 teacher; python/train_wan_crepa.py shows the REAL MODEL lines). It has run on CPU only: no
multi-GPU machine was available to this project, so the GPU launch (torchrun, NCCL, one device per rank)
is yours to add; the regularizer's lines do not change.

What context parallelism changes for the regularizer: nothing to call. `transformer.enable_parallelism`
makes each rank's block outputs a shard of the sequence; the regularizer finds the layout on the model at
each call and returns the loss, logs and gradients of the unsharded sequence (the same on every rank of a
context group). Every rank of a context group passes the same batch (diffusers' context parallelism needs
the full inputs on each), and the same `latents=`: each rank decodes only the causal prefix of latent
frames and encodes only the frames its shard and the neighbour halo need. The projector averages its own
gradients (world mean x context size); the transformer's partial gradients are summed over the context
group and averaged over the data groups below, as the regularizer does for its projector.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_wan_crepa import TEXT_DIM, build_models, encode, positive_int  # noqa: E402

from repa_kernels.demo.data import moving_shapes  # noqa: E402
from repa_kernels.regularizer import CrepaConfig, CrepaRegularizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=positive_int, default=1, help="data-parallel groups")
    parser.add_argument("--context", type=positive_int, default=2, help="ranks sharing one sequence (Ulysses)")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def crepa_config() -> CrepaConfig:
    # REAL MODEL (Wan 2.1 480p): crepa_block_index 8, crepa_encoder dinov2_vitg14 at 518 (28 x 49 teacher
    # tokens against 30 x 52 student tokens per frame: the student is resampled, exactly, across shards;
    # here 5 x 5 teacher tokens against 6 x 6 do the same)
    return CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 20,
                                  "crepa_adjacent_distance": 1, "crepa_lambda": 0.5})


def tiny_encoder(seed: int):
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(seed + 1)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=24, patch_size=4))


def enable_context_parallelism(transformer, data: int, context: int, device: torch.device) -> None:
    """diffusers' Ulysses context parallelism on a ("dp", "ring", "ulysses") mesh: one context group per
    data rank. CPU-only torch has no accelerator, and diffusers computes rank % device_count: 1 there."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (data, 1, context), mesh_dim_names=("dp", "ring", "ulysses"))
    with mock.patch("torch.accelerator.device_count", return_value=1):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=context, mesh=mesh))


def reduce_model_gradients(model, context: int) -> None:
    """Each context rank holds a partial gradient of the sequence's loss: sum over the context group, mean
    over the data groups = the world mean times the context size."""
    world = dist.get_world_size()
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad.mul_(context / world)


def train(rank: int, args: argparse.Namespace, init_file: str) -> None:
    world = args.data * args.context
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cpu")
    torch.set_num_threads(1)   # the processes share the machine's cores
    try:
        transformer, vae = build_models("wan", args.seed)   # the same weights on every rank
        transformer.to(device)
        vae.to(device)
        enable_context_parallelism(transformer, args.data, args.context, device)
        reg = CrepaRegularizer.from_config(crepa_config(), transformer=transformer, vae=vae,
                                           encoder=tiny_encoder(args.seed), max_train_steps=args.steps).to(device)
        params = list(transformer.parameters()) + list(reg.parameters())
        optimizer = torch.optim.AdamW(params, lr=args.lr)

        data_rank = rank // args.context   # both ranks of a context group draw the same batches
        clips = moving_shapes(8 * args.batch_size, 9, 48, 48, seed=args.seed + data_rank)
        caption = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(args.seed)).to(device)
        draw = torch.Generator().manual_seed(args.seed + 100 * data_rank)
        for step in range(args.steps):
            pixels = clips[torch.randperm(len(clips), generator=draw)[:args.batch_size]].to(device)
            latents = encode(vae, pixels)
            noise = torch.randn(latents.shape, generator=draw).to(device)
            sigmas = torch.sigmoid(torch.randn(latents.shape[0], generator=draw)).to(device)
            s = sigmas.view(-1, 1, 1, 1, 1)
            noisy = (1 - s) * latents + s * noise
            pred = transformer(noisy, sigmas * 1000, caption.expand(latents.shape[0], -1, -1), return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
            reg_loss, logs = reg(latents=latents, step=step)   # this rank's shard, the whole clip's loss
            (loss + reg_loss).backward()
            reduce_model_gradients(transformer, args.context)   # the projector reduces its own
            optimizer.step()
            optimizer.zero_grad()
            if rank == 0:
                shown = " ".join(f"{k}={v.item():.4f}" for k, v in logs.items())
                print(f"step {step + 1}/{args.steps} loss={loss.item():.4f} {shown}", flush=True)
        if rank == 0:
            teacher = reg._teacher
            print(f"rank 0 decoded {teacher.frames_decoded} and encoded {teacher.frames_encoded} frames "
                  f"over {args.steps} steps of {args.batch_size} clips (latents {tuple(latents.shape)})", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    heads = build_models("wan", args.seed)[0].config.num_attention_heads
    if heads % args.context:   # Ulysses gives each context rank whole attention heads
        raise SystemExit(f"--context {args.context} must divide the transformer's {heads} attention heads (Ulysses)")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(train, args=(args, os.path.join(folder, "rendezvous")), nprocs=args.data * args.context, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
