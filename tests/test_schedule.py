"""Coefficient schedule of docs/contract.md §4: weights at documented steps, cutoffs, EMA, state, distributed
average."""

import json
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from repa_kernels.regularizer.config import CrepaConfig, UrepaConfig
from repa_kernels.regularizer.schedule import CoefficientSchedule

T2V_PRESET = {"crepa_scheduler": "cosine", "crepa_lambda": 0.5, "crepa_warmup_steps": 100, "crepa_decay_steps": 0,
              "crepa_lambda_end": 0.1, "crepa_similarity_threshold": 0.85, "crepa_threshold_mode": "permanent"}


# --------------------------------------------------------------------------------------------- weights


def test_documented_warmup_100_decay_5000_reaches_lambda_end_at_5100():
    schedule = CoefficientSchedule(lambda_=0.5, scheduler="cosine", warmup_steps=100, decay_steps=5000,
                                   lambda_end=0.0)
    assert schedule.weight(0) == 0.0
    assert schedule.weight(50) == pytest.approx(0.25)          # warmup is linear
    assert schedule.weight(100) == pytest.approx(0.5)          # decay starts after warmup
    assert schedule.weight(2600) == pytest.approx(0.25)        # cosine midpoint
    assert schedule.weight(5099) > 0.0
    assert schedule.weight(5100) == pytest.approx(0.0, abs=1e-15)
    assert schedule.weight(9999) == 0.0


@pytest.mark.parametrize("scheduler, power, expected_mid", [
    ("linear", 1.0, 0.3),                   # 0.5 + (0.1 - 0.5) * 0.5
    ("cosine", 1.0, 0.3),                   # 0.1 + 0.4 * (1 + cos(pi/2)) / 2
    ("polynomial", 1.0, 0.3),               # 0.4 * 0.5 + 0.1
    ("polynomial", 2.0, 0.2),               # 0.4 * 0.25 + 0.1
    ("polynomial", 0.5, 0.4 * math.sqrt(0.5) + 0.1),
])
def test_midpoints(scheduler, power, expected_mid):
    schedule = CoefficientSchedule(lambda_=0.5, scheduler=scheduler, warmup_steps=10, decay_steps=100,
                                   lambda_end=0.1, power=power)
    assert schedule.weight(10) == pytest.approx(0.5)
    assert schedule.weight(60) == pytest.approx(expected_mid)
    assert schedule.weight(110) == pytest.approx(0.1)
    assert schedule.weight(10_000) == pytest.approx(0.1)


