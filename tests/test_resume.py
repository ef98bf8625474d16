"""Resume: save at step k, restore in a fresh process, continue exactly.

A tiny Wan with CrepaRegularizer (cosine schedule with warmup, decay until max_train_steps, a permanent
similarity cutoff with EMA decay 0.5) trains with AdamW in one process for N steps, saving the model, the
optimizer and the regularizer `state_dict` (the projector and the schedule) before step k. A second,
fresh process builds everything again, loads that checkpoint and runs steps k..N-1. Losses, logs, the
schedule state and every weight must be bitwise equal to the uninterrupted run.

The threshold is placed so that the similarity cutoff fires inside the resumed window (EMA 0.41 at step
3, 0.58 at step 4, threshold 0.5: weight 0 from step 5). A resumed run that lost the EMA would take
step 3's score (0.62) as its first value and cut off one step early, so the test sees the schedule state.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "resume_worker.py")
STEPS, SAVE_AT, THRESHOLD = 6, 3, 0.5


def run_worker(*args):
    result = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(WORKER)), env=dict(os.environ))
    assert result.returncode == 0, f"worker {args[0]} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.slow
def test_resume_in_a_fresh_process_continues_bitwise(tmp_path):
    checkpoint, full_out, resumed_out = tmp_path / "step3.pt", tmp_path / "full.pt", tmp_path / "resumed.pt"
    run_worker("full", "--steps", STEPS, "--save-at", SAVE_AT, "--checkpoint", checkpoint, "--out", full_out,
               "--threshold", THRESHOLD)
    saved = torch.load(checkpoint)
    assert "projector.linear.weight" in saved["regularizer"], "the projector is not saved with the regularizer"
    assert not any("projector" in k for k in saved["model"]), "the model's state dict must stay the model's own"
    run_worker("resume", "--steps", STEPS, "--checkpoint", checkpoint, "--out", resumed_out, "--threshold", THRESHOLD)
    full, resumed = torch.load(full_out), torch.load(resumed_out)

    # The premise: the cutoff fires inside the resumed window of the uninterrupted run.
    cutoffs = [full["records"][s]["crepa_cutoff"].item() for s in range(STEPS)]
    assert cutoffs == [0, 0, 0, 0, 0, 1], f"the similarity cutoff should fire after step 4, got {cutoffs}; " \
        "if the training changed, move THRESHOLD between the EMA after step 3 and after step 4"

    assert sorted(resumed["records"]) == list(range(SAVE_AT, STEPS))
    for step in range(SAVE_AT, STEPS):
        ours, theirs = resumed["records"][step], full["records"][step]
        assert ours.keys() == theirs.keys(), step
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"step {step} {key}: {ours[key]} != {theirs[key]}"
    assert resumed["schedule"] == full["schedule"]
    assert resumed["model"].keys() == full["model"].keys()
    for name, value in full["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for name, value in full["regularizer"].items():
        assert torch.equal(resumed["regularizer"][name], value), name
