"""Distributed training: 2-process gloo runs on CPU via torch.multiprocessing.

- DDP of a tiny Wan with CrepaRegularizer: every step's gradients equal those of a single-process run on
  the concatenated batch, and so do the final weights. The runs train with plain SGD, so the final
  weights differ by at most LR times the sum of the per-step gradient differences: the weight tolerance
  is derived from the gradient tolerance (Adam would amplify rounding into lr-sized steps).
- A negative control: the same comparisons fail on a result with one parameter's gradient perturbed by
  1e-3 (relative) at one step on one rank, so the tolerances are tight enough to see a real difference.
- The similarity-EMA cutoff fires on the same step on both ranks (the score is averaged across ranks
  before the EMA update), although each rank's own scores would have crossed the threshold on
  different steps; and on the same step as the single-process run.
- After the cutoff (weight 0, nothing computed) DDP, with find_unused_parameters=False, raises no
  unused-parameter error: the projector still gets a zero gradient.
- FSDP2 (`fully_shard`) on CPU / gloo: the same gradients as the single-process run.
- The projector is the regularizer's own parameters, not wrapped: it averages its gradients across ranks
  itself; with a bfloat16 model under FSDP2 (cast after the regularizer was built) it stays float32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers import ddp_worker

WORLD_SIZE = 2
THRESHOLD = 0.25   # single-process EMA: 0.18 after step 2, 0.32 after step 3 -> weight 0 from step 4 on
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


MODES = ("ddp", "fsdp", "fsdp_bf16")
FP32_MODES = ("ddp", "fsdp")
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ddp_worker.single_process_run(THRESHOLD)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """{mode: [rank 0 result, rank 1 result]}: one 2-process spawn trains DDP, then FSDP2."""
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(ddp_worker.run, args=(WORLD_SIZE, str(out / "rendezvous"), str(out), MODES, THRESHOLD),
             nprocs=WORLD_SIZE, join=True)
    return {mode: [torch.load(out / f"{mode}_rank{r}.pt") for r in range(WORLD_SIZE)] for mode in MODES}


def local_firing_step(scores, decay, threshold):
    ema = None
    for step, score in enumerate(scores):
        ema = score if ema is None else decay * ema + (1 - decay) * score
        if ema >= threshold:
            return step + 1   # the weight is 0 from the next call on
    return None


def grad_mismatches(got, want, what) -> list[str]:
    if got.keys() != want.keys():
        return [f"{what}: parameters with gradients differ: {set(got) ^ set(want)}"]
    return [f"{what}: {name} max |diff| {(got[name] - want[name]).abs().max().item():.3e}" for name in want
            if not torch.allclose(got[name], want[name], rtol=GRAD_RTOL, atol=GRAD_ATOL)]


def weight_mismatches(got_weights, truth) -> list[str]:
    """SGD: w_final = w_0 - LR * sum_s g_s, so if every step's gradient is within the gradient tolerance the
    final weights are within LR * sum_s (atol + rtol * |g_s|) of the truth, elementwise."""
    bad = []
    for name, want in truth["weights"].items():
        grads = [truth["records"][s]["grads"].get(name) for s in range(ddp_worker.STEPS)]
        bound = ddp_worker.LR * sum(GRAD_ATOL + GRAD_RTOL * g.abs() for g in grads if g is not None)
        excess = ((got_weights[name] - want).abs() - bound - 1e-7 * want.abs()).max().item()
        if excess > 0:   # 1e-7 * |w|: the float32 rounding of the update itself
            bad.append(f"weight {name} exceeds the derived bound by {excess:.3e}")
    return bad


def run_mismatches(rank_result, truth, what) -> list[str]:
    bad = []
    for s in range(ddp_worker.STEPS):
        bad += grad_mismatches(rank_result["records"][s]["grads"], truth["records"][s]["grads"], f"{what} step {s}")
    return bad + weight_mismatches(rank_result["weights"], truth)


@pytest.mark.slow
@needs_gloo
def test_ddp_matches_the_single_process_run_and_ranks_agree_on_the_cutoff(single_process, distributed_runs):
    ranks = distributed_runs["ddp"]
    steps = range(ddp_worker.STEPS)
    cutoff = {r: [ranks[r]["records"][s]["logs"]["crepa_cutoff"].item() for s in steps] for r in range(WORLD_SIZE)}
    truth_cutoff = [single_process["records"][s]["logs"]["crepa_cutoff"].item() for s in steps]
    assert truth_cutoff == [0, 0, 0, 0, 1, 1], f"premise: the cutoff should fire after step 3, got {truth_cutoff}"
    assert cutoff[0] == cutoff[1] == truth_cutoff

    # Premise of the agreement check: each rank alone would have decided on another step.
    decay = ddp_worker.CONFIG["crepa_similarity_ema_decay"]
    local = [local_firing_step([ranks[r]["records"][s]["logs"]["crepa_alignment_score"].item() for s in range(4)],
                               decay, THRESHOLD) for r in range(WORLD_SIZE)]
    assert local[0] != local[1], f"the ranks' own scores cross the threshold on the same step ({local}): no test"
    for s in range(4):
        emas = [ranks[r]["records"][s]["logs"]["crepa_alignment_score_ema"].item() for r in range(WORLD_SIZE)]
        truth = single_process["records"][s]["logs"]["crepa_alignment_score_ema"].item()
        assert emas[0] == emas[1] and math.isclose(emas[0], truth, rel_tol=1e-5, abs_tol=1e-6), (s, emas, truth)
    assert ranks[0]["schedule"] == ranks[1]["schedule"] and ranks[0]["schedule"]["permanent_cutoff_fired"]

    for r in range(WORLD_SIZE):
        assert not run_mismatches(ranks[r], single_process, f"rank {r}")
    for s in steps:
        projector = {n: g for n, g in ranks[0]["records"][s]["grads"].items() if n.startswith("projector.")}
        assert projector, f"step {s}: the projector got no gradient (DDP would see unused parameters)"
        if truth_cutoff[s]:
            assert all(torch.count_nonzero(g) == 0 for g in projector.values())


@pytest.mark.slow
@needs_gloo
def test_fsdp2_on_cpu_matches_the_single_process_run(single_process, distributed_runs):
    ranks = distributed_runs["fsdp"]
    assert [ranks[r]["records"][s]["logs"]["crepa_cutoff"].item() for r in range(WORLD_SIZE)
            for s in range(ddp_worker.STEPS)] == [0, 0, 0, 0, 1, 1] * WORLD_SIZE
    for r in range(WORLD_SIZE):
        assert not run_mismatches(ranks[r], single_process, f"rank {r}")


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("mode", FP32_MODES)
def test_the_comparison_sees_a_gradient_off_by_1e_3_on_one_rank(single_process, distributed_runs, mode):
    """Negative control: one parameter's gradient at one step, 1e-3 (relative) off on rank 1, and the weight
    that SGD would then have produced, must both be reported."""
    import copy
    truth = single_process
    step = 2
    grads = truth["records"][step]["grads"]
    name = max(grads, key=lambda n: grads[n].abs().max().item())     # where the relative error is visible
    bad = copy.deepcopy(distributed_runs[mode][1])
    delta = 1e-3 * bad["records"][step]["grads"][name]
    bad["records"][step]["grads"][name] += delta
    bad["weights"][name] -= ddp_worker.LR * delta
    found = run_mismatches(bad, truth, "perturbed rank 1")
    assert any(f"step {step}: {name}" in m for m in found), found
    assert any(f"weight {name}" in m for m in found), found


@pytest.fixture(scope="module")
def single_process_bf16():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ddp_worker.single_process_run(THRESHOLD, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@needs_gloo
def test_fsdp2_with_a_bf16_model_keeps_a_synchronised_fp32_projector(single_process_bf16, distributed_runs):
    ranks = distributed_runs["fsdp_bf16"]
    assert ranks[0]["projector_dtypes"] == ranks[1]["projector_dtypes"] == ["torch.float32"]
    names = [n for n in single_process_bf16["weights"] if n.startswith("projector.")]
    assert len(names) == 4
    for s in range(ddp_worker.STEPS):
        for name in names:
            got = [ranks[r]["records"][s]["grads"][name] for r in range(WORLD_SIZE)]
            want = single_process_bf16["records"][s]["grads"][name]
            assert got[0].dtype == torch.float32 and torch.equal(got[0], got[1]), (s, name)   # synchronised
            # the bf16 model's activations round differently for half and whole batches: bf16 tolerance
            assert torch.allclose(got[0], want, rtol=2e-2, atol=2e-3 * want.abs().max().item()), (
                s, name, (got[0] - want).abs().max().item())
    for name in names:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
