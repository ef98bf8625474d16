"""The C++ kernels' cache of freed large buffers (csrc/buffer_cache.h): a recycled buffer gives the same
bits as a fresh one, a live gradient is never reused, stale sizes are freed, the limit holds, and a bad
REPA_KERNELS_CPU_CACHE_MB is refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import repa_kernels as rk
from repa_kernels.ops import cpp

AVAILABLE, REASON = cpp.status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"C++ extension unavailable: {REASON}")

MIB = 1 << 20
# Odd shapes whose gradients pass the cache's 2 MiB threshold (cached in 4 MiB blocks).
CREPA_SHAPES = {torch.float32: (1, 3, 701, 257), torch.float16: (1, 3, 1403, 257)}
MANIFOLD_SHAPE = (1, 1, 2051, 257)


@pytest.fixture(autouse=True)
def empty_cache():
    cpp.release_cached_buffers()
    yield
    cpp.release_cached_buffers()


def make_pair(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator)
    y = torch.randn(shape, generator=generator) + 0.5 * z
    return z.to(dtype), y.to(dtype)


def loss_of(op, z, y):
    if op == "crepa":
        return rk.crepa_loss(z, y, impl="cpp").loss
    return rk.manifold_loss(z, y, impl="cpp")


def gradients(op, z, y):
    """(dz, dy) of one backward, as autograd hands them out (not copies)."""
    z = z.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    loss_of(op, z, y).backward()
    return z.grad, y.grad


CASES = [("crepa", CREPA_SHAPES[torch.float32], torch.float32),
         ("crepa", CREPA_SHAPES[torch.float16], torch.float16),
         ("manifold", MANIFOLD_SHAPE, torch.float32)]


@pytest.mark.parametrize("op,shape,dtype", CASES, ids=[f"{c[0]}-{str(c[2])[6:]}" for c in CASES])
def test_a_recycled_buffer_filled_with_nan_gives_the_same_bits_as_a_fresh_one(op, shape, dtype):
    z, y = make_pair(shape, dtype, seed=0)
    fresh_dz, fresh_dy = gradients(op, z, y)
    expected = fresh_dz.clone(), fresh_dy.clone()
    pointers = {fresh_dz.data_ptr(), fresh_dy.data_ptr()}
    fresh_dz.fill_(float("nan"))  # whatever a recycled block holds must be overwritten in full
    fresh_dy.fill_(float("nan"))
    del fresh_dz, fresh_dy
    before = cpp.buffer_cache_stats()
    assert before["cached_blocks"] >= 2

    dz, dy = gradients(op, z, y)
    after = cpp.buffer_cache_stats()
    assert {dz.data_ptr(), dy.data_ptr()} <= pointers  # the gradients were served from the cache
    assert after["hits"] - before["hits"] >= 2
    assert after["misses"] == before["misses"]
    assert torch.equal(dz, expected[0]) and torch.equal(dy, expected[1])


def test_a_gradient_still_alive_is_never_handed_out_again():
    z, y = make_pair(CREPA_SHAPES[torch.float32], torch.float32, seed=0)
    kept_dz, _ = gradients("crepa", z, y)
    kept_copy = kept_dz.clone()
    other_z, other_y = make_pair(CREPA_SHAPES[torch.float32], torch.float32, seed=1)
    for _ in range(3):
        dz, _ = gradients("crepa", other_z, other_y)
        assert dz.data_ptr() != kept_dz.data_ptr()
        del dz
    assert torch.equal(kept_dz, kept_copy)


def test_new_shapes_free_the_stale_blocks_and_release_returns_everything():
    small = make_pair((1, 2, 1100, 300), torch.float32, seed=0)  # 2.5 MiB: 4 MiB blocks
    large = make_pair((1, 2, 2300, 300), torch.float32, seed=0)  # 5.3 MiB: 6 MiB blocks
    gradients("crepa", *small)
    assert cpp.buffer_cache_stats()["cached_bytes"] == 2 * 4 * MIB
    gradients("crepa", *large)  # a miss: the small blocks go
    assert cpp.buffer_cache_stats()["cached_bytes"] == 2 * 6 * MIB
    assert cpp.release_cached_buffers() == 2 * 6 * MIB
    stats = cpp.buffer_cache_stats()
    assert stats["cached_bytes"] == 0 and stats["cached_blocks"] == 0


def test_small_gradients_bypass_the_cache():
    z, y = make_pair((1, 3, 37, 67), torch.float32, seed=0)
    before = cpp.buffer_cache_stats()
    gradients("crepa", z, y)
    after = cpp.buffer_cache_stats()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (before["hits"], before["misses"], 0)


def run_with_cache_setting(value: str, body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        import torch
        import repa_kernels as rk
        from repa_kernels.ops import cpp
        z = torch.randn(1, 3, 701, 257, requires_grad=True)
        y = torch.randn(1, 3, 701, 257)
    """) + textwrap.dedent(body)
    env = dict(os.environ, REPA_KERNELS_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("value", ["0", "3"])
def test_the_limit_holds_and_zero_turns_the_cache_off(value):
    completed = run_with_cache_setting(value, """
        for _ in range(3):
            rk.crepa_loss(z, y, impl="cpp").loss.backward()
            z.grad = None
        stats = cpp.buffer_cache_stats()
        assert stats["limit_bytes"] == int({value}) << 20, stats
        assert stats["cached_bytes"] == 0 and stats["hits"] == 0 and stats["misses"] == 3, stats
        print("ok")
    """.replace("{value}", value))
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-2000:]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999999999999"])
def test_a_bad_cache_setting_is_refused_by_name(value):
    completed = run_with_cache_setting(value, """
        try:
            rk.crepa_loss(z, y, impl="cpp").loss.backward()
        except RuntimeError as exc:
            print(str(exc).splitlines()[0])
    """)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == (
        "REPA_KERNELS_CPU_CACHE_MB must be a whole number of megabytes from 0 to 1073741824 (0 turns the CPU "
        f"buffer cache off), got '{value}'")


def test_threads_sharing_the_cache_get_their_own_buffers_and_correct_gradients():
    """Autograd and user threads may free and take blocks at once: each call still gets a block nobody
    else holds, and the gradients match a serial run bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = [make_pair(CREPA_SHAPES[torch.float32], torch.float32, seed=seed) for seed in range(4)]
    expected = [gradients("crepa", z, y)[0].clone() for z, y in pairs]

    def work(index):
        z, y = pairs[index % len(pairs)]
        dz, _ = gradients("crepa", z, y)
        return index % len(pairs), dz.clone()

    with ThreadPoolExecutor(max_workers=4) as pool:
        for index, dz in pool.map(work, range(24)):
            assert torch.equal(dz, expected[index])
