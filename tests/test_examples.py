"""The integration examples in python/ run 2 training steps each (tiny random models, CPU) and log the
docs/contract.md §6 metrics; the regularizer's projector is trained by the example's optimizer and saved with the
accelerate state."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "python"
CREPA_KEYS = ("crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_similarity", "crepa_weight",
              "crepa_cutoff", "crepa_alignment_score_ema")
UREPA_KEYS = ("urepa_loss", "urepa_alignment_loss", "urepa_manifold_loss", "urepa_similarity", "urepa_weight",
              "urepa_cutoff")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared CI machine extra threads stall."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step_logs(printed: str, steps: int) -> list[dict[str, float]]:
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i}/{steps}" for i in range(1, steps + 1)], printed
    logs = []
    for line in lines:
        values = {k: float(v) for k, v in re.findall(r"(\w+)=(\S+)", line)}
        assert all(math.isfinite(v) for v in values.values()), line
        logs.append(values)
    return logs


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["--model", "wan"],
    ["--model", "ltx", "--teacher-input", "pixels"],
    ["--model", "wan", "--crepa_use_backbone_features", "--crepa_teacher_block_index", "3"],
], ids=["wan-latents", "ltx-pixels", "wan-backbone"])
def test_train_wan_crepa(argv, capsys):
    assert _load("train_wan_crepa").main(argv + ["--steps", "2"]) == 0
    for logs in _step_logs(capsys.readouterr().out, 2):
        assert set(CREPA_KEYS) <= set(logs) and logs["crepa_weight"] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pixart", "sd3", "flux"])
def test_train_dit_repa(model, capsys):
    assert _load("train_dit_repa").main(["--model", model, "--steps", "2", "--batch-size", "2"]) == 0
    for logs in _step_logs(capsys.readouterr().out, 2):
        assert set(CREPA_KEYS) <= set(logs)
        # image REPA: one frame, so no neighbour terms: the score is the same-frame similarity
        assert logs["crepa_alignment_score"] == logs["crepa_similarity_self"]


@pytest.mark.slow
def test_train_unet_urepa_saves_projector_and_schedule(tmp_path, capsys):
    out = tmp_path / "state"
    assert _load("train_unet_urepa").main(["--steps", "2", "--batch-size", "2", "--output-dir", str(out)]) == 0
    for logs in _step_logs(capsys.readouterr().out, 2):
        assert set(UREPA_KEYS) <= set(logs) and logs["urepa_manifold_loss"] >= 0
    from safetensors.torch import load_file
    unet_weights = load_file(out / "model.safetensors")
    assert not any("projector" in key for key in unet_weights), sorted(unet_weights)[:5]
    reg_state = torch.load(out / "custom_checkpoint_0.pkl")       # the regularizer: projector and schedule
    assert {"projector.linear.weight", "_extra_state"} <= set(reg_state), sorted(reg_state)


def test_examples_document_real_models():
    for name, needles in {"train_wan_crepa": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Lightricks/LTX-Video"),
                          "train_dit_repa": ("PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
                                             "stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev"),
                          "train_unet_urepa": ("stabilityai/stable-diffusion-xl-base-1.0",)}.items():
        text = (EXAMPLES / f"{name}.py").read_text()
        for needle in needles + ("from_pretrained", "reg.parameters()", "register_for_checkpointing(reg)"):
            assert needle in text, (name, needle)


@pytest.mark.parametrize("name", ["train_wan_crepa", "train_dit_repa", "train_unet_urepa"])
def test_a_batch_larger_than_the_data_is_an_error_not_an_endless_loop(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit, match="--batch-size 64 is larger than the .* samples per process"):
        module.main(["--steps", "1", "--batch-size", "64"])
    with pytest.raises(SystemExit) as info:
        module.main(["--steps", "0"])
    assert info.value.code == 2 and "--steps: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_train_wan_crepa_context_parallel_runs_on_two_processes():
    """The context-parallel example as a user runs it (its own 2 gloo processes, diffusers Ulysses): the
    student is resampled onto the teacher grid across the shards, and rank 0 decodes a causal prefix."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_wan_crepa_context_parallel.py"), "--context", "2",
                           "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for logs in _step_logs(done.stdout, 2):
        assert set(CREPA_KEYS) <= set(logs) and logs["crepa_weight"] == 0.5
    # 2 steps x 2 clips: rank 0's window is latent frames 0-3 of 5 (7 of 9 pixel frames decoded, 4 encoded)
    assert "rank 0 decoded 28 and encoded 16 frames" in done.stdout, done.stdout
