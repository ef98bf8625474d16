"""The coefficient schedule of a regularizer (docs/contract.md §4): warmup, decay, step cutoff and the
cutoff on the EMA of the alignment score, with its state for checkpoints.

Use, once per regularizer call at optimizer step `step`:

    plan = schedule.at(step, training)   # training calls: a new step first ends the previous one (EMA
                                         # update); the weight is from the EMA of the steps ended so far
    if plan.finished: ...                # no later call can weigh more than 0: skip decode/encode/loss
    else: compute loss and score; schedule.record(score, step) (training calls); return plan.weight * loss

The EMA counts optimizer steps, not calls: under gradient accumulation the micro-batch calls of one step
share its `step`, and their scores are averaged into one EMA update when the step ends, i.e. at the first
training call with another `step` (or at `end_step()`, which a trainer may call once per optimizer step).
So `*_similarity_ema_decay` means the same with and without accumulation (with accumulation 2, two
optimizer steps gave four EMA updates when every call updated it). Calls that do not train (eval mode or
no grad: validation, logging) neither record a score nor end a step.

`record` is the only place that reads the device (one `.item()` per training call); under torch.distributed
it averages the score across ranks first, so every rank records on the same calls (the regularizer decides
to skip from this shared state, so it does). The mean of the per-call cross-rank averages is the cross-rank
average of each rank's step mean, since every rank runs the same number of micro-batches.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple

import torch

from .config import SCHEDULE_KEYS, CrepaConfig, UrepaConfig, check_similarity_threshold
from .ranks import mean_across_ranks
from .value_rules import Float, Int

__all__ = ["CoefficientSchedule"]

_STATE_VERSION = 2   # 2: the open step (its score sum and count) is part of the state


class StepPlan(NamedTuple):
    """What the schedule says about one step: the weight, whether a cutoff holds it at 0, and whether no
    later step can weigh more than 0 (the call may skip decode, encode and loss)."""

    weight: float
    cutoff: bool
    finished: bool


class CoefficientSchedule:
    """λ(step) of docs/contract.md §4 plus the similarity cutoff.

    lambda_: λ >= 0. scheduler: constant / linear / cosine / polynomial. warmup_steps: linear ramp 0 -> λ
    over steps [0, warmup) for every scheduler. decay_steps: length of the decay after warmup (λ_end from
    step warmup + decay_steps on); 0 = decay until max_train_steps. lambda_end: λ at the end of the decay.
    power: polynomial power > 0. cutoff_step: weight 0 from this step on (0 = off). similarity_threshold:
    the EMA of the score at which the weight drops to 0 (None = off). ema_decay in [0, 1). threshold_mode:
    permanent (off for good) or recoverable (back on when the EMA falls below the threshold).
    max_train_steps: total steps, needed by a decaying schedule with decay_steps 0 from the first step after
    warmup on; it may be given later (`set_max_train_steps`). name: key prefix used in error messages
    ("crepa" -> crepa_decay_steps).
    """

    def __init__(self, *, lambda_: float, scheduler: str = "constant", warmup_steps: int = 0,
                 decay_steps: int = 0, lambda_end: float = 0.0, power: float = 1.0, cutoff_step: int = 0,
                 similarity_threshold: float | None = None, ema_decay: float = 0.99,
                 threshold_mode: str = "permanent", max_train_steps: int | None = None,
                 name: str = "crepa") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.lambda_ = Float(0.0).coerce(f"{name}_lambda", lambda_)

        def checked(suffix: str, value: Any) -> Any:   # the config keys' own rules (config.SCHEDULE_KEYS)
            return SCHEDULE_KEYS[suffix][1].coerce(f"{name}_{suffix}", value)

        self.scheduler = checked("scheduler", scheduler)
        self.warmup_steps = checked("warmup_steps", warmup_steps)
        self.decay_steps = checked("decay_steps", decay_steps)
        self.lambda_end = checked("lambda_end", lambda_end)
        self.power = checked("power", power)
        self.cutoff_step = checked("cutoff_step", cutoff_step)
        self.similarity_threshold = checked("similarity_threshold", similarity_threshold)
        check_similarity_threshold(f"{name}_similarity_threshold", self.similarity_threshold)
        self.ema_decay = checked("similarity_ema_decay", ema_decay)
        self.threshold_mode = checked("threshold_mode", threshold_mode)
        self.max_train_steps: int | None = None
        self.set_max_train_steps(max_train_steps)

        self.ema: float | None = None          # over the optimizer steps ended so far
        self._similarity_cutoff_on = False
        self._permanent_cutoff_fired = False
        self._num_updates = 0                  # optimizer steps folded into the EMA
        self._num_nonfinite = 0
        self._step: int | None = None          # the step of the latest training call
        self._step_ended = False               # end_step() was called for it
        self._step_score_sum = 0.0             # its finite scores so far (each averaged across ranks)
        self._step_score_count = 0
        self.ema_so_far: float | None = None   # the EMA with the open step's scores so far (what is logged)

    # ------------------------------------------------------------------ max_train_steps

    @property
    def needs_max_train_steps(self) -> bool:
        """A decaying schedule with decay_steps 0 decays until the end of training: max_train_steps."""
        return self.scheduler != "constant" and self.decay_steps == 0

    def set_max_train_steps(self, max_train_steps: int | None) -> None:
        """Set (or replace) the total number of optimizer steps. Trainers often know it only after
        `accelerator.prepare(dataloader)` (from epochs), after the regularizer is built: a schedule that
        needs it asks for it at the first step whose weight depends on it, not before. None (or 0, a
        trainer config's "train by epochs") leaves it unknown; a known value must exceed warmup_steps
        when the decay runs until it."""
        value = Int(0, nullable=True).coerce("max_train_steps", max_train_steps)
        value = None if value == 0 else value
        if value is not None and self.needs_max_train_steps and value <= self.warmup_steps:
            raise ValueError(
                f"{self.name}_scheduler={self.scheduler!r} with {self.name}_decay_steps=0 decays from the end of the "
                f"warmup to the end of training, so it needs max_train_steps > {self.name}_warmup_steps="
                f"{self.warmup_steps}, got max_train_steps={value}; or set {self.name}_decay_steps to the length of "
                "the decay in steps")
        self.max_train_steps = value

    def _decay_length(self, step: int) -> int:
        """L of docs/contract.md §4 for a weight at `step`: decay_steps, or max_train_steps - warmup_steps."""
        if self.decay_steps > 0:
            return self.decay_steps
        if self.max_train_steps is None:
            raise ValueError(
                f"{self.name}_scheduler={self.scheduler!r} with {self.name}_decay_steps=0 decays until the end of "
                f"training, so the weight at step {step} (after the {self.name}_warmup_steps={self.warmup_steps} "
                "warmup) needs max_train_steps, which is not set. Call reg.set_max_train_steps(n) (or "
                "schedule.set_max_train_steps(n)) once the trainer knows it, e.g. after accelerator.prepare("
                "dataloader); or pass max_train_steps=... when building the regularizer, put \"max_train_steps\" in "
                f"the trainer config the {self.name}_* keys are read from (a value of 0 there means \"train by "
                f"epochs\": the number is not known yet), or set {self.name}_decay_steps to the length of the decay "
                "in steps.")
        return self.max_train_steps - self.warmup_steps

    @classmethod
    def from_config(cls, cfg: CrepaConfig | UrepaConfig, max_train_steps: int | None = None) -> "CoefficientSchedule":
        """The schedule of a config's `{prefix}_*` keys; the `max_train_steps` argument wins over
        `cfg.max_train_steps`."""
        if not isinstance(cfg, (CrepaConfig, UrepaConfig)):
            raise TypeError(f"cfg must be a CrepaConfig or UrepaConfig, got {type(cfg).__name__}")
        p = cfg.PREFIX
        keys = {("ema_decay" if suffix == "similarity_ema_decay" else suffix): getattr(cfg, f"{p}_{suffix}")
                for suffix in SCHEDULE_KEYS}
        return cls(lambda_=getattr(cfg, f"{p}_lambda"), **keys, name=p,
                   max_train_steps=cfg.max_train_steps if max_train_steps is None else max_train_steps)

    # ------------------------------------------------------------------ weights

    @staticmethod
    def _check_step(step: Any) -> int:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be a Python int >= 0 (the optimizer step), got {step!r} "
                            f"({type(step).__name__})")
        if step < 0:
            raise ValueError(f"step must be a Python int >= 0 (the optimizer step), got {step}")
        return int(step)

    def _step_cutoff_reached(self, step: int) -> bool:
        return self.cutoff_step > 0 and step >= self.cutoff_step

    def base_weight(self, step: int) -> float:
        """λ at `step` from warmup, decay and the step cutoff (docs/contract.md §4), ignoring the similarity cutoff."""
        step = self._check_step(step)
        if self._step_cutoff_reached(step):
            return 0.0
        if step < self.warmup_steps:
            return self.lambda_ * step / self.warmup_steps
        if self.scheduler == "constant":
            return self.lambda_
        progress = min(max((step - self.warmup_steps) / self._decay_length(step), 0.0), 1.0)
        start, end = self.lambda_, self.lambda_end
        if self.scheduler == "linear":
            return start + (end - start) * progress
        if self.scheduler == "cosine":
            return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return (start - end) * (1.0 - progress) ** self.power + end  # polynomial

    def weight(self, step: int) -> float:
        """The weight to apply at `step`: `base_weight(step)`, or 0.0 while the similarity cutoff is on."""
        base = self.base_weight(step)
        return 0.0 if self._similarity_cutoff_on else base

    def cutoff_active(self, step: int) -> bool:
        """Whether the step cutoff or the similarity cutoff holds the weight at 0 at `step`."""
        return self._step_cutoff_reached(self._check_step(step)) or self._similarity_cutoff_on

    @property
    def permanently_off(self) -> bool:
        """A permanent similarity cutoff has fired: the weight stays 0 for the rest of the run."""
        return self._permanent_cutoff_fired

    def finished(self, step: int) -> bool:
        """No call at `step` or later can get a non-zero weight, so decode, encode and loss can be skipped:
        a permanent cutoff fired, the step cutoff is reached, or λ (after warmup) and λ_end are both 0 and
        the decay is over (constant: λ = 0)."""
        step = self._check_step(step)
        if self._permanent_cutoff_fired or self._step_cutoff_reached(step):
            return True
        if self.scheduler == "constant":
            return self.lambda_ == 0.0
        if self.lambda_ == 0.0 and self.lambda_end == 0.0:
            return True
        return (self.lambda_end == 0.0 and step >= self.warmup_steps
                and step - self.warmup_steps >= self._decay_length(step))

    def at(self, step: int, training: bool = False) -> StepPlan:
        """`weight`, `cutoff_active` and `finished` at `step`, as one answer. training: the call trains, so
        `begin_step(step)` comes first (a new step ends the previous one, and this weight sees it)."""
        if training:
            self.begin_step(step)
        return StepPlan(self.weight(step), self.cutoff_active(step), self.finished(step))

    # ------------------------------------------------------------------ similarity EMA

    def begin_step(self, step: int) -> None:
        """A training call at optimizer step `step` starts: a `step` other than the latest ends that step
        (its mean score updates the EMA). Raises when `step` was already ended by `end_step()`."""
        step = self._check_step(step)
        if step == self._step:
            if self._step_ended:
                raise ValueError(
                    f"{self.name} schedule: step {step} was already ended by end_step(); a training call after it "
                    "must pass the next optimizer step (call end_step() once per optimizer step, after the last "
                    "micro-batch)")
            return
        self._fold_step()
        self._step, self._step_ended = step, False

    def record(self, score: torch.Tensor | float, step: int, also_read: torch.Tensor | None = None) -> list[float]:
        """Add one training call's alignment score to optimizer step `step` (`begin_step(step)` first).

        score: the detached scalar alignment score (a 1-element tensor on any device, or a float). Under an
        initialised torch.distributed group it is averaged across ranks first (all_reduce), then read to the
        host once. A non-finite score is left out (with a warning the first time). also_read: values of this
        rank the caller needs on the host (the regularizer's frame ranges), read in that same single read
        and returned (an empty list without them)."""
        self.begin_step(step)
        value, extra = self._reduce(score, also_read)
        if not math.isfinite(value):
            self._note_nonfinite(value)
            return extra
        self._step_score_sum += value
        self._step_score_count += 1
        self._refresh_ema_so_far()
        return extra

    def end_step(self) -> None:
        """End the current optimizer step now: its mean score updates the EMA, so the next call's weight
        sees it. Optional (the next training call with a new `step` does the same); for a trainer that
        prefers an explicit call once per optimizer step, after `optimizer.step()`."""
        self._fold_step()
        if self._step is not None:
            self._step_ended = True

    def update(self, score: torch.Tensor | float) -> None:
        """Fold `score` into the EMA now, as a step of its own (one micro-batch); an open step is ended
        first. `record` is the per-call form that averages an optimizer step's micro-batches."""
        self._fold_step()
        value, _ = self._reduce(score)
        if not math.isfinite(value):
            self._note_nonfinite(value)
            return
        self._fold(value)

    def _refresh_ema_so_far(self) -> None:
        """`ema_so_far`: the EMA with the open step's scores so far folded in, i.e. what `ema` becomes when
        the step ends (the regularizer logs it, so a call's log shows its own step's scores). An attribute,
        kept current by every change of the state, so reading it is no call."""
        self.ema_so_far = (self.ema if self._step_score_count == 0
                           else self._folded(self._step_score_sum / self._step_score_count))

    def _fold_step(self) -> None:
        if self._step_score_count:
            self._fold(self._step_score_sum / self._step_score_count)
        self._step_score_sum, self._step_score_count = 0.0, 0
        self._refresh_ema_so_far()

    def _folded(self, value: float) -> float:
        return value if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * value

    def _fold(self, value: float) -> None:
        """One optimizer step's mean score into the EMA (first value taken as is), then the cutoff."""
        self.ema = self._folded(value)
        self._num_updates += 1
        self._refresh_ema_so_far()
        if self.similarity_threshold is None:
            return
        reached = self.ema >= self.similarity_threshold
        if self.threshold_mode == "permanent":
            if reached:
                self._permanent_cutoff_fired = True
                self._similarity_cutoff_on = True
        else:
            self._similarity_cutoff_on = reached

    def _note_nonfinite(self, value: float) -> None:
        if self._num_nonfinite == 0:
            warnings.warn(f"{self.name} schedule: alignment score {value} is not finite; it is left out of the "
                          "similarity EMA", RuntimeWarning, stacklevel=3)
        self._num_nonfinite += 1

    @staticmethod
    def _reduce(score: torch.Tensor | float, also_read: torch.Tensor | None = None) -> tuple[float, list[float]]:
        if isinstance(score, torch.Tensor):
            if score.numel() != 1:
                raise ValueError(f"score must be a scalar (1 element), got shape {tuple(score.shape)}")
            tensor = score.detach().reshape(()).to(torch.float64)
        elif isinstance(score, numbers.Real) and not isinstance(score, bool):
            tensor = torch.tensor(float(score), dtype=torch.float64)
        else:
            raise TypeError(f"score must be a scalar tensor or a float, got {type(score).__name__}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():   # else no call at all
            tensor = mean_across_ranks(tensor)
        if also_read is None:
            return float(tensor.item()), []
        values = torch.cat([tensor.reshape(1), also_read.detach().reshape(-1).to(tensor.device, torch.float64)])
        values = values.tolist()      # the one device-to-host read
        return values[0], values[1:]

    # ------------------------------------------------------------------ checkpoint state

    _OPEN_STEP_KEYS = ("step", "step_ended", "step_score_sum", "step_score_count")

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-safe): the EMA, whether the similarity cutoff is on, whether a permanent
        cutoff fired, counters, and the open step (its scores so far), so a run saved between two optimizer
        steps resumes with the EMA update it had not made yet."""
        return {
            "version": _STATE_VERSION,
            "ema": self.ema,
            "similarity_cutoff_on": self._similarity_cutoff_on,
            "permanent_cutoff_fired": self._permanent_cutoff_fired,
            "num_updates": self._num_updates,
            "num_nonfinite": self._num_nonfinite,
            "step": self._step,
            "step_ended": self._step_ended,
            "step_score_sum": self._step_score_sum,
            "step_score_count": self._step_score_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` exactly. A schedule built without a similarity threshold keeps the EMA but
        no similarity cutoff (a run resumed with the threshold removed gets its weight back). A version 1
        state (saved before the EMA counted optimizer steps) has no open step."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        version = state.get("version")
        if version is not None and version not in (1, _STATE_VERSION):
            raise ValueError(f"{self.name} schedule state has version {version!r}; this repa_kernels reads versions "
                             f"1 and {_STATE_VERSION}")
        expected = set(self.state_dict()) - (set(self._OPEN_STEP_KEYS) if version == 1 else set())
        if set(state) != expected:
            raise ValueError(f"{self.name} schedule state must have the keys {sorted(expected)}, got {sorted(state)}")
        state = {"step": None, "step_ended": False, "step_score_sum": 0.0, "step_score_count": 0, **state}

        def finite(key: str, value: Any, nullable: bool) -> float | None:
            if value is None and nullable:
                return None
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{self.name} schedule state: {key} must be a finite float"
                                 f"{' or None' if nullable else ''}, got {value!r}")
            return float(value)

        ema = finite("ema", state["ema"], nullable=True)
        step_score_sum = finite("step_score_sum", state["step_score_sum"], nullable=False)
        for key in ("similarity_cutoff_on", "permanent_cutoff_fired", "step_ended"):
            if not isinstance(state[key], bool):
                raise ValueError(f"{self.name} schedule state: {key} must be a bool, got {state[key]!r}")
        for key in ("num_updates", "num_nonfinite", "step_score_count", "step"):
            value = state[key]
            if key == "step" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.name} schedule state: {key} must be an int >= 0, got {value!r}")
        self.ema = ema
        has_threshold = self.similarity_threshold is not None
        self._similarity_cutoff_on = state["similarity_cutoff_on"] and has_threshold
        self._permanent_cutoff_fired = state["permanent_cutoff_fired"] and has_threshold
        self._num_updates = state["num_updates"]
        self._num_nonfinite = state["num_nonfinite"]
        self._step, self._step_ended = state["step"], state["step_ended"]
        self._step_score_sum, self._step_score_count = step_score_sum, state["step_score_count"]
        self._refresh_ema_so_far()

    def __repr__(self) -> str:
        return (f"CoefficientSchedule(name={self.name!r}, lambda_={self.lambda_}, scheduler={self.scheduler!r}, "
                f"warmup_steps={self.warmup_steps}, decay_steps={self.decay_steps}, lambda_end={self.lambda_end}, "
                f"power={self.power}, cutoff_step={self.cutoff_step}, "
                f"similarity_threshold={self.similarity_threshold}, ema_decay={self.ema_decay}, "
                f"threshold_mode={self.threshold_mode!r}, max_train_steps={self.max_train_steps}, ema={self.ema})")