def test_cosine_quarter_points():
    schedule = CoefficientSchedule(lambda_=1.0, scheduler="cosine", decay_steps=100, lambda_end=0.0)
    assert schedule.weight(25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert schedule.weight(75) == pytest.approx((1 + math.cos(3 * math.pi / 4)) / 2)


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "polynomial"])
def test_warmup_applies_to_every_scheduler(scheduler):
    schedule = CoefficientSchedule(lambda_=0.8, scheduler=scheduler, warmup_steps=40, decay_steps=100)
    assert [schedule.weight(step) for step in (0, 10, 20, 30)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert schedule.weight(40) == pytest.approx(0.8)


def test_increasing_schedule_is_allowed():
    schedule = CoefficientSchedule(lambda_=0.0, scheduler="linear", decay_steps=10, lambda_end=1.0)
    assert schedule.weight(5) == pytest.approx(0.5) and schedule.weight(20) == pytest.approx(1.0)
    assert not schedule.finished(20)


def test_t2v_preset_decays_until_max_train_steps():
    cfg = CrepaConfig.from_dict(T2V_PRESET)
    schedule = CoefficientSchedule.from_config(cfg, max_train_steps=10_000)
    assert schedule.weight(50) == pytest.approx(0.25)
    assert schedule.weight(100) == pytest.approx(0.5)
    assert schedule.weight(5050) == pytest.approx(0.3)         # p = 4950 / 9900 = 0.5
    assert schedule.weight(10_000) == pytest.approx(0.1)
    assert schedule.similarity_threshold == 0.85 and schedule.threshold_mode == "permanent"


def test_t2v_preset_without_max_train_steps_asks_for_it_at_the_first_step_that_needs_it():
    """Trainers know max_train_steps only after accelerator.prepare(dataloader): building never needs it,
    the warmup steps do not either; the first weight after the warmup does, and says how to set it."""
    cfg = CrepaConfig.from_dict(T2V_PRESET)
    schedule = CoefficientSchedule.from_config(cfg)
    assert schedule.max_train_steps is None and schedule.needs_max_train_steps
    assert schedule.weight(50) == pytest.approx(0.25) and not schedule.finished(99)   # warmup: λ·step/100
    with pytest.raises(ValueError) as info:
        schedule.weight(100)
    message = str(info.value)
    assert "crepa_scheduler='cosine' with crepa_decay_steps=0" in message and "step 100" in message
    assert "reg.set_max_train_steps(n)" in message and "pass max_train_steps=" in message
    assert '"max_train_steps" in the trainer config' in message
    with pytest.raises(ValueError, match="needs max_train_steps"):
        schedule.at(100)
    schedule.set_max_train_steps(10_000)
    assert schedule.weight(5050) == pytest.approx(0.3) and schedule.weight(10_000) == pytest.approx(0.1)
    schedule.set_max_train_steps(5_100)                       # replaced: the decay ends earlier
    assert schedule.weight(5100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="got max_train_steps=100"):
        schedule.set_max_train_steps(100)                     # a known value must exceed the warmup
    with pytest.raises(ValueError, match="got max_train_steps=100"):
        CoefficientSchedule.from_config(cfg, max_train_steps=100)
    assert schedule.max_train_steps == 5_100                  # a refused value changes nothing
    epochs = CoefficientSchedule.from_config(cfg, max_train_steps=0)    # "train by epochs": not known yet
    assert epochs.max_train_steps is None
    with pytest.raises(ValueError, match=r"0 there means \"train by epochs\""):
        epochs.weight(100)
    linear = CoefficientSchedule.from_config(UrepaConfig(urepa_scheduler="linear"))
    with pytest.raises(ValueError, match="urepa_scheduler='linear' with urepa_decay_steps=0.*step 0"):
        linear.at(0)
    with pytest.raises(TypeError, match="max_train_steps must be an integer >= 0 or None"):
        linear.set_max_train_steps("many")


def test_max_train_steps_argument_wins_over_the_config():
    cfg = CrepaConfig.from_dict({**T2V_PRESET, "max_train_steps": 100_000})
    assert CoefficientSchedule.from_config(cfg).weight(10_000) > 0.45
    assert CoefficientSchedule.from_config(cfg, max_train_steps=10_000).weight(10_000) == pytest.approx(0.1)


def test_constant_scheduler_needs_no_max_train_steps():
    schedule = CoefficientSchedule.from_config(CrepaConfig(crepa_lambda=0.7, crepa_warmup_steps=10))
    assert schedule.weight(5) == pytest.approx(0.35) and schedule.weight(10**9) == pytest.approx(0.7)
    assert CoefficientSchedule(lambda_=1.0, scheduler="linear", decay_steps=5).weight(3) == pytest.approx(0.4)


def test_step_cutoff():
    schedule = CoefficientSchedule(lambda_=0.5, cutoff_step=2000)
    assert schedule.weight(1999) == 0.5 and not schedule.cutoff_active(1999) and not schedule.finished(1999)
    assert schedule.weight(2000) == 0.0 and schedule.cutoff_active(2000) and schedule.finished(2000)
    assert not schedule.permanently_off  # the step cutoff is the caller's through cutoff_active/finished


def test_finished_means_no_later_step_can_weigh_more_than_zero():
    decayed = CoefficientSchedule(lambda_=0.5, scheduler="linear", warmup_steps=10, decay_steps=90)
    assert not decayed.finished(99) and decayed.finished(100)
    floor = CoefficientSchedule(lambda_=0.5, scheduler="linear", decay_steps=90, lambda_end=0.1)
    assert not floor.finished(10**6)
    assert CoefficientSchedule(lambda_=0.0).finished(0)
    assert not CoefficientSchedule(lambda_=0.5, warmup_steps=10).finished(0)


def test_zero_weights_are_respected():
    assert CoefficientSchedule(lambda_=0.0).weight(5) == 0.0
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.0, similarity_threshold=1e-9)
    schedule.update(0.0)
    assert schedule.ema == 0.0 and not schedule.permanently_off  # a score of 0 is kept, below any threshold
    with pytest.raises(ValueError, match=r"crepa_similarity_threshold=0 is outside \(0, 1\]"):
        CoefficientSchedule(lambda_=0.5, similarity_threshold=0.0)   # the one key where 0 is refused


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"lambda_": -1.0}, ValueError, "crepa_lambda must be a finite number >= 0"),
    ({"lambda_": 0.5, "scheduler": "step"}, ValueError, "crepa_scheduler must be one of"),
    ({"lambda_": 0.5, "warmup_steps": -1}, ValueError, "crepa_warmup_steps must be an integer >= 0"),
    ({"lambda_": 0.5, "power": 0.0}, ValueError, "crepa_power must be a finite number > 0"),
    ({"lambda_": 0.5, "ema_decay": 1.0}, ValueError, "crepa_similarity_ema_decay must be a finite number >= 0 and < 1"),
    ({"lambda_": 0.5, "threshold_mode": "once"}, ValueError, "crepa_threshold_mode must be one of"),
    ({"lambda_": 0.5, "cutoff_step": 1.5}, TypeError, "crepa_cutoff_step must be an integer >= 0"),
    ({"lambda_": 0.5, "name": "urepa", "decay_steps": -5}, ValueError, "urepa_decay_steps must be"),
])
def test_constructor_errors(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        CoefficientSchedule(**kwargs)


@pytest.mark.parametrize("step, error", [(-1, ValueError), (True, TypeError), (1.0, TypeError),
                                         (torch.tensor(3), TypeError)])
def test_step_must_be_a_python_int(step, error):
    with pytest.raises(error, match="step must be a Python int >= 0"):
        CoefficientSchedule(lambda_=0.5).weight(step)


# ------------------------------------------------------------------------------------ similarity EMA


def test_ema_first_value_as_is_then_decay():
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.9)
    assert schedule.ema is None
    schedule.update(torch.tensor(0.5))
    assert schedule.ema == pytest.approx(0.5)
    schedule.update(torch.tensor([1.0], dtype=torch.float16))
    assert schedule.ema == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    schedule.update(0.0)
    assert schedule.ema == pytest.approx(0.9 * 0.55)
    assert schedule.weight(0) == 0.5  # no threshold: the EMA is kept but never cuts off


