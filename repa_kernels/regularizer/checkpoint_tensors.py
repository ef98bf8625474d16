"""Read only the tensors under one name prefix of a safetensors checkpoint (a local directory or a hub id).

A vision-language checkpoint (Qwen2.5-VL-7B: 16.6 GB) holds a vision tower of about 1.3 GB; the teacher
needs that tower only. The checkpoint's `model.safetensors.index.json` maps every tensor name to its
shard, so only the shards holding the prefix are opened (and, from the hub, downloaded), and from those
only the prefixed tensors are read (safetensors reads tensor by tensor, memory-mapped). Transformers
writes the tower under `visual.` (Qwen2.5-VL, its legacy layout) or `model.visual.` (Qwen3-VL).

Safetensors only: a checkpoint without `model.safetensors` / `model.safetensors.index.json` is refused
(no pickle is ever unpickled). Files are found with transformers' `cached_file`, so HF_HUB_OFFLINE and
the hub cache behave as in `from_pretrained`.
"""

from __future__ import annotations

import json

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointTensorsError(OSError):
    """The checkpoint has no safetensors weights, or no tensor under the prefixes asked for."""


def _find(where: str, filename: str) -> str | None:
    from transformers.utils import cached_file

    return cached_file(where, filename, _raise_exceptions_for_missing_entries=False)


def _tensor_names(where: str) -> tuple[dict[str, str], str | None]:
    """Every tensor name -> the file that holds it, and the index path (None for one file)."""
    index = _find(where, INDEX_FILE)
    if index is not None:
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointTensorsError(f"{where}: {INDEX_FILE} has no weight_map")
        return dict(weight_map), index
    single = _find(where, SINGLE_FILE)
    if single is None:
        raise CheckpointTensorsError(f"{where} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                                     "pickled checkpoints are never loaded")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: SINGLE_FILE for name in handle.keys()}, None


def load_prefixed_tensors(where: str, prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors whose names start with the first of `prefixes` that the checkpoint uses, with that
    prefix removed, and the prefix. Only the files holding them are opened."""
    from safetensors import safe_open

    names, _ = _tensor_names(where)
    prefix = next((p for p in prefixes if any(name.startswith(p) for name in names)), None)
    if prefix is None:
        raise CheckpointTensorsError(f"{where} has no tensor under {' or '.join(map(repr, prefixes))}")
    by_file: dict[str, list[str]] = {}
    for name, filename in names.items():
        if name.startswith(prefix):
            by_file.setdefault(filename, []).append(name)
    tensors = {}
    for filename, wanted in sorted(by_file.items()):
        path = _find(where, filename)
        if path is None:
            raise CheckpointTensorsError(f"{where}: the shard {filename} named by {INDEX_FILE} is missing")
        with safe_open(path, framework="pt") as handle:
            for name in wanted:
                tensors[name[len(prefix):]] = handle.get_tensor(name)
    return tensors, prefix
