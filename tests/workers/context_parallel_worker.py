"""Context-parallel worker for tests/test_context_parallel.py (torch.multiprocessing.spawn target).

A trainer with its own sequence parallelism is played by two hooks on a tiny Wan: the output of block
`crepa_block_index` is cut to this rank's token range (so the regularizer's capture sees a shard, as under
diffusers' context parallelism), and the next block gets the full output back (the model runs on, its
prediction unused: only the regularizer's loss is backpropagated). Every rank runs the same full forward
from the same seed, so the shard is exactly the single-process run's tokens. The teacher of a case is
teacher_features on the student grid, coarser (the student resampled) or finer (the teacher resampled),
latents decoded by a tiny Wan VAE, pixels (also through a feature cache, filled or empty), a deeper
block (backbone mode, cut at the same shard), or the pooled and CLS modes. With 2 ranks the same spawn
then runs diffusers' own context parallelism (`run_diffusers_case`: Ulysses on a tiny Wan and a tiny
Flux). Per case it saves the loss, the logs, the gradient of its shard of the captured hidden states,
the projector's gradients, the frames the teacher decoded and encoded, and the logs of a second call at
the next step (which holds the similarity EMA of the first). `run_case(config, None, teacher=...)` and
`run_diffusers_case(..., None)` compute the same unsharded, without torch.distributed: the truth.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: tiny_models

import tiny_models as tm  # noqa: E402
from repa_kernels.regularizer import CrepaRegularizer  # noqa: E402

BATCH, FRAMES, ROWS, COLUMNS = 2, 4, 2, 3        # latents (2, 4, 4, 4, 6) -> token grid (4, 2, 3): 24 tokens
TOKENS = FRAMES * ROWS * COLUMNS
BLOCK = 1
TEACHER_BLOCK = 2                                # backbone mode: the last block, also sharded
BASE = {"crepa_enabled": True, "crepa_block_index": BLOCK, "crepa_encoder_image_size": 16, "crepa_lambda": 0.5}
CONFIGS = {
    "adjacent": {},                                                        # d = 1, neighbours at +-1
    "cumulative": {"crepa_adjacent_distance": 2, "crepa_cumulative_neighbors": True,   # a halo of 2 frames
                   "crepa_normalize_neighbour_sum": True, "crepa_adjacent_tau": 0.7},
}
# The teacher input of a case, and the config it adds. The student grid is 2 x 3 tokens per frame.
TEACHERS = {
    "features": {},                    # teacher_features on the student grid
    "coarse features": {},             # 1 x 2 teacher tokens per frame: the student is resampled (whole frames)
    "fine features": {},               # 4 x 6: the teacher is resampled onto the student grid
    "latents": {},                     # tiny Wan VAE (7 frames of 16 x 24), DINOv2 patch 8 at 16 x 16: 2 x 2
    "pixels": {},                      # 7 frames of 16 x 24 pixels, DINOv2 at 12 x 20: 3 x 5 (teacher resampled)
    "cached pixels": {},               # pixels through a float32 feature cache filled beforehand: windows of hits
    "uncached pixels": {},             # pixels through an empty feature cache: the window computed, not stored
    "backbone": {"crepa_use_backbone_features": True, "crepa_teacher_block_index": TEACHER_BLOCK},
    "pooled features": {"crepa_spatial_align": False},   # one mean vector per frame on each side
    "pooled backbone": {"crepa_spatial_align": False, "crepa_use_backbone_features": True,
                        "crepa_teacher_block_index": TEACHER_BLOCK},
    "cls pixels": {"crepa_encoder_tokens": "cls"},         # the student's mean token against DINOv2's CLS
}
FEATURE_TOKENS = {"features": ROWS * COLUMNS, "coarse features": 2, "fine features": 24, "pooled features": 2}
# (config, teacher, shards of the context group in group-rank order), per world size
CASES = {
    2: [("cumulative", "features", [(0, 12), (12, 24)]),          # whole frames
        ("cumulative", "features", [(0, 9), (9, 24)]),            # a frame split, uneven
        ("adjacent", "features", [(0, 15), (15, 24)]),
        ("cumulative", "coarse features", [(0, 9), (9, 24)]),     # a split frame resampled by rank 0
        ("adjacent", "fine features", [(0, 13), (13, 24)]),
        ("adjacent", "latents", [(0, 9), (9, 24)]),               # rank 0 decodes a causal prefix
        ("cumulative", "pixels", [(0, 12), (12, 24)]),
        ("adjacent", "cached pixels", [(0, 12), (12, 24)]),
        ("adjacent", "uncached pixels", [(0, 12), (12, 24)]),
        ("cumulative", "backbone", [(0, 9), (9, 24)]),
        ("cumulative", "pooled features", [(0, 9), (9, 24)]),
        ("adjacent", "cls pixels", [(0, 12), (12, 24)])],
    3: [("cumulative", "features", [(0, 6), (6, 18), (18, 24)]),  # whole frames, uneven
        ("cumulative", "features", [(0, 2), (2, 5), (5, 24)]),    # shards smaller than a frame
        ("adjacent", "features", [(0, 11), (11, 13), (13, 24)]),  # uneven, boundaries inside frames
        ("cumulative", "coarse features", [(0, 2), (2, 5), (5, 24)]),   # rank 1 resamples no frame of its own
        ("adjacent", "latents", [(0, 11), (11, 13), (13, 24)]),
        ("adjacent", "backbone", [(0, 2), (2, 5), (5, 24)]),
        ("cumulative", "pooled features", [(0, 2), (2, 5), (5, 24)]),   # rank 1 computes no teacher frame
        ("adjacent", "pooled backbone", [(0, 11), (11, 13), (13, 24)]),
        ("cumulative", "cls pixels", [(0, 2), (2, 5), (5, 24)])],
}
PIXEL_FRAMES = 2 * (FRAMES - 1) + 1              # what the tiny Wan VAE (temporal ratio 2) decodes


def inputs():
    g = torch.Generator().manual_seed(700)
    latents = torch.randn(BATCH, tm.LATENT_CHANNELS, FRAMES, 2 * ROWS, 2 * COLUMNS, generator=g)
    text = torch.randn(BATCH, tm.TEXT_TOKENS, tm.TEXT_DIM, generator=g)
    features = torch.randn(BATCH, FRAMES, ROWS * COLUMNS, 16, generator=g)
    return latents, text, features


def teacher_input(teacher: str, latents: torch.Tensor) -> dict:
    """The call's teacher keyword argument for `teacher` (the same on every rank: one seed)."""
    g = torch.Generator().manual_seed(701)
    if teacher in FEATURE_TOKENS:
        return {"teacher_features": torch.randn(BATCH, FRAMES, FEATURE_TOKENS[teacher], 16, generator=g)}
    if teacher.endswith("pixels"):
        pixels = {"pixels": torch.rand(BATCH, PIXEL_FRAMES, 3, 16, 24, generator=g)}
        return {**pixels, "cache_keys": [f"clip-{i}" for i in range(BATCH)]} if "cached" in teacher else pixels
    return {"latents": latents} if teacher == "latents" else {}


