"""benchmarks/context_parallel_teacher.py on a toy shape: every rank's window tokens equal the whole clip's
frames, the first rank of two decodes a shorter causal prefix than one rank, and the communication volume
of a layout small enough to count by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from repa_kernels.options import CrepaOptions
from repa_kernels.regularizer import CrepaRegularizer

pytest.importorskip("diffusers")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "context_parallel_teacher.py"
spec = importlib.util.spec_from_file_location("context_parallel_teacher", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench          # dataclasses look their module up there
spec.loader.exec_module(bench)


def toy_rows(config: dict):
    model = tm.tiny_wan()
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16,
                                        **config}, transformer=model, vae=tm.tiny_wan_vae(),
                                       encoder=tm.tiny_dinov2(patch_size=8))
    latents = torch.randn(1, tm.LATENT_CHANNELS, 6, 4, 6, generator=torch.Generator().manual_seed(3))
    grid = bench.wan_token_grid(latents, model)
    return grid, bench.rank_costs(reg, latents, grid, ranks=(1, 2, 4), repeats=1)


@pytest.mark.parametrize("config", [{}, {"crepa_adjacent_distance": 2, "crepa_cumulative_neighbors": True}])
def test_every_rank_decodes_its_causal_prefix_and_encodes_its_window(config):
    grid, rows = toy_rows(config)     # rank_costs raises if a rank's tokens differ from the whole clip's
    assert grid == (6, 2, 3)
    whole = 2 * (grid.frames - 1) + 1                 # the tiny Wan VAE's temporal ratio is 2
    by_size = {p: [r for r in rows if r.ranks == p] for p in (1, 2, 4)}
    assert [len(group) for group in by_size.values()] == [1, 2, 4]
    assert by_size[1][0].pixel_frames_decoded == whole and by_size[1][0].frames_encoded == grid.frames
    assert by_size[2][0].pixel_frames_decoded < whole      # rank 0 of two: a shorter causal prefix
    for row in rows:
        low, high = row.window
        assert row.frames_encoded == high - low
        assert row.latent_frames_decoded == high and row.pixel_frames_decoded == 2 * (high - 1) + 1
        assert row.decode_s > 0 and row.encode_s > 0
    assert by_size[4][-1].pixel_frames_decoded == whole    # the last rank decodes the whole clip
    table = bench.format_table(rows)
    assert "| 2 | 0 | [0, 18) |" in table and "max decode + encode" in table


def test_a_rank_whose_tokens_differ_is_named():
    model = tm.tiny_wan()
    reg = CrepaRegularizer.from_config({"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 16},
                                       transformer=model, vae=tm.tiny_wan_vae(), encoder=tm.tiny_dinov2(patch_size=8))
    latents = torch.randn(1, tm.LATENT_CHANNELS, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    teacher, calls = reg._teacher, []
    tokens = teacher.tokens

    def perturbed(inputs, captured, grid, device, frames=None):   # windows come back altered
        calls.append(frames)
        out = tokens(inputs, captured, grid, device, frames=frames)
        return out if frames is None else out + 1e-3
    teacher.tokens = perturbed
    with pytest.raises(RuntimeError, match=r"P=1 rank tokens \(0, 24\), window \(0, 4\)"):
        bench.rank_costs(reg, latents, bench.wan_token_grid(latents, model), ranks=(1,), repeats=1)
    assert calls == [None, (0, 4)]


def test_communication_volume_of_a_toy_layout():
    """4 frames of 2 x 3 tokens (24), 3 ranks: shards [0, 8), [8, 16), [16, 24). Resampled student (1 x 2
    teacher tokens): rank 0 owns frames 0-1 and receives tokens [8, 12), rank 1 owns frame 2 and receives
    [16, 18), rank 2 owns frame 3 (all its own): 6 tokens. Backbone halo d = 1: windows [0, 3), [0, 4),
    [1, 4) of frames = tokens [0, 18), [0, 24), [6, 24): 10 + 16 + 10 = 36 tokens from other ranks."""
    volume = bench.communication_volume(frames=4, student_grid=(2, 3), teacher_grid=(1, 2), ranks=3, batch=2,
                                        teacher_width=16, hidden=32, options=CrepaOptions(distance=1))
    assert volume.loss_all_reduce == 16
    assert volume.student_exchange == 6 * 2 * 16 * 4 and volume.student_exchange_max_rank == 4 * 2 * 16 * 4
    assert volume.backbone_halo == 36 * 2 * 32 * 2 and volume.backbone_halo_max_rank == 16 * 2 * 32 * 2
    assert volume.projector_all_reduce == 4 * (2 * 32 + 32 * 16 + 16)
    assert volume.backbone_projector_all_reduce == 4 * (2 * 32 + 32 * 32 + 32)
    # a teacher grid as fine as the student's: nothing to resample, nothing moves
    equal = bench.communication_volume(frames=4, student_grid=(2, 3), teacher_grid=(2, 3), ranks=3, batch=2,
                                       teacher_width=16, hidden=32, options=CrepaOptions(distance=1))
    assert equal.student_exchange == 0 and equal.backbone_halo == volume.backbone_halo
    assert "| d = 1 | d = 2 cumulative |" in bench.format_volumes()


def test_frames_per_rank_at_the_wan_14b_workload():
    """Rank 0 of 8 holds tokens [0, 4095) of 21 x 1560: frames 0-2, window [0, 4) at d = 1, whose last
    frame is pixel frame 12, made by latent frames 0-3 (13 pixel frames); the last rank decodes all 81."""
    table = bench.wan14b_frames_per_rank(CrepaOptions(distance=1)).splitlines()
    assert table[2] == "| 0 | [0, 4095) | [0, 4) | 4 | 13 | 4 |"
    assert table[-2] == "| 7 | [28665, 32760) | [17, 21) | 21 | 81 | 4 |"
    assert table[-1] == "| all | | | | 396 (4.9 whole decodes) | 42 (2.0 clips) |"
