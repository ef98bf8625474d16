"""Token grids, frame selection, encoder input sizes, 2-D resampling and pooling (docs/contract.md §3)."""

import math

import pytest
import torch

from repa_kernels.regularizer.grids import (TokenGrid, align_grids, encoder_input_size, image_grid_from_aspect,
                                            mean_pool, resample_grid, select_frames, tokens_to_grid,
                                            unpermute_local_blocks)


def test_tokens_to_grid_is_frame_major_then_row_major():
    grid = TokenGrid(2, 3, 4)
    tokens = torch.arange(grid.tokens, dtype=torch.float32).view(1, -1, 1)
    x = tokens_to_grid(tokens, grid)
    assert x.shape == (1, 2, 3, 4, 1)
    for f in range(2):
        for h in range(3):
            for w in range(4):
                assert x[0, f, h, w, 0] == f * 12 + h * 4 + w


def test_tokens_to_grid_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="holds 24"):
        tokens_to_grid(torch.zeros(1, 23, 2), TokenGrid(2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, S, C\)"):
        tokens_to_grid(torch.zeros(23, 2), TokenGrid(2, 3, 4))


def test_select_frames_causal_vae_maps_latent_k_to_pixel_rk():
    for ratio, latent_frames in ((4, 5), (8, 3), (2, 7)):
        pixels = ratio * (latent_frames - 1) + 1
        assert select_frames(pixels, latent_frames) == [ratio * k for k in range(latent_frames)]


def test_select_frames_even_spacing_and_edges():
    assert select_frames(1, 1) == [0]
    assert select_frames(10, 1) == [0]
    assert select_frames(5, 5) == [0, 1, 2, 3, 4]
    assert select_frames(10, 4) == [0, 3, 6, 9]
    picked = select_frames(100, 7)
    assert picked[0] == 0 and picked[-1] == 99 and len(set(picked)) == 7
    with pytest.raises(ValueError, match="cannot pick 3 frames out of 2"):
        select_frames(2, 3)
    with pytest.raises(ValueError, match="num_target"):
        select_frames(2, 0)


def test_encoder_input_size_keeps_area_and_aspect_with_patch_multiples():
    assert encoder_input_size(512, 512, 518, 14) == (518, 518)
    h, w = encoder_input_size(480, 832, 518, 14)
    assert h % 14 == 0 and w % 14 == 0
    assert abs(h * w - 518 ** 2) / 518 ** 2 < 0.06
    assert abs(w / h - 832 / 480) < 0.05
    assert encoder_input_size(1, 1000, 28, 14) == (14, 882)    # never below one patch
    assert encoder_input_size(720, 1280, 224, 14) == (168, 294)


def test_resample_grid_never_mixes_rows():
    # Halving only the width must keep every row's values within that row (a 1-D resample of the
    # flattened sequence would blend the end of one row with the start of the next).
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 4, 1, 1).expand(1, 1, 4, 8, 1).contiguous()
    out = resample_grid(x, (4, 4))
    assert out.shape == (1, 1, 4, 4, 1)
    assert torch.allclose(out[0, 0, :, :, 0], torch.arange(4.0).view(4, 1).expand(4, 4))


def test_resample_grid_downsampling_is_area_weighted_and_differentiable():
    x = torch.randn(2, 3, 8, 8, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = resample_grid(x, (4, 4))
    # antialiased: the mean is kept (to 0.047 for this seed, the most over 20 seeds) and a constant stays
    assert torch.allclose(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.06)
    const = resample_grid(torch.full((1, 1, 9, 6, 2), 3.0), (3, 2))
    assert torch.allclose(const, torch.full_like(const, 3.0))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # each output sees several inputs (antialias), not one sampled point
    assert (x.grad[0, 0, :, :, 0] > 0).sum() == 64


def test_align_grids_resamples_the_larger_grid_onto_the_other():
    student = torch.randn(1, 2, 8, 6, 4)
    teacher = torch.randn(1, 2, 4, 3, 4)
    z, y = align_grids(student, teacher)
    assert z.shape == y.shape == (1, 2, 12, 4)
    assert torch.equal(y, teacher.flatten(2, 3))
    z, y = align_grids(teacher, student)
    assert z.shape == y.shape == (1, 2, 12, 4)
    assert torch.equal(z, teacher.flatten(2, 3))
    same = torch.randn(1, 1, 2, 2, 3)
    z, y = align_grids(same, same)
    assert torch.equal(z, same.flatten(2, 3))


def test_mean_pool():
    x = torch.randn(2, 3, 4, 5, 6)
    assert torch.allclose(mean_pool(x), x.mean(dim=(2, 3)).unsqueeze(2))
    assert torch.allclose(mean_pool(x.flatten(2, 3)), x.mean(dim=(2, 3)).unsqueeze(2))


def test_image_grid_from_aspect():
    assert image_grid_from_aspect(6 * 8, 48, 64, "t") == TokenGrid(1, 6, 8)
    assert image_grid_from_aspect(16, 512, 512, "t") == TokenGrid(1, 4, 4)
    with pytest.raises(ValueError, match="cannot lay 7 t tokens"):
        image_grid_from_aspect(7, 10, 20, "t")


def test_unpermute_local_blocks_inverts_kandinsky5_fractal_order():
    from diffusers.models.transformers.transformer_kandinsky import fractal_flatten

    grid = TokenGrid(2, 16, 16)
    x = torch.randn(1, grid.frames, grid.height, grid.width, 3)
    rope = torch.zeros(1, grid.frames, grid.height, grid.width, 1)
    permuted, _ = fractal_flatten(x, rope, (1, grid.frames, grid.height, grid.width), block_mask=True)
    assert not torch.equal(permuted, x.flatten(1, 3))
    assert torch.equal(unpermute_local_blocks(permuted, grid, 8), x.flatten(1, 3))
    with pytest.raises(ValueError, match="multiples of 8"):
        unpermute_local_blocks(torch.zeros(1, 2 * 6 * 8, 3), TokenGrid(2, 6, 8), 8)


def test_token_grid_counts():
    grid = TokenGrid(3, 4, 5)
    assert grid.tokens == 60
    assert math.prod(grid) == 60
