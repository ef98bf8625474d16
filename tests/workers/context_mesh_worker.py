"""Data x context mesh worker for tests/test_context_parallel_mesh.py (torch.multiprocessing.spawn target).

Four gloo ranks on a DeviceMesh ("dp", "ring", "ulysses") of shape (2, 1, 2): two data-parallel groups
(ranks 0, 1 and ranks 2, 3), each running diffusers' own context parallelism (Ulysses degree 2, the
custom mesh given to `ContextParallelConfig(mesh=...)`) on the tiny Wan. Each data group trains on its own
batch (its own seed); both context ranks of a group see that batch, as diffusers' context parallelism
requires (every rank passes the full inputs, the model's `_cp_plan` shards the sequence at the first block).
The same four processes run two phases one after the other (PHASES), each on fresh models (seeded, so
both start from the truth's weights) and a fresh schedule, the projector trained by SGD for STEPS steps at
successive `step` values under a recoverable similarity cutoff:

- "ddp": the regularizer is wrapped in DDP over the world, as `accelerator.prepare(reg)` does, and so is
  the transformer. The loss backpropagated is a trainer's: a diffusion loss on the gathered prediction plus
  the regularizer's (DDP needs a gradient for every parameter, which the regularizer's loss alone, reaching
  blocks 0..BLOCK only, does not give; with it, DDP runs under diffusers' context parallelism on gloo).
- "fsdp2": `fully_shard(reg)` over the world instead, so the projector's parameters become sharded DTensors
  (their weights are read back with `.full_tensor()`), and the transformer with `fully_shard` too (each
  block, then the root, over the same world mesh), as an FSDP2 trainer shards a DiT. FSDP2 replaces the
  projector's parameters (sharded DTensors between steps, all-gathered tensors in the forward), which the
  projector's gradient averaging must follow (it is applied in its forward to the parameters the forward
  uses; hooks on the original parameters never fired, and the gradient came out at 1/CONTEXT_RANKS of the
  truth). Sharding the transformer as well checks that the capture hook on a sharded block (FSDP2 swaps
  its class and all-gathers its parameters) still captures under diffusers' Ulysses hooks, which it does
  on gloo. The loss is the same as in "ddp", so the two phases differ in the wrapping only.

The transformer is not stepped in either phase: under diffusers' context parallelism each rank's parameter
gradients are partial and must be summed over the context group, which the world mean of DDP and of FSDP2's
reduce-scatter does not do (it comes out at 1/CONTEXT_RANKS), so the transformer's update is the trainer's
matter (its own reduction), not this package's; kept fixed, it leaves the truth below exact. Per step every
rank saves the logs, the length of its captured shard, whether the projector's parameters are DTensors and
the projector's weights after the update.

`single_process_run` is the truth without torch.distributed: both batches run unsharded through a plain
regularizer (constant λ), and the schedule is applied by hand as docs/contract.md §4 states it: the
optimizer step's score is the mean over the data groups (one call per group), the EMA folds it with the
first value taken as is, the weight of step k is 0 when the EMA of steps 0..k-1 has reached the threshold,
and the projector's gradient is the mean of the two batches' gradients times that weight.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: tiny_models

import tiny_models as tm  # noqa: E402
from repa_kernels.regularizer import CrepaRegularizer  # noqa: E402
from workers.context_parallel_worker import BASE, BATCH, BLOCK, COLUMNS, CONFIGS, FRAMES, ROWS  # noqa: E402

DATA_GROUPS, CONTEXT_RANKS = 2, 2
SEEDS = (11, 12)          # one batch per data group; they give different alignment scores
STEPS = 4
PHASES = ("ddp", "fsdp2")   # how the trainer wraps the transformer and the regularizer, one after the other
LR = 5.0                  # plain SGD (linear in the gradient); the score rises from about -0.02 to 0.15
EMA_DECAY = 0.5
CONFIG = {**BASE, **CONFIGS["cumulative"], "crepa_similarity_ema_decay": EMA_DECAY,
          "crepa_threshold_mode": "recoverable"}   # recoverable: every call computes its loss and score
LAMBDA = CONFIG["crepa_lambda"]
LOG_KEYS = ("crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_alignment_score_ema",
            "crepa_weight", "crepa_cutoff")


def batch(group: int):
    """latents (2, 4, 4, 4, 6) -> 24 tokens, text, teacher features (2, 4, 6, 16) of data group `group`."""
    g = torch.Generator().manual_seed(SEEDS[group])
    latents = torch.randn(BATCH, tm.LATENT_CHANNELS, FRAMES, 2 * ROWS, 2 * COLUMNS, generator=g)
    text = torch.randn(BATCH, tm.TEXT_TOKENS, tm.TEXT_DIM, generator=g)
    features = torch.randn(BATCH, FRAMES, ROWS * COLUMNS, 16, generator=g)
    return latents, text, features


def build(threshold: float | None):
    """The same model and projector weights on every rank (seeded), as in the truth."""
    torch.manual_seed(0)
    model = tm.tiny_wan().train()
    reg = CrepaRegularizer.from_config({**CONFIG, "crepa_similarity_threshold": threshold}, transformer=model,
                                       encoder=tm.tiny_dinov2(), impl="reference")
    return model, reg


def projector_weights(reg) -> dict[str, torch.Tensor]:
    """The projector's whole weights: under FSDP2 its parameters are sharded DTensors, gathered by
    `.full_tensor()` (an all_gather, so every rank calls it at the same point)."""
    from torch.distributed.tensor import DTensor
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in reg.projector.named_parameters()}


def single_process_run(threshold: float | None) -> list[dict]:
    """Per step: each group's unsharded loss, score and self similarity ("groups"), the world's EMA,
    weight and cutoff, and the projector's weights after the update, computed in float64 by hand."""
    model, reg = build(None)                   # no threshold: its weight is λ at every step
    batches = [batch(group) for group in range(DATA_GROUPS)]
    ema, records = None, []
    for step in range(STEPS):
        cutoff = threshold is not None and ema is not None and ema >= threshold   # steps 0..k-1 decide step k
        weight = 0.0 if cutoff else LAMBDA
        groups, grads = [], []
        for latents, text, features in batches:
            model(latents, torch.full((BATCH,), 500.0), text, return_dict=False)
            loss, logs = reg(teacher_features=features, step=step)
            loss.backward()
            grads.append({n: p.grad.double() / LAMBDA for n, p in reg.projector.named_parameters()})
            reg.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            groups.append({"crepa_loss": loss.detach().double() * weight / LAMBDA,
                           "crepa_alignment_score": logs["crepa_alignment_score"].double(),
                           "crepa_similarity_self": logs["crepa_similarity_self"].double()})
        score = sum(g["crepa_alignment_score"].item() for g in groups) / DATA_GROUPS   # the world mean
        ema = score if ema is None else EMA_DECAY * ema + (1.0 - EMA_DECAY) * score
        with torch.no_grad():
            for name, p in reg.projector.named_parameters():
                mean_grad = sum(g[name] for g in grads) / DATA_GROUPS
                p.copy_((p.double() - LR * weight * mean_grad).float())
        records.append({"groups": groups, "crepa_alignment_score_ema": torch.tensor(ema, dtype=torch.float64),
                        "crepa_weight": torch.tensor(weight, dtype=torch.float64),
                        "crepa_cutoff": torch.tensor(float(cutoff), dtype=torch.float64),
                        "weights": projector_weights(reg)})
    reg.detach()
    return records


