"""Row widths of every teacher, 32 to 5120 channels, on every backend at small N*T.

Teachers now reach 3584 (Qwen2.5-VL-7B's merged tokens) and 5120 (a Wan-14B self-teacher), wider than
any DINOv2. The kernels walk channels in chunks (BLOCK_D) and the C++ rows in vector steps, so widths that
are not a multiple of either (33, 3584 = 7 * 512, 5120 = 5 * 1024, 5119) check the last partial chunk.
Each backend is held to the float64 truth by the rule of tests/tolerance.py, forward and both gradients,
for the CREPA cosine (neighbour terms on) and the U-REPA objective (cosine plus the Gram manifold term).

Under Triton's interpreter the manifold backward runs with 1024-channel chunks instead of 32: its cost
grows with (D / chunk)^2 (each output-channel chunk re-forms the Gram tiles over all D), 69 s at D=1024
with 32-channel chunks on this machine, so D=5120 would take half an hour. 1024 still leaves a partial last
chunk at D=5119 and several chunks at 3584 and 5120; the GPU compiles its own block sizes anyway.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import repa_kernels as rk
from repa_kernels.ops import utils as triton_utils
from backend_params import impl_param
from tolerance import assert_within_reference_error

WIDTHS = [32, 33, 3584, 5119, 5120]
SHAPE = (1, 3, 5)                          # (B, T, N): a few tokens per frame, neighbours on both sides
IMPLS = [impl_param("cpp"), impl_param("triton")]


INTERPRETER_MANIFOLD_CHUNK = 1024


@pytest.fixture
def wide_interpreter_chunks(monkeypatch):
    """Manifold blocks with 1024-channel chunks when the Triton interpreter runs (see the module docstring)."""
    if not triton_utils.is_interpreter():
        return
    original = triton_utils.manifold_blocks

    def wide(num_tokens, dim_z, dim_y, dtype, backward):
        blocks = original(num_tokens, dim_z, dim_y, dtype, backward)
        depth = min(INTERPRETER_MANIFOLD_CHUNK, max(blocks.block_k, 1 << (max(dim_z, dim_y) - 1).bit_length()))
        return dataclasses.replace(blocks, block_k=depth, block_out=depth)

    monkeypatch.setattr(triton_utils, "manifold_blocks", wide)


def _pair(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(*SHAPE, width, generator=generator, dtype=torch.float64)
    y = torch.randn(*SHAPE, width, generator=generator, dtype=torch.float64) + 0.5 * z
    return z, y


def _run(loss_fn, z, y, dtype, impl):
    z = z.to(dtype).detach().requires_grad_(True)
    y = y.to(dtype).detach().requires_grad_(True)
    loss = loss_fn(z, y, impl)
    loss.backward()
    return loss.detach(), z.grad, y.grad


def _crepa(z, y, impl):
    return rk.crepa_loss(z, y, distance=1, tau=0.5, impl=impl).loss


def _urepa(z, y, impl):
    return rk.urepa_loss(z, y, manifold_weight=3.0, impl=impl).loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("loss_fn", [_crepa, _urepa], ids=["crepa", "urepa"])
def test_every_backend_is_right_at_teacher_widths(loss_fn, width, impl, wide_interpreter_chunks):
    z, y = _pair(width, seed=width)
    truth = _run(loss_fn, z, y, torch.float64, "reference")
    reference = _run(loss_fn, z, y, torch.float32, "reference")
    kernel = _run(loss_fn, z, y, torch.float32, impl)
    for name, got, ref, true in zip(("loss", "dz", "dy"), kernel, reference, truth):
        assert_within_reference_error(got, ref, true, torch.float32, f"{impl} {name} at D={width}",
                                      relative=name != "loss")