def test_permanent_cutoff_stays_off():
    schedule = CoefficientSchedule(lambda_=0.5, similarity_threshold=0.75, ema_decay=0.5, threshold_mode="permanent")
    weights = []
    for step, score in enumerate([0.5, 1.0, 0.25, 0.125, 0.0]):  # EMA 0.5, 0.75 (fires), 0.5, 0.3125, 0.15625
        weights.append(schedule.weight(step))  # as of the previous call
        schedule.update(torch.tensor(score))
    assert weights == [0.5, 0.5, 0.0, 0.0, 0.0]
    assert schedule.permanently_off and schedule.cutoff_active(5) and schedule.finished(5)
    assert schedule.base_weight(5) == 0.5 and schedule.weight(5) == 0.0


def test_recoverable_cutoff_turns_back_on():
    schedule = CoefficientSchedule(lambda_=0.5, similarity_threshold=0.75, ema_decay=0.5,
                                   threshold_mode="recoverable")
    weights, active = [], []
    for step, score in enumerate([0.5, 1.0, 0.25, 1.5, 0.0]):  # EMA 0.5, 0.75 (on), 0.5 (off), 1.0 (on), 0.5 (off)
        weights.append(schedule.weight(step))
        active.append(schedule.cutoff_active(step))
        schedule.update(torch.tensor(score))
    assert weights == [0.5, 0.5, 0.0, 0.5, 0.0]
    assert active == [False, False, True, False, True]
    assert schedule.weight(5) == 0.5 and not schedule.permanently_off and not schedule.finished(5)


