"""`repa-kernels cache DIR`: what a teacher-feature cache holds.

DIR is a cache root (one folder per identity below it) or one identity's folder. For each identity:
the identity fields (encoder and its weight hash, image size, token mode, dtypes, rules' versions),
the number of keys, entries and shards, the bytes on disk, the temporary files killed writers left
(safe to delete when no writer runs) and the shards that cannot be read. `--verify` also reads every
entry and checks its CRC-32 (reads the whole cache). `--json` prints the same as one JSON object.
Only the safetensors headers are read otherwise, so it is quick on a large cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .regularizer.feature_cache import (SHARD_SUFFIX, TEMPORARY_SUFFIX, CacheIdentity, FeatureCache,
                                        FeatureCacheError, ShardError, read_shard_header)


def identity_folders(path: Path) -> list[Path]:
    """The identity folders at or directly below `path`."""
    if (path / "identity.json").is_file():
        return [path]
    if not path.is_dir():
        raise FeatureCacheError(f"{path} does not exist or is not a folder")
    folders = sorted(p for p in path.iterdir() if (p / "identity.json").is_file())
    if not folders:
        raise FeatureCacheError(f"{path} holds no feature cache (no identity.json in it or in its sub-folders)")
    return folders


def describe(folder: Path, verify: bool = False) -> dict:
    """The facts `cache` prints for one identity folder."""
    identity = CacheIdentity.from_dict(json.loads((folder / "identity.json").read_text()))
    shards = folder / "shards"
    names = sorted(p.name for p in shards.iterdir()) if shards.is_dir() else []
    keys: set[str] = set()
    entries = size = 0
    unreadable = []
    shard_names = [n for n in names if n.endswith(SHARD_SUFFIX)]
    for name in shard_names:
        path = shards / name
        size += path.stat().st_size
        try:
            _, locations = read_shard_header(path)
        except ShardError as exc:
            unreadable.append(str(exc))
            continue
        entries += len(locations)
        keys.update(loc.meta.get("key") for loc in locations.values())
    facts = {"folder": str(folder), "identity": identity.to_dict(), "digest": identity.digest, "keys": len(keys),
             "entries": entries, "shards": len(shard_names), "bytes": size,
             "temporary files": [n for n in names if n.endswith(TEMPORARY_SUFFIX)], "unreadable shards": unreadable}
    if verify:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = FeatureCache(folder.parent, identity, read_only=True)
            valid = sum(cache.contains(key) for key in cache.keys())
        facts["valid keys"] = valid
        facts["damaged"] = [str(w.message) for w in caught if "damaged" in str(w.message)]
    return facts


def render(facts: dict) -> str:
    identity = facts["identity"]
    lines = [f"{facts['folder']}  (identity {facts['digest']})"]
    for name, value in identity.items():
        lines.append(f"  {name}: {value}")
    lines.append(f"  keys: {facts['keys']}  entries: {facts['entries']}  shards: {facts['shards']}  "
                 f"size: {facts['bytes'] / 2**20:.1f} MiB")
    if "valid keys" in facts:
        lines.append(f"  verified: {facts['valid keys']} of {facts['keys']} keys have a valid entry")
        lines.extend(f"    {message}" for message in facts["damaged"])
    if facts["temporary files"]:
        lines.append(f"  temporary files left by stopped writers (safe to delete when no writer runs): "
                     f"{', '.join(facts['temporary files'])}")
    for problem in facts["unreadable shards"]:
        lines.append(f"  unreadable shard: {problem}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="a cache root or one identity's folder")
    parser.add_argument("--verify", action="store_true", help="read every entry and check its CRC-32")
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        all_facts = [describe(folder, verify=args.verify) for folder in identity_folders(args.directory)]
    except (FeatureCacheError, OSError, ValueError) as exc:
        print(f"repa-kernels cache: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(all_facts, indent=2) if args.json else "\n\n".join(map(render, all_facts)))
    return 0
