"""The teacher-feature cache on its own: identity, storage, damaged and concurrent writes, precompute, CLI.

- A stored entry reads back equal to the features rounded to the storage dtype, with its grid and frame
  indices, from the writer's buffer and from disk (memory-mapped) in a new process-like instance.
- A different identity (encoder weights, image size, token mode, storage dtype) is another folder: a miss.
- A hit whose grid disagrees with the call's is a miss with a warning.
- A flipped byte, a truncated shard, a garbage header: warnings and misses, never a crash or wrong
  features; a fresh entry written after that is served.
- A writer killed with SIGKILL at an arbitrary moment leaves a cache whose every entry is right.
- Two gloo ranks writing the same cache at once: every key readable and right on both ranks.
- Precompute resumes (a second run computes nothing and loads nothing); the image-folder helper puts
  its rule and the flip in the key; `repa-kernels cache` shows identity, entries and size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from repa_kernels import cli
from repa_kernels.regularizer.feature_cache import (CacheIdentity, FeatureCache, canonical_key,
                                                    weights_fingerprint)
from repa_kernels.regularizer.feature_precompute import (ComputedFeatures, image_folder_samples,
                                                         image_sample_key, precompute_features)
from workers import cache_writer_worker as worker

GRID = (worker.FRAMES, worker.ROWS, worker.COLUMNS)
IDENTITY = CacheIdentity(**worker.IDENTITY)


def put(cache, key, **overrides):
    arguments = dict(grid=GRID, frame_indices=[0, 4], source_frames=5) | overrides
    return cache.put(key, worker.features_for(key), **arguments)


def shard_files(cache):
    return sorted(cache.shards.glob("*.safetensors"))


def test_a_hit_equals_the_features_rounded_to_the_storage_dtype(tmp_path):
    for storage in ("bfloat16", "float16", "float32"):
        identity = dataclasses.replace(IDENTITY, storage_dtype=storage)
        cache = FeatureCache(tmp_path, identity)
        assert cache.get("a", GRID) is None and cache.misses == 1
        assert put(cache, "a")
        expected = worker.features_for("a").to(getattr(torch, storage))
        buffered = cache.get("a", GRID)
        assert torch.equal(buffered.features, expected)
        cache.close()
        reopened = FeatureCache(tmp_path, identity)
        entry = reopened.get("a", GRID)
        assert entry.features.dtype == getattr(torch, storage) and torch.equal(entry.features, expected)
        assert entry.grid == GRID and entry.frame_indices == (0, 4) and entry.source_frames == 5
        assert reopened.hits == 1 and reopened.misses == 0
    assert len(list(tmp_path.iterdir())) == 3   # one folder per identity


def test_each_identity_field_changes_the_folder_and_a_changed_one_misses(tmp_path):
    cache = FeatureCache(tmp_path, IDENTITY)
    put(cache, "a")
    cache.close()
    changes = dict(encoder="other", encoder_weights="1" * 64, encoder_dtype="bfloat16", image_size=64,
                   tokens="cls", patch_size=14, storage_dtype="float16", pixel_source="AutoencoderKLWan:abc",
                   resize="square", normalization="mean=[0.5, 0.5, 0.5] std=[0.5, 0.5, 0.5]",
                   preprocessing="other/2", frame_selection="other/2")
    digests = {IDENTITY.digest}
    for field, value in changes.items():
        other = dataclasses.replace(IDENTITY, **{field: value})
        digests.add(other.digest)
        assert FeatureCache(tmp_path, other).get("a") is None, field
    assert len(digests) == len(changes) + 1
    assert FeatureCache(tmp_path, IDENTITY).get("a", GRID) is not None


def test_weights_fingerprint_sees_one_changed_weight():
    model = torch.nn.Linear(4, 3)
    before = weights_fingerprint(model)
    assert weights_fingerprint(torch.nn.Linear(4, 3)) != before
    with torch.no_grad():
        model.weight[1, 2] += 1e-3
    assert weights_fingerprint(model) != before


@pytest.mark.parametrize("field, value, message", [
    ("storage_dtype", "int8", "storage_dtype must be one of bfloat16, float16, float32, got 'int8'"),
    ("image_size", 0, "image_size must be a positive integer, got 0"),
    ("tokens", "all", "tokens must be one of patch, cls, got 'all'"),
    ("resize", "crop", "resize must be one of area, square, naflex, got 'crop'"),
    ("encoder", "", "encoder must be a non-empty string"),
])
def test_a_bad_identity_names_the_field_and_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(IDENTITY, **{field: value})


def test_keys_are_canonical_and_bad_keys_are_refused(tmp_path):
    assert canonical_key({"id": 3, "flip": True}) == canonical_key({"flip": True, "id": 3})
    assert canonical_key(["clip", 3]) == '["clip",3]'
    with pytest.raises(TypeError, match="a cache key must be a string or JSON-serialisable"):
        canonical_key({"id": object()})
    with pytest.raises(TypeError, match="got NoneType"):
        canonical_key(None)
    with pytest.raises(ValueError, match="must not be empty"):
        canonical_key("")
    cache = FeatureCache(tmp_path, IDENTITY)
    cache.put({"id": 1, "flip": False}, worker.features_for("x"), grid=GRID, frame_indices=[0, 4], source_frames=5)
    assert cache.get({"flip": False, "id": 1}, GRID) is not None
    assert cache.get({"flip": True, "id": 1}, GRID) is None


def test_a_hit_whose_grid_disagrees_is_a_miss_with_a_warning(tmp_path):
    cache = FeatureCache(tmp_path, IDENTITY)
    put(cache, "a")
    with pytest.warns(RuntimeWarning, match=r"cached with the student token grid \(2, 4, 4\).*this call has \(2, 4, 6\)"):
        assert cache.get("a", (2, 4, 6)) is None
    # precomputed without a student grid: the teacher grid the call's aspect gives must match
    cache.put("b", torch.randn(2, 4, 4, 8), grid=None, frame_indices=[0, 4], source_frames=5)   # 32 px / patch 8
    assert cache.get("b", (2, 6, 6)) is not None
    with pytest.warns(RuntimeWarning, match=r"teacher grid \(2, 4, 4\).*this call has \(2, 3, 5\)"):
        assert cache.get("b", (2, 6, 10)) is None
    square = FeatureCache(tmp_path, dataclasses.replace(IDENTITY, resize="square"))   # S x S whatever the aspect
    square.put("b", torch.randn(2, 4, 4, 8), grid=None, frame_indices=[0, 4], source_frames=5)
    assert square.get("b", (2, 6, 10)) is not None


def test_float16_overflow_is_not_stored(tmp_path):
    cache = FeatureCache(tmp_path, dataclasses.replace(IDENTITY, storage_dtype="float16"))
    big = worker.features_for("a") * 1e6
    with pytest.warns(RuntimeWarning, match="overflow float16 and are not cached"):
        assert not cache.put("a", big, grid=GRID, frame_indices=[0, 4], source_frames=5)
    assert cache.get("a", GRID) is None


def damaged_cache(tmp_path, damage):
    cache = FeatureCache(tmp_path, IDENTITY)
    put(cache, "a")
    put(cache, "b")
    shard = cache.flush()
    damage(shard)
    return FeatureCache(tmp_path, IDENTITY)


def flip_last_byte(shard):
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40
    shard.write_bytes(bytes(data))


def truncate(shard):
    shard.write_bytes(shard.read_bytes()[:-100])


def garbage_header(shard):
    data = bytearray(shard.read_bytes())
    data[8:40] = b"x" * 32
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (flip_last_byte, "damaged \\(CRC-32 mismatch\\)"),
    (truncate, "damaged \\(truncated"),
    (garbage_header, "skipping an unreadable shard"),
])
def test_a_damaged_entry_is_a_miss_then_its_recomputed_entry_is_served(tmp_path, damage, message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = damaged_cache(tmp_path, damage)
        entries = {key: cache.get(key, GRID) for key in ("a", "b")}
    assert any(re.search(message, str(w.message)) for w in caught), [str(w.message) for w in caught]
    missed = [key for key, entry in entries.items() if entry is None]
    assert missed   # the damage sits in the last entry's bytes (or in the whole header)
    for key, entry in entries.items():   # an undamaged entry of the same shard is still right
        assert entry is None or torch.equal(entry.features, worker.features_for(key).bfloat16())
    for key in missed:
        put(cache, key)
    cache.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = FeatureCache(tmp_path, IDENTITY)
        for key in ("a", "b"):
            assert torch.equal(again.get(key, GRID).features, worker.features_for(key).bfloat16())


def test_a_killed_writer_leaves_a_working_cache(tmp_path):
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    child = subprocess.Popen([sys.executable, str(tests / "workers" / "cache_writer_worker.py"), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        flushed = [child.stdout.readline().strip() for _ in range(40)]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    (tmp_path / IDENTITY.digest / "shards" / ".a-killed-write.tmp").write_bytes(b"\x10\x00\x00")   # as left by a kill
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing the dead writer left may even warn
        cache = FeatureCache(tmp_path, IDENTITY)
        assert len(cache) >= 40
        for key in cache.keys():
            assert torch.equal(cache.get(key, GRID).features, worker.features_for(key).bfloat16()), key
    assert set(flushed) <= set(cache.keys())
    put(cache, "after")
    cache.flush()
    assert FeatureCache(tmp_path, IDENTITY).get("after", GRID) is not None


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_gloo_ranks_write_one_cache_at_once(tmp_path):
    mp.spawn(worker.gloo_writers, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), 24), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(results) == 12 + 2 * 12 and all(results.values()), results
    assert len(FeatureCache(tmp_path, IDENTITY, read_only=True)) == 36


def test_precompute_skips_cached_keys_and_does_not_load_them(tmp_path):
    calls, loads = [], []

    def compute(source, grid):
        calls.append(grid)
        return ComputedFeatures(source, grid, [0, 4], 5)

    def loader(key):
        def load():
            loads.append(key)
            return worker.features_for(key)
        return load

    samples = [(f"k{i}", loader(f"k{i}"), GRID) for i in range(5)]
    cache = FeatureCache(tmp_path, IDENTITY)
    report = precompute_features(samples[:3], cache, compute, progress=False)
    assert (report.computed, report.skipped) == (3, 0) and calls == [GRID] * 3
    resumed = FeatureCache(tmp_path, IDENTITY)
    loads.clear()
    report = precompute_features(samples, resumed, compute, progress=False)
    assert (report.computed, report.skipped) == (2, 3) and loads == ["k3", "k4"]
    for i in range(5):
        assert torch.equal(FeatureCache(tmp_path, IDENTITY).get(f"k{i}", GRID).features,
                           worker.features_for(f"k{i}").bfloat16())
    with pytest.raises(TypeError, match=r"sample 0 must be \(key, source\) or \(key, source, token_grid\)"):
        precompute_features(["k0"], resumed, compute, progress=False)


def test_image_folder_keys_hold_the_rule_and_the_flip(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    gradient = torch.arange(40 * 60 * 3, dtype=torch.uint8).reshape(40, 60, 3).numpy()
    Image.fromarray(gradient).save(folder / "a.png")
    Image.fromarray(gradient[:, :40]).save(folder / "sub" / "b.png")
    samples = image_folder_samples(folder, size=16, flips=(False, True))
    keys = [key for key, _ in samples]
    assert [k["image"] for k in keys] == ["a.png", "a.png", "sub/b.png", "sub/b.png"]
    assert [k["flip"] for k in keys] == [False, True, False, True]
    assert keys[0]["transform"] == "shorter-side-16-bicubic/center-crop-16x16/v1"
    plain, flipped = samples[0][1](), samples[1][1]()
    assert plain.shape == (3, 16, 16) and 0.0 <= float(plain.min()) and float(plain.max()) <= 1.0
    assert torch.equal(flipped, plain.flip(-1))
    other = image_folder_samples(folder, size=24, crop="resize")
    assert canonical_key(other[0][0]) != canonical_key(keys[0]) and other[0][1]().shape == (3, 24, 24)
    assert image_sample_key(folder, "a.png", size=16, crop="center", flip=True) == keys[1]
    with pytest.raises(ValueError, match="crop must be one of center, resize, none, got 'fit'"):
        image_folder_samples(folder, size=16, crop="fit")


def test_cache_subcommand_shows_identity_entries_and_size(tmp_path, capsys):
    cache = FeatureCache(tmp_path, IDENTITY)
    for key in ("a", "b", "c"):
        put(cache, key)
    flip_last_byte(cache.flush())
    assert cli.main(["cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"identity {IDENTITY.digest}" in out and "encoder: test-encoder" in out
    assert "keys: 3  entries: 3  shards: 1  size: " in out
    assert cli.main(["cache", str(tmp_path / IDENTITY.digest), "--verify", "--json"]) == 0
    (facts,) = json.loads(capsys.readouterr().out)
    assert facts["valid keys"] == 2 and len(facts["damaged"]) == 1 and facts["identity"]["image_size"] == 32
    assert cli.main(["cache", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