def test_nonfinite_score_is_left_out_of_the_ema_with_one_warning():
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.5)
    schedule.update(0.4)
    with pytest.warns(RuntimeWarning, match="not finite"):
        schedule.update(torch.tensor(float("nan")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule.update(float("inf"))
    assert schedule.ema == 0.4 and schedule.state_dict()["num_nonfinite"] == 2


def test_update_rejects_non_scalars():
    schedule = CoefficientSchedule(lambda_=0.5)
    with pytest.raises(ValueError, match="score must be a scalar"):
        schedule.update(torch.ones(2))
    with pytest.raises(TypeError, match="score must be a scalar tensor or a float"):
        schedule.update("0.5")


# ------------------------------------------------------------------------- one EMA update per step


def test_micro_batches_of_one_step_are_one_ema_update_with_their_mean():
    """Gradient accumulation 2: two calls share each optimizer step. The EMA is updated once per step,
    with the mean score, when the next step begins (so its weight sees it)."""
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.5, similarity_threshold=0.5)
    for score in (0.2, 0.4):
        schedule.record(torch.tensor(score), step=0)
    assert schedule.ema is None and schedule.ema_so_far == pytest.approx(0.3)
    schedule.begin_step(1)                      # step 0 ended: one update with the mean 0.3
    assert schedule.ema == pytest.approx(0.3) and schedule.state_dict()["num_updates"] == 1
    for score in (0.9, 0.7):
        schedule.record(score, step=1)
    schedule.record(1.0, step=1)                # three micro-batches: mean 0.8666...
    assert schedule.weight(1) == 0.5 and schedule.ema_so_far == pytest.approx(0.5 * 0.3 + 0.5 * 2.6 / 3)
    assert schedule.at(2).weight == 0.5        # the open step does not decide yet ...
    schedule.begin_step(2)
    assert schedule.ema == pytest.approx(0.5 * 0.3 + 0.5 * 2.6 / 3) and schedule.at(2).weight == 0.0   # ... now
    assert schedule.state_dict()["num_updates"] == 2


def test_end_step_is_the_explicit_end_of_an_optimizer_step():
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.5)
    schedule.record(0.2, step=7)
    schedule.record(0.6, step=7)
    schedule.end_step()
    assert schedule.ema == pytest.approx(0.4) and schedule.state_dict()["num_updates"] == 1
    schedule.end_step()                         # nothing open: nothing changes
    assert schedule.state_dict()["num_updates"] == 1
    with pytest.raises(ValueError, match="step 7 was already ended by end_step"):
        schedule.record(0.9, step=7)
    schedule.record(0.8, step=8)
    schedule.end_step()
    assert schedule.ema == pytest.approx(0.6)
    with pytest.raises(TypeError, match="step must be a Python int"):
        schedule.begin_step(1.5)


def test_a_non_finite_micro_batch_is_left_out_of_its_steps_mean():
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.5)
    schedule.record(0.4, step=0)
    with pytest.warns(RuntimeWarning, match="not finite"):
        schedule.record(float("nan"), step=0)
    schedule.end_step()
    assert schedule.ema == 0.4 and schedule.state_dict()["num_nonfinite"] == 1
    schedule.record(float("inf"), step=1)       # a step with no finite score: no update
    schedule.begin_step(2)
    assert schedule.ema == 0.4 and schedule.state_dict()["num_updates"] == 1