def wrap(phase: str, model, reg, world_mesh):
    """The transformer and the regularizer wrapped as a trainer of `phase` does, over the world."""
    if phase == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model), DistributedDataParallel(reg)
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:   # each block its own unit, then the root, as FSDP2 trainers shard a DiT
        fully_shard(block, mesh=world_mesh)
    return fully_shard(model, mesh=world_mesh), fully_shard(reg, mesh=world_mesh)


def train(phase: str, mesh, world_mesh, threshold: float) -> list[dict]:
    """One phase on fresh models: STEPS steps, per step the logs, captured shard length, projector weights."""
    from unittest import mock

    from diffusers import ContextParallelConfig
    from torch.distributed.tensor import DTensor

    model, reg = build(threshold)
    kept = {}
    model.blocks[BLOCK].register_forward_hook(lambda block, args, output: kept.update(tokens=output.shape[1]))
    # CPU-only torch has no accelerator: enable_parallelism computes rank % device_count
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=CONTEXT_RANKS, mesh=mesh))
    runner, wrapped = wrap(phase, model, reg, world_mesh)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)     # the projector only
    latents, text, features = batch(mesh["dp"].get_local_rank())
    records = []
    for step in range(STEPS):
        prediction = runner(latents, torch.full((BATCH,), 500.0), text, return_dict=False)[0]
        loss, logs = wrapped(teacher_features=features, step=step)
        (prediction.square().mean() + loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        records.append({"logs": {k: v.detach().clone() for k, v in logs.items()}, "tokens": kept["tokens"],
                        "sharded": all(isinstance(p, DTensor) for p in reg.projector.parameters()),
                        "weights": projector_weights(reg)})
    reg.detach()
    return records


def run(rank: int, world_size: int, init_file: str, out_dir: str, threshold: float) -> None:
    """One rank of the 2 x 2 mesh: saves {phase: [per step: logs, captured shard length, projector weights]}."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    # a finite timeout: ranks that disagree on a collective fail the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (DATA_GROUPS, 1, CONTEXT_RANKS), mesh_dim_names=("dp", "ring", "ulysses"))
        world_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("world",))
        phases = {phase: train(phase, mesh, world_mesh, threshold) for phase in PHASES}
        torch.save({"group": mesh["dp"].get_local_rank(), "phases": phases}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
