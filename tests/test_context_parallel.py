"""CREPA / REPA under context (sequence) parallelism through the explicit layout API
(`CrepaRegularizer.set_context_parallel(group, shard=(start, stop))`), against the single-process run.

One spawn per world size (2 and 3 gloo processes) runs all its cases (tests/workers/context_parallel_worker.py;
the 2-process spawn also runs diffusers' own Ulysses context parallelism on a tiny Wan and a tiny Flux):
whole-frame shards, frames split between ranks, shards smaller than a frame, uneven shards, with a halo
of one and of two neighbour frames, and every teacher input: teacher_features on the student grid,
coarser (the student resampled: a split frame is gathered by its first rank, with gradient) and finer
(the teacher resampled), latents through a tiny Wan VAE, pixels, a feature cache, a backbone block
sharded like the student, and the pooled and CLS modes (one vector per frame). On every rank the loss
value and the logs (alignment score, self similarity, EMA) equal the single-process ones, the gradients
of the ranks' shards of the captured hidden states put together equal the single-process gradient of
the whole sequence, and the projector's gradient (summed over the context group by the projector's own
gradient averaging) equals the single-process one. Compared in float64 at float32 rounding tolerance
(the loss itself computes in float32, the projector's dtype).

The refusals run in one process (a group of one rank is a valid context group).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models as tm
from repa_kernels.regularizer import CrepaRegularizer
from workers import context_parallel_worker as worker

RTOL, ATOL = 1e-5, 1e-8
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=RTOL, atol=ATOL * max(1.0, want.abs().max().item()))


def mismatches(ranks: list[list[dict]], truth: list[dict], world_size: int, cases=None) -> list[str]:
    bad = []
    for case, ((config, teacher, shards), want) in enumerate(zip(cases or worker.CASES[world_size], truth)):
        what = f"{config} {teacher} {shards}"
        for rank, results in enumerate(ranks):
            got = results[case]
            if not close(got["loss"], want["loss"]):
                bad.append(f"{what} rank {rank}: loss {got['loss'].item()} != {want['loss'].item()}")
            for logs in ("logs", "next_logs"):
                if got[logs].keys() != want[logs].keys():
                    bad.append(f"{what} rank {rank}: {logs} keys {sorted(got[logs])} != {sorted(want[logs])}")
                bad += [f"{what} rank {rank}: {logs} {key} {got[logs][key].item()} != {value.item()}"
                        for key, value in want[logs].items() if key in got[logs] and not close(got[logs][key], value)]
            for name, grad in want["projector_grads"].items():
                if not close(got["projector_grads"][name], grad):
                    bad.append(f"{what} rank {rank}: projector gradient {name} max |diff| "
                               f"{(got['projector_grads'][name] - grad).abs().max().item():.3e}")
        gathered = torch.cat([results[case]["captured_grad"] for results in ranks], dim=1)
        if gathered.shape != want["captured_grad"].shape or not close(gathered, want["captured_grad"]):
            bad.append(f"{what}: gathered hidden-state gradient differs from the single-process one")
    return bad


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """spawned(world_size) -> per rank the worker's results: one spawn per world size, run once."""
    done = {}

    def results(world_size: int) -> list[dict]:
        if world_size not in done:
            folder = tmp_path_factory.mktemp(f"context{world_size}")
            mp.spawn(worker.run, args=(world_size, str(folder / "rendezvous"), str(folder)), nprocs=world_size,
                     join=True)
            done[world_size] = [torch.load(folder / f"rank{r}.pt") for r in range(world_size)]
        return done[world_size]
    return results


