"""Feature-cache writers in other processes, for tests/test_feature_cache.py.

- `gloo_writers` (a torch.multiprocessing.spawn target): each rank of a 2-process gloo group writes
  its keys (half of them shared with the other rank) into one cache at the same time, waits at a
  barrier, then reads every key and records whether it matches `features_for(key)`.
- `python cache_writer_worker.py ROOT`: writes entries one shard at a time forever, printing each
  flushed key; the test kills it with SIGKILL at an arbitrary moment.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import torch

IDENTITY = dict(encoder="test-encoder", encoder_weights="0" * 64, encoder_dtype="float32", image_size=32,
                tokens="patch", patch_size=8, storage_dtype="bfloat16")
FRAMES, ROWS, COLUMNS, WIDTH = 2, 4, 4, 8


def features_for(key: str) -> torch.Tensor:
    """Features that depend only on the key: a writer and a reader agree without talking."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(FRAMES, ROWS, COLUMNS, WIDTH, generator=generator)


def open_cache(root: str, **options):
    from repa_kernels.regularizer.feature_cache import CacheIdentity, FeatureCache
    return FeatureCache(root, CacheIdentity(**IDENTITY), **options)


def put(cache, key: str) -> None:
    cache.put(key, features_for(key), grid=(FRAMES, ROWS, COLUMNS), frame_indices=[0, 4], source_frames=5)


def gloo_writers(rank: int, world_size: int, rendezvous: str, root: str, keys_per_rank: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        cache = open_cache(root, shard_megabytes=0.001)   # a shard every few entries: many concurrent writes
        mine = [f"shared-{i}" for i in range(keys_per_rank // 2)] + \
               [f"rank{rank}-{i}" for i in range(keys_per_rank - keys_per_rank // 2)]
        dist.barrier()                                    # start writing together
        for key in mine:
            put(cache, key)
        cache.flush()
        dist.barrier()
        wanted = [f"shared-{i}" for i in range(keys_per_rank // 2)] + \
                 [f"rank{r}-{i}" for r in range(world_size) for i in range(keys_per_rank - keys_per_rank // 2)]
        results = {}
        for key in wanted:
            entry = cache.get(key, (FRAMES, ROWS, COLUMNS))
            results[key] = entry is not None and torch.equal(entry.features.float(),
                                                             features_for(key).bfloat16().float())
        with open(os.path.join(root, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
        cache.close()
    finally:
        dist.destroy_process_group()


def write_forever(root: str) -> None:
    cache = open_cache(root)
    index = 0
    while True:
        key = f"sample-{index}"
        put(cache, key)
        cache.flush()
        print(key, flush=True)
        index += 1


if __name__ == "__main__":
    write_forever(sys.argv[1])