def test_a_state_saved_inside_a_step_resumes_with_its_scores():
    kwargs = dict(lambda_=0.5, ema_decay=0.5, similarity_threshold=0.6)
    uninterrupted = CoefficientSchedule(**kwargs)
    first = CoefficientSchedule(**kwargs)
    for schedule in (uninterrupted, first):
        schedule.record(0.5, step=0)
        schedule.record(0.7, step=0)
    resumed = CoefficientSchedule(**kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))   # JSON-safe
    for schedule in (uninterrupted, resumed):
        schedule.record(0.9, step=1)
    assert resumed.state_dict() == uninterrupted.state_dict() and resumed.ema == pytest.approx(0.6)
    assert resumed.weight(1) == 0.0 and resumed.permanently_off


def test_a_version_1_state_loads_without_an_open_step():
    """Saved before the EMA counted optimizer steps (this package's earlier checkpoints)."""
    state = {"version": 1, "ema": 0.3, "similarity_cutoff_on": False, "permanent_cutoff_fired": False,
             "num_updates": 12, "num_nonfinite": 0}
    schedule = CoefficientSchedule(lambda_=0.5, ema_decay=0.5)
    schedule.load_state_dict(state)
    assert schedule.ema == 0.3 and schedule.ema_so_far == 0.3
    schedule.record(0.5, step=13)
    schedule.end_step()
    assert schedule.ema == pytest.approx(0.4) and schedule.state_dict()["num_updates"] == 13
    with pytest.raises(ValueError, match="must have the keys"):
        schedule.load_state_dict({**state, "step": 3})


# ----------------------------------------------------------------------------------- checkpoint state


def run(schedule, scores, first_step=0):
    weights = []
    for offset, score in enumerate(scores):
        weights.append(schedule.weight(first_step + offset))
        schedule.update(torch.tensor(score))
    return weights


@pytest.mark.parametrize("mode", ["permanent", "recoverable"])
def test_state_dict_round_trip_gives_identical_next_weights(mode):
    kwargs = dict(lambda_=0.5, scheduler="cosine", warmup_steps=3, decay_steps=20, lambda_end=0.1,
                  similarity_threshold=0.7, ema_decay=0.6, threshold_mode=mode)
    scores = [0.1, 0.5, 0.9, 0.95, 0.3, 0.2, 0.9, 0.1, 0.05, 0.8, 0.9, 0.99]
    uninterrupted = run(CoefficientSchedule(**kwargs), scores)

    first = CoefficientSchedule(**kwargs)
    head = run(first, scores[:5])
    state = json.loads(json.dumps(first.state_dict()))  # plain Python values survive any checkpoint format
    resumed = CoefficientSchedule(**kwargs)
    resumed.load_state_dict(state)
    tail = run(resumed, scores[5:], first_step=5)
    assert head + tail == uninterrupted
    assert resumed.state_dict() == run_state(kwargs, scores)


def run_state(kwargs, scores):
    schedule = CoefficientSchedule(**kwargs)
    run(schedule, scores)
    return schedule.state_dict()


def test_fired_permanent_cutoff_survives_a_resume():
    schedule = CoefficientSchedule(lambda_=0.5, similarity_threshold=0.5, ema_decay=0.0)
    schedule.update(0.9)
    resumed = CoefficientSchedule(lambda_=0.5, similarity_threshold=0.5, ema_decay=0.0)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.permanently_off and resumed.weight(10) == 0.0 and resumed.ema == 0.9
    without_threshold = CoefficientSchedule(lambda_=0.5)
    without_threshold.load_state_dict(schedule.state_dict())
    assert not without_threshold.permanently_off and without_threshold.weight(10) == 0.5