def single_process(cases) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [worker.run_case(config, None, teacher=teacher) for config, teacher, *_ in cases]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sequence_matches_the_single_process_run(world_size, spawned):
    truth = single_process(worker.CASES[world_size])
    ranks = [r["explicit"] for r in spawned(world_size)]
    assert not mismatches(ranks, truth, world_size)
    assert all("crepa_alignment_score_ema" in r["next_logs"] for r in truth)   # premise: the EMA is compared
    # premise: every rank's own share of the hidden-state gradient is non-zero (each shard takes part)
    for results in ranks:
        assert all(r["captured_grad"].abs().sum() > 0 for r in results)
    assert not window_overruns(ranks, truth, world_size)
    for case, (_, teacher, _) in enumerate(worker.CASES[world_size]):
        for results in ranks:
            if teacher == "cached pixels":   # every window served from the cache, nothing encoded
                assert results[case]["cache"]["hits"] > 0 and results[case]["cache"]["misses"] == 0
                assert results[case]["frames_encoded"] == 0 and not results[case]["warnings"]
            if teacher == "uncached pixels":   # computed live, not stored, and said so
                assert results[case]["cache"]["entries"] == 0 and results[case]["cache"]["misses"] > 0
                assert any("not stored" in message for message in results[case]["warnings"])


