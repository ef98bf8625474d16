"""`repa-kernels demo` and its procedural data: a short real run writes its CSV / PNG / summary, learns
(held-out alignment up, flow-matching loss down), and bad options are refused with a clear message."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from repa_kernels import cli, demo
from repa_kernels.demo.data import moving_shapes, to_vae_input


# ------------------------------------------------------------------------------------------ data

def test_moving_shapes_layout_range_and_determinism():
    clips = moving_shapes(3, 5, 16, 20, seed=7)
    assert clips.shape == (3, 5, 3, 16, 20) and clips.dtype == torch.float32
    assert clips.min() >= 0.0 and clips.max() <= 1.0
    assert torch.equal(clips, moving_shapes(3, 5, 16, 20, seed=7))
    assert not torch.equal(clips, moving_shapes(3, 5, 16, 20, seed=8))


def test_moving_shapes_move_smoothly():
    clips = moving_shapes(4, 6, 32, 32, seed=1)
    steps = (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(2, 3, 4))     # (clips, F-1) change per frame
    assert (steps > 0).all(), "every clip must move between frames"
    far = (clips[:, 5] - clips[:, 0]).abs().mean(dim=(1, 2, 3))
    assert (far > steps.min(dim=1).values).all(), "frames further apart differ more than neighbours"


def test_to_vae_input_layout_and_errors():
    clips = moving_shapes(2, 3, 8, 8)
    x = to_vae_input(clips)
    assert x.shape == (2, 3, 3, 8, 8) and x.min() >= -1.0 and x.max() <= 1.0
    torch.testing.assert_close(x[:, :, 1], clips[:, 1] * 2 - 1)
    with pytest.raises(ValueError, match=r"\(N, F, 3, H, W\)"):
        to_vae_input(clips[:, 0])
    with pytest.raises(ValueError, match="num_clips must be an integer >= 1, got 0"):
        moving_shapes(0, 3, 8, 8)
    with pytest.raises(ValueError, match="at least 4 pixels"):
        moving_shapes(1, 3, 2, 8)


# ------------------------------------------------------------------------------------------ demo runs

def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_demo_runs_learns_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    code = demo.main(["--steps", "4", "--clips", "4", "--timing-repeats", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "RANDOM INIT" in printed and "step 4/4" in printed and "reference" in printed

    rows = _read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(4))
    for key in ("loss", "diffusion_loss", "crepa_loss", "crepa_alignment_score", "crepa_similarity_self",
                "crepa_similarity", "crepa_weight", "crepa_cutoff", "crepa_alignment_score_ema", "step_seconds"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert all(float(r["crepa_weight"]) == 0.5 for r in rows)
    assert all(float(r["crepa_similarity"]) == float(r["crepa_alignment_score"]) for r in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert after["alignment_score"] > before["alignment_score"] + 0.2, summary
    assert after["diffusion_loss"] < before["diffusion_loss"], summary
    assert summary["random_init"] == ["transformer", "vae", "encoder"]
    timing = summary["timing"]
    assert timing["step_ms_reference"] > 0 and timing["loss_ms_reference"] > 0
    assert f"step_ms_{timing['fused_backend']}" in timing


@pytest.mark.slow
def test_demo_ltx_backbone_mode_on_reference(tmp_path, capsys):
    out = tmp_path / "ltx"
    code = demo.main(["--model", "ltx", "--backbone", "--backend", "reference", "--steps", "2", "--clips", "2",
                      "--timing-repeats", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "LTXVideoTransformer3DModel" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "reference" and summary["timing"] is None
    assert summary["random_init"] == ["transformer", "vae"]
    assert len(_read_csv(out / "metrics.csv")) == 2


@pytest.mark.slow
def test_demo_loads_encoder_weights_from_a_local_directory(tmp_path, capsys):
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    weights = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=84,
                             patch_size=14)).save_pretrained(weights, safe_serialization=True)
    out = tmp_path / "out"
    code = demo.main(["--encoder", str(weights), "--steps", "2", "--clips", "2", "--timing-repeats", "0",
                      "--out", str(out), "--no-progress"])
    assert code == 0
    assert f"DINOv2 with the weights in {weights} (not random-init; 24 wide)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder"] == str(weights) and summary["random_init"] == ["transformer", "vae"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--encoder", "/no/such/dinov2"], "--encoder /no/such/dinov2: no such directory"),
    (["--backbone", "--encoder", "."], "--encoder and --backbone exclude each other"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--device", "nonsense"], "nonsense"),
])
def test_demo_refuses_bad_options(tmp_path, capsys, argv, message):
    assert demo.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_is_a_cli_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--steps", "--backend", "--model", "--backbone", "--encoder", "--out", "--seed"):
        assert option in text