def test_load_state_dict_errors():
    schedule = CoefficientSchedule(lambda_=0.5)
    good = schedule.state_dict()
    with pytest.raises(TypeError, match="state must be a dict"):
        schedule.load_state_dict([1])
    with pytest.raises(ValueError, match="must have the keys"):
        schedule.load_state_dict({"ema": 0.5})
    with pytest.raises(ValueError, match="has version 99"):
        schedule.load_state_dict({**good, "version": 99})
    with pytest.raises(ValueError, match="ema must be a finite float or None"):
        schedule.load_state_dict({**good, "ema": float("nan")})
    with pytest.raises(ValueError, match="permanent_cutoff_fired must be a bool"):
        schedule.load_state_dict({**good, "permanent_cutoff_fired": 1})


# ------------------------------------------------------------------------------------------ distributed

# rank 0 alone would fire on update 2, rank 1 alone never; their average (EMA decay 0.5 over the mean
# scores 0.2, 0.5, 0.6, 0.7 -> 0.2, 0.35, 0.475, 0.5875) fires on update 4 on both ranks.
RANK_SCORES = [[0.2, 0.9, 0.9, 0.9], [0.2, 0.1, 0.3, 0.5]]
THRESHOLD = 0.5
# Gradient accumulation 2, three optimizer steps: each rank's two micro-batch scores per step. Step means
# over both ranks and both micro-batches 0.3, 0.6, 0.8 -> EMA (decay 0.5) 0.3, 0.45, 0.625: three updates.
# Per call it would have been six updates, over the calls' rank means 0.25, 0.35, 0.4, 0.8, 0.9, 0.7.
ACCUMULATED_SCORES = [[[0.1, 0.3], [0.5, 0.9], [0.8, 0.8]], [[0.4, 0.4], [0.3, 0.7], [1.0, 0.6]]]


def _distributed_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        schedule = CoefficientSchedule(lambda_=0.5, similarity_threshold=THRESHOLD, ema_decay=0.5)
        log = []
        for step, score in enumerate(RANK_SCORES[rank]):
            schedule.update(torch.tensor(score))
            log.append([schedule.ema, schedule.permanently_off, schedule.weight(step + 1)])
        accumulated = CoefficientSchedule(lambda_=0.5, ema_decay=0.5)
        accumulated_log = []
        for step, micro_batches in enumerate(ACCUMULATED_SCORES[rank]):
            for score in micro_batches:
                accumulated.record(torch.tensor(score), step)
            accumulated_log.append([accumulated.ema, accumulated.ema_so_far])
        accumulated.end_step()
        accumulated_log.append([accumulated.ema, accumulated.state_dict()["num_updates"]])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"per_call": log, "accumulated": accumulated_log}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available()
                    or "fork" not in mp.get_all_start_methods(), reason="needs torch.distributed gloo and fork")
def test_score_is_averaged_across_ranks_and_micro_batches_before_the_ema(tmp_path):
    # fork: the children need nothing re-imported, which keeps this test at about a second
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    logs = [result["per_call"] for result in results]
    assert logs[0] == logs[1]
    emas = [entry[0] for entry in logs[0]]
    assert emas == pytest.approx([0.2, 0.35, 0.475, 0.5875], abs=1e-6)
    assert [entry[1] for entry in logs[0]] == [False, False, False, True]
    assert [entry[2] for entry in logs[0]] == [0.5, 0.5, 0.5, 0.0]
    # Gradient accumulation: one EMA update per optimizer step, with the step's mean over ranks and calls.
    accumulated = [result["accumulated"] for result in results]
    assert accumulated[0] == accumulated[1]
    assert accumulated[0][0][0] is None
    assert [entry[1] for entry in accumulated[0][:3]] == pytest.approx([0.3, 0.45, 0.625], abs=1e-6)
    assert [entry[0] for entry in accumulated[0][1:3]] == pytest.approx([0.3, 0.45], abs=1e-6)
    assert accumulated[0][3] == [pytest.approx(0.625, abs=1e-6), 3]