def window_overruns(ranks: list[list[dict]], truth: list[dict], world_size: int) -> list[str]:
    """In the first call of a case each rank encodes only its window (its frames and d neighbours each side),
    and a causal Wan VAE decodes only the latent prefix of the window: the first rank fewer frames than the
    whole clip."""
    bad = []
    per_frame = worker.ROWS * worker.COLUMNS
    for case, (config, teacher, shards) in enumerate(worker.CASES[world_size]):
        if teacher == "cls pixels":   # one CLS token per frame: each frame encoded once, by its first token's rank
            owned = [-(-stop // per_frame) - -(-start // per_frame) for start, stop in shards]
            got = [r[case]["frames_encoded"] for r in ranks]
            if got != [worker.BATCH * n for n in owned]:
                bad.append(f"{config} cls pixels: ranks encoded {got} frames, their frames hold "
                           f"{[worker.BATCH * n for n in owned]}")
        if teacher not in ("latents", "pixels", "uncached pixels"):
            continue
        reach = 2 if config == "cumulative" else 1
        for rank, (start, stop) in enumerate(shards):
            low, high = max(0, start // per_frame - reach), min(worker.FRAMES, (stop - 1) // per_frame + 1 + reach)
            got = ranks[rank][case]
            if got["frames_encoded"] != worker.BATCH * (high - low):
                bad.append(f"{config} {teacher} rank {rank}: encoded {got['frames_encoded']} frames, its window "
                           f"[{low}, {high}) holds {worker.BATCH * (high - low)}")
            if teacher == "latents" and got["frames_decoded"] != worker.BATCH * (2 * (high - 1) + 1):
                bad.append(f"{config} latents rank {rank}: decoded {got['frames_decoded']} frames, the prefix to "
                           f"student frame {high - 1} is {worker.BATCH * (2 * (high - 1) + 1)}")
        if teacher == "latents" and ranks[0][case]["frames_decoded"] >= truth[case]["frames_decoded"]:
            bad.append(f"{config} latents: rank 0 decoded as many frames as the whole clip")
    return bad


@pytest.mark.slow
@needs_gloo
def test_diffusers_enable_parallelism_is_detected(spawned):
    """Ulysses over 2 ranks (even shards: the only diffusers layout that runs on CPU / gloo), with teacher
    features on the student grid and with latents whose teacher grid is coarser (the student resampled) on
    a tiny Wan, and image REPA on a tiny Flux (its plan shards the image and the caption at the model's
    input; the one image is resampled whole by rank 0); run in the 2-process spawn, after its
    explicit-layout cases."""
    pytest.importorskip("diffusers").ContextParallelConfig   # noqa: B018
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        truth = [worker.run_diffusers_case(config, teacher, family, None)
                 for config, teacher, family in worker.DIFFUSERS_CASES]
    finally:
        torch.set_num_threads(threads)
    ranks = [r["diffusers"] for r in spawned(2)]
    halves = [t["captured_grad"].shape[1] // 2 for t in truth]
    assert [[case["captured_grad"].shape[1] for case in r] for r in ranks] == [halves, halves]   # shards
    cases = [(config, teacher, f"{family}, diffusers Ulysses 2") for config, teacher, family in worker.DIFFUSERS_CASES]
    assert not mismatches(ranks, truth, 2, cases=cases)
    assert ranks[0][1]["frames_decoded"] < truth[1]["frames_decoded"]   # rank 0: a causal prefix


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def build(**config):
    model = tm.tiny_wan()
    return model, CrepaRegularizer.from_config({**worker.BASE, **config}, transformer=model, encoder=tm.tiny_dinov2())


@needs_gloo
def test_irepa_is_refused_naming_the_key(one_rank_group):
    _, reg = build(irepa_enabled=True)
    with pytest.raises(ValueError, match="irepa_enabled"):
        reg.set_context_parallel(one_rank_group, shard=(0, worker.TOKENS))


@needs_gloo
def test_bad_layouts_and_calls_are_refused(one_rank_group):
    model, reg = build()
    for shard, message in [((3, 2), "start < stop"), ((1, 5), "tile the sequence from token 0"),
                           ((-1, 4), "integer >= 0"), (5, r"\(start, stop\)")]:
        with pytest.raises(ValueError, match=message):
            reg.set_context_parallel(one_rank_group, shard=shard)
    latents, text, features = worker.inputs()
    reg.set_context_parallel(one_rank_group, shard=(0, 12))    # the forward holds 24 tokens
    model(latents, torch.full((worker.BATCH,), 500.0), text, return_dict=False)
    with pytest.raises(ValueError, match="cover 12 tokens"):
        reg(teacher_features=features, step=0)
    reg.set_context_parallel(one_rank_group, shard=(0, worker.TOKENS))
    # a whole-sequence shard in a group of one is the plain call, and turning it off restores the plain path
    model(latents, torch.full((worker.BATCH,), 500.0), text, return_dict=False)
    sharded, _ = reg(teacher_features=features, step=0)
    reg.set_context_parallel(None, shard=None)
    model(latents, torch.full((worker.BATCH,), 500.0), text, return_dict=False)
    plain, _ = reg(teacher_features=features, step=0)
    assert torch.allclose(sharded, plain, rtol=1e-5)


def test_urepa_refuses_context_parallelism():
    from repa_kernels.regularizer import UrepaRegularizer
    reg = UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_encoder_image_size": 16}, unet=tm.tiny_unet(),
                                       encoder=tm.tiny_dinov2())
    with pytest.raises(ValueError, match="does not support context parallelism"):
        reg.set_context_parallel(None, shard=(0, 1))


@needs_gloo
@pytest.mark.parametrize("family", ["kandinsky5", "lumina2"])
def test_families_other_than_plain_image_tokens_are_refused(one_rank_group, family):
    """Kandinsky5's local-window order and a joint (caption, image) sequence (Lumina2) are refused by
    name; plain image and video token outputs are accepted (layout checks only: no forward here)."""
    import tiny_families
    model = tm.tiny_kandinsky5() if family == "kandinsky5" else tiny_families.CASES[family].build()
    reg = CrepaRegularizer.from_config(worker.BASE, transformer=model, encoder=tm.tiny_dinov2())
    with pytest.raises(ValueError, match=f"image or video tokens alone.*the {family} family"):
        reg.set_context_parallel(one_rank_group, shard=(0, worker.TOKENS))
    for build_accepted in (tm.tiny_ltx, tm.tiny_sana_video, tm.tiny_sd3, tm.tiny_pixart):
        accepted = CrepaRegularizer.from_config(worker.BASE, transformer=build_accepted(), encoder=tm.tiny_dinov2())
        accepted.set_context_parallel(one_rank_group, shard=(0, worker.TOKENS))
        accepted.detach()