def wan_forward(model, latents, text):
    return model(latents, torch.full((BATCH,), 500.0), text, return_dict=False)


def flux_latents() -> torch.Tensor:
    """Unpacked Flux latents (2, 4, 8, 12): 4 x 6 = 24 packed image tokens."""
    return torch.randn(BATCH, tm.LATENT_CHANNELS, 8, 12, generator=torch.Generator().manual_seed(703))


def flux_forward(model, latents, text):
    """FluxPipeline's packed call; 4 caption tokens (diffusers' Flux plan shards the caption too: even)."""
    caption = torch.randn(BATCH, 4, tm.TEXT_DIM, generator=torch.Generator().manual_seed(702))
    pooled = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(704))
    height, width = latents.shape[-2:]
    return model(tm.pack_flux(latents), caption, pooled, torch.full((BATCH,), 0.5), tm.flux_image_ids(height, width),
                 torch.zeros(4, 3), return_dict=False)


def two_calls(model, reg, kept, teacher: str = "features", forward=wan_forward, latents=None) -> dict:
    """Step 0 (loss, logs, gradients of the captured states and the projector), then step 1's logs: its call
    folds step 0's score into the similarity EMA (averaged over the world). latents: the model's own
    (default: the Wan latents of inputs())."""
    wan_latents, text, features = inputs()
    latents = wan_latents if latents is None else latents
    given = {"teacher_features": features} if teacher == "features" else teacher_input(teacher, latents)
    decoded, encoded = reg._teacher.frames_decoded, reg._teacher.frames_encoded   # before this call
    forward(model, latents, text)
    loss, logs = reg(step=0, **given)
    loss.backward()
    result = {"loss": loss.detach().clone(), "logs": {k: v.clone() for k, v in logs.items()},
              "captured_grad": kept["captured"].grad.detach().clone(),
              "projector_grads": {n: p.grad.detach().clone() for n, p in reg.named_parameters()},
              "frames_decoded": reg._teacher.frames_decoded - decoded,
              "frames_encoded": reg._teacher.frames_encoded - encoded}
    if "cache_keys" in given:
        result["cache"] = {"entries": len(reg.feature_cache("pixels")), **reg.feature_cache("pixels").stats()}
    forward(model, latents, text)
    result["next_logs"] = {k: v.detach().clone() for k, v in reg(step=1, **given)[1].items()}
    return result


