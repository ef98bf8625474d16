"""Distributed training worker for tests/test_distributed.py (torch.multiprocessing.spawn target).

Every rank builds the same tiny Wan + CrepaRegularizer, wraps the model in DDP (or FSDP2 `fully_shard`)
and leaves the regularizer unwrapped (its projector averages its own gradients across ranks), trains on
its half of each step's batch and saves, per step, the logs and the gradients of every parameter, and the final
weights, to OUT_DIR/{mode}_rank{r}.pt. Mode "fsdp_bf16" casts the model to bfloat16 after the regularizer
exists (as trainers do); the projector stays float32.
`single_process_run` does the same on the whole batch without torch.distributed: the ground truth.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: tiny_models

import tiny_models as tm  # noqa: E402
from repa_kernels.regularizer import CrepaRegularizer  # noqa: E402

BATCH = 4            # per step, split evenly over the ranks
STEPS = 6
# Plain SGD: the weight update is linear in the gradient, so final weights agree with the single-process
# run to within LR times the per-step gradient tolerances (tests/test_distributed.py derives its weight
# tolerance from exactly that). Adam is not: it turns a rounding-level gradient difference on a parameter
# whose gradient is near zero into a full lr-sized step, so its weights compare noise.
LR = 0.3
CONFIG = {
    "crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16, "crepa_lambda": 0.5,
    "crepa_similarity_ema_decay": 0.5, "crepa_threshold_mode": "permanent",
}


def step_batch(step: int):
    """latents (B, 4, 3, 4, 6), text (B, 3, 16), teacher features (B, 3, 15, 16), diffusion target.

    The same clips every step (so the projector learns and the alignment score rises), new targets."""
    g = torch.Generator().manual_seed(500)
    latents = torch.randn(BATCH, 4, 3, 4, 6, generator=g)
    text = torch.randn(BATCH, tm.TEXT_TOKENS, tm.TEXT_DIM, generator=g)
    features = torch.randn(BATCH, 3, 15, 16, generator=g)
    # The two halves get teachers of different difficulty, so the ranks' local scores differ.
    features[BATCH // 2:] += 2.0 * torch.randn(16, generator=g)
    target = torch.randn(BATCH, 4, 3, 4, 6, generator=torch.Generator().manual_seed(600 + step))
    return latents, text, features, target


def build(threshold: float, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config({**CONFIG, "crepa_similarity_threshold": threshold}, transformer=model,
                                       encoder=tm.tiny_dinov2(), max_train_steps=STEPS, impl="auto")
    model.to(dtype)                 # a trainer's cast after the regularizer exists: the projector stays fp32
    return model, reg


def named_parameters(model, reg):
    """The model's parameters and the regularizer's (its projector), as `projector.*`."""
    return [*model.named_parameters(), *reg.named_parameters()]


def train(model, runner, reg, rows: slice, optimizer) -> dict:
    """runner: the model itself, or its DDP / FSDP wrapper. Returns per-step logs and gradients."""
    records = {}
    dtype = next(model.parameters()).dtype
    for step in range(STEPS):
        latents, text, features, target = (t[rows] for t in step_batch(step))
        optimizer.zero_grad(set_to_none=True)
        pred = runner(latents.to(dtype), torch.full((latents.shape[0],), 500.0), text.to(dtype), return_dict=False)[0]
        reg_loss, logs = reg(teacher_features=features, step=step)
        ((pred.float() - target).square().mean() + reg_loss).backward()
        grads = {}
        for name, p in named_parameters(model, reg):
            if p.grad is not None:
                g = p.grad
                grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        records[step] = {"logs": {k: v.detach().clone() for k, v in logs.items()}, "grads": grads}
        optimizer.step()
    return records


def weights(model, reg) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in named_parameters(model, reg)}


def make_optimizer(model, reg) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for _, p in named_parameters(model, reg)], lr=LR)


def single_process_run(threshold: float, dtype: torch.dtype = torch.float32) -> dict:
    model, reg = build(threshold, dtype)
    optimizer = make_optimizer(model, reg)
    records = train(model, model, reg, slice(None), optimizer)
    return {"records": records, "weights": weights(model, reg)}


def run(rank: int, world_size: int, init_file: str, out_dir: str, modes: tuple[str, ...], threshold: float) -> None:
    """One rank: for each mode ("ddp", "fsdp") a fresh model trained from the same seed, saved to
    OUT_DIR/{mode}_rank{rank}.pt. One process group serves every mode (spawning costs ~10 s per process)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for mode in modes:
            model, reg = build(threshold, torch.bfloat16 if mode == "fsdp_bf16" else torch.float32)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                runner = DistributedDataParallel(model)           # find_unused_parameters=False: strict
            elif mode in ("fsdp", "fsdp_bf16"):
                from torch.distributed.fsdp import fully_shard
                for block in model.blocks:
                    fully_shard(block)
                runner = fully_shard(model)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            optimizer = make_optimizer(model, reg)
            per_rank = BATCH // world_size
            records = train(model, runner, reg, slice(rank * per_rank, (rank + 1) * per_rank), optimizer)
            torch.save({"records": records, "weights": weights(model, reg), "schedule": reg.schedule.state_dict(),
                        "projector_dtypes": sorted({str(p.dtype) for p in reg.parameters()})},
                       os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
            reg.detach()
            dist.barrier()
    finally:
        dist.destroy_process_group()
