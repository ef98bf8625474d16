"""Training worker for tests/test_resume.py: a tiny Wan + CrepaRegularizer trained with AdamW.

    python resume_worker.py full   --steps N --save-at K --checkpoint CKPT --out OUT [--threshold X]
    python resume_worker.py resume --steps N --checkpoint CKPT --out OUT [--threshold X]

`full` runs steps 0..N-1 and, before step K, saves the model, the optimizer and the regularizer
state_dict (its projector and schedule) to CKPT. `resume` builds everything afresh in this new
process, loads CKPT and runs steps K..N-1. Both write, per step, the losses and the regularizer logs,
and at the end the model's and the regularizer's state_dicts, to OUT (torch.save). Every input is a function of the step, so
the two runs see the same data.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: tiny_models

import tiny_models as tm  # noqa: E402
from repa_kernels.regularizer import CrepaRegularizer  # noqa: E402

CONFIG = {
    "crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16, "crepa_lambda": 0.5,
    "crepa_scheduler": "cosine", "crepa_warmup_steps": 2, "crepa_decay_steps": 0, "crepa_lambda_end": 0.1,
    "crepa_similarity_ema_decay": 0.5, "crepa_threshold_mode": "permanent",
    "crepa_adjacent_distance": 1, "crepa_normalize_neighbour_sum": True,
}


def step_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(1, 4, 3, 4, 6, generator=g), torch.randn(1, 4, 3, 4, 6, generator=g)


def build(steps: int, threshold: float | None):
    transformer = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config({**CONFIG, "crepa_similarity_threshold": threshold}, transformer=transformer,
                                       vae=tm.tiny_wan_vae(), encoder=tm.tiny_dinov2(), max_train_steps=steps)
    optimizer = torch.optim.AdamW([*transformer.parameters(), *reg.parameters()], lr=3e-2, weight_decay=0.01)
    return transformer, reg, optimizer


def train_step(transformer, reg, optimizer, step: int) -> dict:
    latents, target = step_data(step)
    optimizer.zero_grad(set_to_none=True)
    pred = tm.tiny_forward(transformer, latents)
    diffusion = (pred - target).square().mean()
    reg_loss, logs = reg(latents=latents, step=step)
    (diffusion + reg_loss).backward()
    optimizer.step()
    return {"diffusion": diffusion.detach(), "reg_loss": reg_loss.detach(), **logs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["full", "resume"])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threshold", type=float)
    args = parser.parse_args()
    torch.set_num_threads(1)   # the same reduction order in both processes, whatever else runs on the machine
    transformer, reg, optimizer = build(args.steps, args.threshold)
    records = {}
    first = 0
    if args.phase == "resume":
        state = torch.load(args.checkpoint)
        transformer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        reg.load_state_dict(state["regularizer"])
        first = state["step"]
    for step in range(first, args.steps):
        if args.phase == "full" and step == args.save_at:
            torch.save({"model": transformer.state_dict(), "optimizer": optimizer.state_dict(),
                        "regularizer": reg.state_dict(), "step": step}, args.checkpoint)
        records[step] = train_step(transformer, reg, optimizer, step)
    torch.save({"records": records, "model": transformer.state_dict(), "regularizer": reg.state_dict(),
                "schedule": reg.schedule.state_dict()}, args.out)


if __name__ == "__main__":
    main()