def run_case(config: str, shard: tuple[int, int] | None, group=None, teacher: str = "features") -> dict:
    """One regularizer call at step 0 on a fresh model; shard None: the whole sequence, no parallelism.
    In backbone mode the teacher block's output is cut at the same shard as the student's."""
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

    def cut_teacher(block, args, output):
        kept["teacher_full"] = output
        return output if shard is None else output[:, shard[0]:shard[1]]

    def restore_teacher(module, args):
        return (kept["teacher_full"], *args[1:])

    handles = [model.blocks[BLOCK].register_forward_hook(cut),
               model.blocks[BLOCK + 1].register_forward_pre_hook(restore, with_kwargs=True)]
    if teacher.endswith("backbone"):
        handles += [model.blocks[TEACHER_BLOCK].register_forward_hook(cut_teacher),
                    model.norm_out.register_forward_pre_hook(restore_teacher)]
    cached = teacher in ("cached pixels", "uncached pixels")
    if cached and shard is None:   # the truth computes without a cache
        teacher = "pixels"
    cache_dir = tempfile.mkdtemp(prefix="cp-cache-") if cached and shard is not None else None
    reg = CrepaRegularizer.from_config({**BASE, **CONFIGS[config], **TEACHERS[teacher]}, transformer=model,
                                       encoder=tm.tiny_dinov2(patch_size=8 if teacher == "latents" else 4),
                                       vae=tm.tiny_wan_vae() if teacher == "latents" else None, impl="reference",
                                       feature_cache=cache_dir, feature_cache_dtype="float32")
    if teacher == "cached pixels":   # filled before training, whole clips (the student grid given per sample)
        given = teacher_input(teacher, inputs()[0])
        reg.precompute_teacher_features([(key, given["pixels"][i], (FRAMES, ROWS, COLUMNS))
                                         for i, key in enumerate(given["cache_keys"])], source="pixels", progress=False)
    if shard is not None:
        reg.set_context_parallel(group, shard=shard)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = two_calls(model, reg, kept, teacher)
    result["warnings"] = [str(w.message) for w in caught if "context parallelism" in str(w.message)]
    reg.detach()
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    for handle in handles:
        handle.remove()
    return result


# (config, teacher, family)
DIFFUSERS_CASES = [("cumulative", "features", "wan"),   # equal grids
                   ("adjacent", "latents", "wan"),      # the Wan 480p + DINOv2 518 px situation: the student resampled
                   ("adjacent", "latents", "flux")]     # image REPA: 4 x 6 Flux tokens against DINOv2's 3 x 5


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """All cases of one world size in one spawn: the explicit layouts (CASES), then, with 2 ranks,
    diffusers' own context parallelism (DIFFUSERS_CASES). Saves {"explicit": [...], "diffusers": [...]}."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        group = dist.new_group(list(range(world_size)))
        results = {"explicit": [run_case(config, shards[rank], group, teacher)
                                for config, teacher, shards in CASES[world_size]],
                   "diffusers": [run_diffusers_case(config, teacher, family, world_size)
                                 for config, teacher, family in (DIFFUSERS_CASES if world_size == 2 else [])]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_diffusers_case(config: str, teacher: str, family: str, world_size: int | None) -> dict:
    """diffusers' own context parallelism (Ulysses over all `world_size` ranks) on a tiny Wan (split at its
    first block) or Flux (split at the model's input, caption included): the regularizer finds the layout
    itself; world_size None: the same call unsharded, the truth. CPU-only torch has no accelerator, so
    `enable_parallelism` gets a device count of 1 (it computes rank % device_count)."""
    from unittest import mock

    from diffusers import ContextParallelConfig

    torch.manual_seed(0)
    model = (tm.tiny_wan() if family == "wan" else tm.tiny_flux()).train()
    blocks = model.blocks if family == "wan" else model.transformer_blocks
    kept = {}

    def keep(block, args, output):
        image = output if family == "wan" else output[1]   # Flux blocks return (text, image)
        image.retain_grad()
        kept["captured"] = image

    blocks[BLOCK].register_forward_hook(keep)
    if world_size is not None:
        with mock.patch("torch.accelerator.device_count", return_value=1):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
    vae = None if teacher != "latents" else tm.tiny_wan_vae() if family == "wan" else tm.tiny_image_vae()
    reg = CrepaRegularizer.from_config(
        {**BASE, **CONFIGS[config], **TEACHERS[teacher]}, transformer=model, impl="reference", vae=vae,
        encoder=tm.tiny_dinov2(patch_size=8 if family == "wan" and teacher == "latents" else 4))
    if family == "wan":
        return two_calls(model, reg, kept, teacher)
    return two_calls(model, reg, kept, teacher, flux_forward, flux_latents())
