"""CREPA on a data x context mesh with DDP and with FSDP2: 4 gloo ranks, 2 data-parallel groups x 2 context
ranks of diffusers' own context parallelism (Ulysses degree 2 on the tiny Wan, built on a custom DeviceMesh
("dp", "ring", "ulysses") of shape (2, 1, 2) given to `ContextParallelConfig(mesh=...)`), against a
single-process run without torch.distributed (tests/workers/context_mesh_worker.py).

Each data group trains on its own batch; the two context ranks of a group hold half of its 24 tokens each.
One spawn runs two phases in the same 4 processes, each on fresh models (tests/workers/context_mesh_worker.py
says why each is built as it is), and the test is parametrized over them so that a failure names its phase:
"ddp", the regularizer wrapped in DDP over the world (as `accelerator.prepare(reg)`) and so is the
transformer; "fsdp2", `fully_shard(reg)` over the world instead, and the transformer's blocks and root with
`fully_shard`. Both backpropagate a trainer's loss (diffusion loss on the gathered prediction + the
regularizer's); only the projector is stepped (plain SGD, 4 steps at steps 0..3), so the transformer stays
the truth's (the worker's docstring says why it is not stepped). A recoverable similarity cutoff
(`crepa_similarity_threshold`, `crepa_threshold_mode: recoverable`, `crepa_similarity_ema_decay` 0.5) is set
so that the EMA of the world-mean alignment score reaches the threshold after step 2: the weight is λ at
steps 0..2 and 0 at step 3.

What must hold, at every step and on all 4 ranks: the EMA, the weight and the cutoff log are the same on
every rank (bit for bit) and equal to the truth's (the EMA folds the mean of the two groups' unsharded scores);
each rank's loss, alignment score and self similarity are its data group's unsharded ones (the context
group's all_reduce makes the sharded score exact); the projector's weights after each update (under FSDP2
the `.full_tensor()` of its sharded DTensors) are equal on all ranks (bit for bit) and equal to the truth's
(SGD on the mean over the groups of each batch's unsharded gradient, times the weight: the projector
averages its gradient over the world and multiplies it by the context size, in the backward of an identity
its forward applies to the parameters it uses, and DDP's average or FSDP2's reduce-scatter mean of these
equal gradients leaves them so). Compared in float64 at float32 rounding.

Measured: the FSDP2 phase fails with the projector's averaging hooked on its parameters at construction
(FSDP2 replaces them, the hooks never fire, the gradient lacks the context-size factor): the weights differ
from the truth by up to 4e-2 after step 0, and the scores and EMA from step 1; the DDP phase passes there.
The FSDP2 phase takes 1.4 s on rank 0 (the DDP phase before it 13 s, most of it the first calls' warm-up),
in a 28 s spawn on the 2-core machine at load 8; the test took 29-36 s before it and 32-36 s with it.

The negative control: the two groups' own scores differ, and a rank-local EMA of them would cut off one
group at step 3 and not the other, so the agreement above is the world mean's work, not the batches'.
The threshold is placed between the two rank-local EMAs from a first single-process run without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers import context_mesh_worker as worker

RTOL, ATOL = 1e-5, 1e-7   # ATOL: the scores are cosines (|score| <= 1), and one of them can be near 0
WORLD_SIZE = worker.DATA_GROUPS * worker.CONTEXT_RANKS
FLIP = worker.STEPS - 1   # the step whose weight the threshold turns to 0
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=RTOL, atol=ATOL)


def close_weights(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Projector weights: an element near 0 carries the float32 rounding of the tensor's larger elements
    (measured: 6e-8 absolute on weights of order 0.3 after 4 steps at LR 5), so the absolute tolerance
    scales with the tensor."""
    return torch.allclose(got.double(), want.double(), rtol=RTOL, atol=RTOL * want.abs().max().item())


def local_emas(scores: list[float]) -> list[float]:
    """The EMA a rank would keep from its own data group's scores alone (no world mean)."""
    emas, ema = [], None
    for score in scores:
        ema = score if ema is None else worker.EMA_DECAY * ema + (1.0 - worker.EMA_DECAY) * score
        emas.append(ema)
    return emas


def group_scores(records: list[dict], group: int) -> list[float]:
    return [record["groups"][group]["crepa_alignment_score"].item() for record in records]


