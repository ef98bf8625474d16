"""Context-parallel worker for tests/test_context_parallel.py (torch.multiprocessing.spawn target).

A trainer with its own sequence parallelism is played by two hooks on a tiny Wan: the output of block
`crepa_block_index` is cut to this rank's token range (so the regularizer's capture sees a shard, as under
diffusers' context parallelism), and the next block gets the full output back (the model runs on, its
prediction unused: only the regularizer's loss is backpropagated). Every rank runs the same full forward
from the same seed, so the shard is exactly the single-process run's tokens. Per case it saves the loss,
the logs, the gradient of its shard of the captured hidden states and the projector's gradients, and the
logs of a second call at the next step (which holds the similarity EMA of the first).
`single_process_run` computes the same on the whole sequence without torch.distributed: the truth.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: tiny_models

import tiny_models as tm  # noqa: E402
from repa_kernels.regularizer import CrepaRegularizer  # noqa: E402

BATCH, FRAMES, ROWS, COLUMNS = 2, 4, 2, 3        # latents (2, 4, 4, 4, 6) -> token grid (4, 2, 3): 24 tokens
TOKENS = FRAMES * ROWS * COLUMNS
BLOCK = 1
BASE = {"crepa_enabled": True, "crepa_block_index": BLOCK, "crepa_encoder_image_size": 16, "crepa_lambda": 0.5}
CONFIGS = {
    "adjacent": {},                                                        # d = 1, neighbours at +-1
    "cumulative": {"crepa_adjacent_distance": 2, "crepa_cumulative_neighbors": True,   # a halo of 2 frames
                   "crepa_normalize_neighbour_sum": True, "crepa_adjacent_tau": 0.7},
}
# (config, shards of the context group in group-rank order), per world size
CASES = {
    2: [("cumulative", [(0, 12), (12, 24)]),          # whole frames
        ("cumulative", [(0, 9), (9, 24)]),            # a frame split, uneven
        ("adjacent", [(0, 15), (15, 24)])],
    3: [("cumulative", [(0, 6), (6, 18), (18, 24)]),  # whole frames, uneven
        ("cumulative", [(0, 2), (2, 5), (5, 24)]),    # shards smaller than a frame
        ("adjacent", [(0, 11), (11, 13), (13, 24)])],  # uneven, boundaries inside frames
}


def inputs():
    g = torch.Generator().manual_seed(700)
    latents = torch.randn(BATCH, tm.LATENT_CHANNELS, FRAMES, 2 * ROWS, 2 * COLUMNS, generator=g)
    text = torch.randn(BATCH, tm.TEXT_TOKENS, tm.TEXT_DIM, generator=g)
    features = torch.randn(BATCH, FRAMES, ROWS * COLUMNS, 16, generator=g)
    return latents, text, features

def two_calls(model, reg, kept) -> dict:
    """Step 0 (loss, logs, gradients of the captured states and the projector), then step 1's logs: its call
    folds step 0's score into the similarity EMA (averaged over the world)."""
    latents, text, features = inputs()
    model(latents, torch.full((BATCH,), 500.0), text, return_dict=False)
    loss, logs = reg(teacher_features=features, step=0)
    loss.backward()
    result = {"loss": loss.detach().clone(), "logs": {k: v.clone() for k, v in logs.items()},
              "captured_grad": kept["captured"].grad.detach().clone(),
              "projector_grads": {n: p.grad.detach().clone() for n, p in reg.named_parameters()}}
    model(latents, torch.full((BATCH,), 500.0), text, return_dict=False)
    result["next_logs"] = {k: v.detach().clone() for k, v in reg(teacher_features=features, step=1)[1].items()}
    return result



def run_case(config: str, shard: tuple[int, int] | None, group=None) -> dict:
    """One regularizer call at step 0 on a fresh model; shard None: the whole sequence, no parallelism."""
    torch.manual_seed(0)
    model = tm.tiny_wan().train()
    kept = {}

    def cut(block, args, output):
        kept["full"] = output
        part = output if shard is None else output[:, shard[0]:shard[1]]
        part.retain_grad()
        kept["captured"] = part
        return part

    def restore(block, args, kwargs):
        return (kept["full"], *args[1:]), kwargs

    handles = [model.blocks[BLOCK].register_forward_hook(cut),
               model.blocks[BLOCK + 1].register_forward_pre_hook(restore, with_kwargs=True)]
    reg = CrepaRegularizer.from_config({**BASE, **CONFIGS[config]}, transformer=model, encoder=tm.tiny_dinov2(),
                                       impl="reference")
    if shard is not None:
        reg.set_context_parallel(group, shard=shard)
    result = two_calls(model, reg, kept)
    reg.detach()
    for handle in handles:
        handle.remove()
    return result


def single_process_run(world_size: int) -> list[dict]:
    return [run_case(config, None) for config, _ in CASES[world_size]]


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        group = dist.new_group(list(range(world_size)))
        results = [run_case(config, shards[rank], group) for config, shards in CASES[world_size]]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_diffusers(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """diffusers' own context parallelism (Ulysses over all ranks) on the tiny Wan: the regularizer finds
    the layout itself. CPU-only torch has no accelerator, so `enable_parallelism` gets a device count of 1
    (it computes rank % device_count)."""
    from unittest import mock

    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = tm.tiny_wan().train()
        kept = {}

        def keep(block, args, output):
            output.retain_grad()
            kept["captured"] = output

        model.blocks[BLOCK].register_forward_hook(keep)
        with mock.patch("torch.accelerator.device_count", return_value=1):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
        reg = CrepaRegularizer.from_config({**BASE, **CONFIGS["cumulative"]}, transformer=model,
                                           encoder=tm.tiny_dinov2(), impl="reference")
        result = two_calls(model, reg, kept)
        torch.save([result], os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