def choose_threshold(dry: list[dict]) -> float:
    """From the run without a threshold: a value the world EMA reaches after step FLIP - 1 (not before),
    lying between the two groups' rank-local EMAs there (the world EMA is their mean)."""
    world = [record["crepa_alignment_score_ema"].item() for record in dry]
    first, second = (local_emas(group_scores(dry, group))[FLIP - 1] for group in range(worker.DATA_GROUPS))
    margin = min(abs(first - second), world[FLIP - 1] - world[FLIP - 2]) / 4
    threshold = world[FLIP - 1] - margin
    assert margin > 0 and threshold > 0, f"the scores must rise and differ between the groups: EMA {world}"
    return threshold


def mismatches(ranks: list[dict], truth: list[dict]) -> list[str]:
    bad = []
    for rank, result in enumerate(ranks):
        group = result["group"]
        for step, (record, want) in enumerate(zip(result["records"], truth)):
            what = f"rank {rank} (data group {group}) step {step}"
            logs = record["logs"]
            missing = set(worker.LOG_KEYS) - set(logs)
            if missing:
                bad.append(f"{what}: logs lack {sorted(missing)}")
                continue
            for key, value in want["groups"][group].items():
                if not close(logs[key], value):
                    bad.append(f"{what}: {key} {logs[key].item()} != the group's unsharded {value.item()}")
            for key in ("crepa_alignment_score_ema", "crepa_weight", "crepa_cutoff"):
                if not close(logs[key], want[key]):
                    bad.append(f"{what}: {key} {logs[key].item()} != single-process {want[key].item()}")
            for name, weight in want["weights"].items():
                if not close_weights(record["weights"][name], weight):
                    bad.append(f"{what}: projector {name} max |diff| from single-process "
                               f"{(record['weights'][name].double() - weight.double()).abs().max().item():.3e}")
    # the ranks among themselves, bit for bit: every rank reads the same all_reduced values (DDP itself
    # relies on replicas staying identical)
    for step in range(worker.STEPS):
        first = ranks[0]["records"][step]
        for rank, result in enumerate(ranks[1:], start=1):
            record = result["records"][step]
            for key in ("crepa_alignment_score_ema", "crepa_weight", "crepa_cutoff"):
                if not torch.equal(record["logs"][key], first["logs"][key]):
                    bad.append(f"step {step}: rank {rank} {key} {record['logs'][key].item()} != rank 0's "
                               f"{first['logs'][key].item()}")
            bad += [f"step {step}: rank {rank}'s projector {name} differs from rank 0's"
                    for name, weight in first["weights"].items() if not torch.equal(record["weights"][name], weight)]
    return bad


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """(threshold, truth, per rank the worker's results): the truth and one spawn running both phases, once."""
    pytest.importorskip("diffusers").ContextParallelConfig   # noqa: B018
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threshold = choose_threshold(worker.single_process_run(None))
        truth = worker.single_process_run(threshold)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("mesh")
    mp.spawn(worker.run, args=(WORLD_SIZE, str(folder / "rendezvous"), str(folder), threshold),
             nprocs=WORLD_SIZE, join=True)
    return threshold, truth, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("phase", worker.PHASES)
def test_data_by_context_mesh_matches_the_single_process_run(spawned, phase):
    threshold, truth, results = spawned
    ranks = [{"group": result["group"], "records": result["phases"][phase]} for result in results]

    # premises: the mesh is 2 data groups of 2 context ranks, each capturing half of the 24 tokens, the
    # projector's parameters are FSDP2's sharded DTensors in that phase only, and the EMA's decision flips
    # during the run (weight λ, then 0)
    assert [r["group"] for r in ranks] == [0, 0, 1, 1]
    assert all(record["tokens"] == 12 for r in ranks for record in r["records"])
    assert all(record["sharded"] == (phase == "fsdp2") for r in ranks for record in r["records"])
    assert [record["crepa_cutoff"].item() for record in truth] == [0.0] * FLIP + [1.0]

    bad = mismatches(ranks, truth)
    assert not bad, f"{phase}:\n" + "\n".join(bad[:20])

    # negative control: on the ranks' own logs, each group's score differs from the other's, and a
    # rank-local EMA (no world mean) would decide differently in the two groups at the flip step
    scores = [[record["logs"]["crepa_alignment_score"].item() for record in ranks[rank]["records"]]
              for rank in (0, WORLD_SIZE - 1)]
    assert all(abs(a - b) > 1e-3 for a, b in zip(*scores))
    local_cutoffs = [local_emas(group)[FLIP - 1] >= threshold for group in scores]
    assert local_cutoffs[0] != local_cutoffs[1], (scores, threshold)
