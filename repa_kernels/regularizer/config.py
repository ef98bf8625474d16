"""The documented configuration keys of the CREPA/REPA and U-REPA regularizers (docs/contract.md §5).

`CrepaConfig` holds every `crepa_*` key and `UrepaConfig` every `urepa_*` key, each with its documented
default, plus `max_train_steps` (read from a whole trainer config, needed by a schedule that decays until
the end of training, docs/contract.md §4). A config is built from a dict, a JSON file or an argparse namespace; all
three end in `from_dict`, and every value goes through the same checks in `__post_init__`.

Rules, in the order they are applied:
- Keys may carry SimpleTuner's optional leading `--`. Keys without the `crepa_`/`urepa_` prefix are
  ignored (a whole trainer config may be passed), except `max_train_steps`, which is read, and `irepa_*`
  (see below). `CrepaConfig` ignores `urepa_*` keys and `UrepaConfig` ignores `crepa_*` keys.
- A key meant as a prefixed key but spelled otherwise (after lower-casing, `-` as `_` and stripping
  whitespace and leading dashes it starts with `crepa_`/`urepa_`/`irepa_`, or is `max_train_steps`:
  `crepa-lambda`, `CREPA_LAMBDA`, `" crepa_lambda"`, `-crepa_lambda`) is an unknown key, with the
  canonical key as the suggestion: such a key was silently left out before, and λ kept its default.
- A key given twice must agree (a dict spelling it with and without `--`, or a JSON file repeating it:
  `from_json` reads the file's pairs, not the last value `json.load` keeps).
- Aliases: `crepa_model` means `crepa_encoder` (when both are given with different values `crepa_model`
  wins, as in SimpleTuner, with a warning); `crepa_feature_source: "backbone"` means
  `crepa_use_backbone_features: true`, `"encoder"` (or null) is the default path; SimpleTuner's spellings
  `internal` / `external` / `selfflow` are accepted. A false `crepa_use_backbone_features` means "not
  set", as SimpleTuner reads it, so it never contradicts `crepa_feature_source` (a true one does, with
  any source but backbone).
- iREPA's keys (`irepa_enabled`, `irepa_spatial_norm_alpha`, `irepa_projector_kernel_size`) belong to
  both configs: iREPA rides on whichever regularizer is on (CREPA/REPA for transformers, U-REPA for
  UNets), and `add_argparse_args` registers them once. `irepa_enabled` with neither regularizer on in the
  same config is an error naming both switches.
- Keys of features this package does not implement (`crepa_self_flow*`, `crepa_feature_source:
  "self_flow"`) are accepted while they leave the feature off, with one warning per config,
  and raise `UnsupportedFeatureError` naming the feature when they turn it on for an enabled regularizer.
- Any other unknown `crepa_*`/`urepa_*` key raises `ValueError` naming the closest valid key.
- Value types: SimpleTuner feeds its JSON configs through argparse, so strings are valid values there;
  each key's value rule (value_rules.py: Bool, Int, Float, Choice, Text) coerces them strictly and
  raises `TypeError` for a wrong type, `ValueError` for an out-of-range value, naming the key, the value
  and the valid range; numpy scalars count as the Python type they hold. "none"/"null" is valid for keys
  whose default is None. JSON `null` for a key that cannot be None means "not set" (the documented
  default), as in SimpleTuner. A value of 0 is respected, except for `*_similarity_threshold`, which
  must lie in (0, bound] (`check_similarity_threshold`: a threshold <= 0 fires at the first call, and
  is most often the logged loss, −λ·score, copied with its sign).
- Cross-key rules that need only the config are checked here for an enabled regularizer: backbone mode
  needs `crepa_teacher_block_index`, different from `crepa_block_index`. Those that need the model
  (both blocks exist) belong to the regularizer; the `max_train_steps` rule belongs to the schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..options import CrepaOptions
from .value_rules import Bool, Choice, Float, Int, Rule, Text, describe_value

__all__ = [
    "ConfigWarning",
    "CrepaConfig",
    "UnsupportedFeatureError",
    "UrepaConfig",
    "add_argparse_args",
    "alignment_score_bound",
]

SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")
ENCODER_DTYPES = ("float32", "bfloat16", "float16")
ENCODER_TOKENS = ("patch", "cls")
FEATURE_SOURCES = ("encoder", "backbone", "self_flow")
# SimpleTuner's other spellings of the feature sources (helpers/training/crepa.py, CrepaFeatureSource).
FEATURE_SOURCE_ALIASES = {"external": "encoder", "internal": "backbone", "selfflow": "self_flow"}
DINOV2_PATCH_SIZE = 14  # the smallest encoder input side: one patch


class UnsupportedFeatureError(ValueError):
    """A config turns on a feature of another trainer that repa_kernels does not implement."""


class ConfigWarning(UserWarning):
    """A config key was accepted but has no effect, or one alias overrode another."""


def _key(default: Any, rule: Rule, help: str) -> Any:
    return field(default=default, metadata={"rule": rule, "help": help})


_ENCODER_HELP = ("frozen vision teacher: a short name (dinov2_vitg14, dinov3_vitl16, siglip2_so400m_patch16_naflex, "
                 "qwen2.5-vl-7b, qwen3-vl-4b, ...; docs/teachers.md), a Hugging Face hub id, or a local directory")
_MAX_TRAIN_STEPS_HELP = ("total optimizer steps of the run (a whole trainer config's max_train_steps); "
                         "needed when a decaying schedule has decay_steps 0")


def _schedule_keys_help(prefix: str) -> dict[str, str]:
    return {
        "scheduler": f"decay of {prefix}_lambda after warmup: constant / linear / cosine / polynomial",
        "warmup_steps": f"steps of linear ramp from 0 to {prefix}_lambda (all scheduler types)",
        "decay_steps": "length of the decay after warmup; 0 = decay until max_train_steps",
        "lambda_end": "weight at the end of the decay",
        "power": "power of the polynomial decay",
        "cutoff_step": "weight 0 from this step on; 0 = no step cutoff",
        "similarity_threshold": "EMA of the alignment score at which the weight drops to 0; None = off",
        "similarity_ema_decay": "EMA decay of the alignment score, in [0, 1); first value taken as is",
        "threshold_mode": "permanent (stays off once reached) or recoverable (back on below the threshold)",
    }


# The schedule keys of both prefixes (docs/contract.md §4), once: `<prefix>_<suffix>` -> (default, rule). The config
# classes declare their fields from it and CoefficientSchedule checks its arguments with the same rules.
SCHEDULE_KEYS: dict[str, tuple[Any, Rule]] = {
    "scheduler": ("constant", Choice(SCHEDULERS)),
    "warmup_steps": (0, Int(0)),
    "decay_steps": (0, Int(0)),
    "lambda_end": (0.0, Float(0.0)),
    "power": (1.0, Float(0.0, minimum_inclusive=False)),
    "cutoff_step": (0, Int(0)),
    "similarity_threshold": (None, Float(nullable=True)),
    "similarity_ema_decay": (0.99, Float(0.0, maximum=1.0, maximum_inclusive=False)),
    "threshold_mode": ("permanent", Choice(THRESHOLD_MODES)),
}


def _schedule_key(prefix: str, suffix: str) -> Any:
    default, rule = SCHEDULE_KEYS[suffix]
    return _key(default, rule, _schedule_keys_help(prefix)[suffix])


# ---------------------------------------------------------------------------------------------------
# Keys of features this package does not implement. Each feature: which keys belong to it, and which
# (key, value) turns it on. A feature only counts as on when its host regularizer is enabled.


@dataclass(frozen=True)
class _UnsupportedFeature:
    name: str
    key_prefixes: tuple[str, ...]
    remedy: str

    def owns(self, key: str) -> bool:
        return any(key == prefix or key.startswith(prefix + "_") for prefix in self.key_prefixes)


_SELF_FLOW = _UnsupportedFeature(
    name="Self-Flow (SimpleTuner's EMA-teacher internal alignment)",
    key_prefixes=("crepa_self_flow",),
    remedy="set crepa_self_flow to false and crepa_feature_source to 'encoder' or 'backbone'",
)

def feature_source(value: Any) -> str:
    """`crepa_feature_source` as one of FEATURE_SOURCES (SimpleTuner's aliases included)."""
    if isinstance(value, str) and value.strip().lower() in FEATURE_SOURCE_ALIASES:
        return FEATURE_SOURCE_ALIASES[value.strip().lower()]
    return Choice(FEATURE_SOURCES).coerce("crepa_feature_source", value)


def _self_flow_trigger(raw: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """(the key=value that turns Self-Flow on or None, the keys that select it besides its own)."""
    source = raw.get("crepa_feature_source")
    selects = source is not None and feature_source(source) == "self_flow"
    if "crepa_self_flow" in raw and Bool().coerce("crepa_self_flow", raw["crepa_self_flow"]):
        return "crepa_self_flow=true", ["crepa_feature_source"] if selects else []
    if selects:
        return "crepa_feature_source='self_flow'", ["crepa_feature_source"]
    return None, []


# ---------------------------------------------------------------------------------------------------
# Shared parsing machinery.


class JsonObject(dict):
    """A JSON object as read by `from_json`, with its (key, value) pairs in file order: `json.load` keeps
    only the last value of a key given twice, so the pairs let such a file get the same error as a dict
    that spells one key twice (`--crepa_lambda` and `crepa_lambda`)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = list(pairs)


KEY_PREFIXES = ("crepa_", "urepa_", "irepa_")
IREPA_PREFIX = "irepa_"   # shared by both configs: iREPA rides on the regularizer that is on


def _irepa_key(name: str) -> Any:
    """iREPA's keys with SimpleTuner's names and defaults; each config declares them (the same fields)."""
    return {
        "irepa_enabled": _key(False, Bool(), "iREPA: a k x k convolutional projector over the student's token grid "
                                             "and a spatially normalised teacher (rides on crepa/urepa_enabled)"),
        "irepa_spatial_norm_alpha": _key(0.6, Float(0.0, maximum=1.0), "iREPA: teacher y' = (y - alpha * mean) / (std + 1e-6) "
                                                               "over each frame's patch tokens; 1.0 removes the mean"),
        "irepa_projector_kernel_size": _key(3, Int(1), "iREPA: kernel size k (odd) of the convolutional projector"),
    }[name]


def _check_irepa_host(raw: Mapping[str, Any]) -> None:
    """irepa_enabled needs a regularizer to ride on, in the same config."""
    if not ("irepa_enabled" in raw and Bool().coerce("irepa_enabled", raw["irepa_enabled"])):
        return
    hosts = [key for key in ("crepa_enabled", "urepa_enabled")
             if key in raw and Bool().coerce(key, raw[key])]
    if not hosts:
        raise ValueError("irepa_enabled=true rides on a regularizer, but neither crepa_enabled nor urepa_enabled is "
                         "true: turn on crepa_enabled (transformers: REPA/CREPA) or urepa_enabled (UNets: U-REPA)")


def check_irepa_kernel_size(value: int) -> None:
    if value % 2 == 0:
        raise ValueError(f"irepa_projector_kernel_size must be odd (the convolution keeps the token grid with "
                         f"padding k // 2), got {value}; valid: 1, 3, 5, ...")


def canonical_key(key: str) -> str:
    """How a key was meant: lower case, `-` as `_`, without surrounding whitespace or leading dashes."""
    return key.strip().lstrip("-").strip().lower().replace("-", "_")


def _as_written(key: str) -> str:
    """The key with SimpleTuner's optional leading `--` removed (the only accepted variation)."""
    return key[2:] if key.startswith("--") else key


def _normalize_keys(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    """Strip SimpleTuner's optional leading `--`; the same key given twice must agree; a key meant as one of
    the regularizers' keys but spelled otherwise (capitals, `-`, whitespace, one dash) is an error naming
    the key it means, never silently left out."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a config must be a mapping of key -> value, got {type(data).__name__}")
    normalized: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw_key, value in (data.pairs if isinstance(data, JsonObject) else data.items()):
        if not isinstance(raw_key, str):
            raise TypeError(f"config keys must be strings, got {describe_value(raw_key)}")
        key = _as_written(raw_key)
        meant = canonical_key(raw_key)
        if key != meant and (meant.startswith(KEY_PREFIXES) or meant == "max_train_steps"):
            _raise_misspelled(cls, raw_key, meant)
        if key in normalized and normalized[key] != value:
            raise ValueError(
                f"config key {key!r} is given twice with different values: {spelled[key]!r}={normalized[key]!r} "
                f"and {raw_key!r}={value!r}")
        normalized[key] = value
        spelled[key] = raw_key
    return normalized


def _raise_misspelled(cls, raw_key: str, meant: str) -> None:
    """The unknown-key error for a key whose lower-case, underscored form is (or is close to) a valid key."""
    known = sorted(_ALL_KEYS | {"crepa_model", "crepa_feature_source"})
    if meant in known or _SELF_FLOW.owns(meant):
        suggestion = meant
    else:
        same_prefix = [name for name in known if name.startswith(meant.split("_", 1)[0] + "_")]
        suggestion = _closest(meant, same_prefix or known)
    valid = sorted(name for name in _rules(cls) if name.startswith(cls.PREFIX + "_")) + sorted(cls._ALIASES)
    raise ValueError(
        f"unknown {cls.__name__} key {raw_key!r}; did you mean {suggestion!r}? Keys are lower case with "
        "underscores, without spaces or a single leading dash (SimpleTuner's leading '--' is accepted). "
        f"Valid keys: {', '.join(valid)}")


def _closest(key: str, candidates: list[str]) -> str:
    return difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)[0]


def _rules(cls) -> dict[str, Rule]:
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(cls)}


def _validate_fields(config) -> None:
    """Coerce and check every field of a config dataclass in place."""
    for f in dataclasses.fields(config):
        rule: Rule = f.metadata["rule"]
        object.__setattr__(config, f.name, rule.coerce(f.name, getattr(config, f.name)))


def _parse(cls, data: Mapping[str, Any]):
    """Shared body of CrepaConfig.from_dict / UrepaConfig.from_dict (see the module docstring)."""
    raw = _normalize_keys(cls, data)
    prefix = cls.PREFIX + "_"
    rules = _rules(cls)
    own_keys = {key: value for key, value in raw.items() if key.startswith((prefix, IREPA_PREFIX))}
    enabled_value = own_keys.get(f"{cls.PREFIX}_enabled")
    enabled = False if enabled_value is None else Bool().coerce(f"{cls.PREFIX}_enabled", enabled_value)

    # Unimplemented features first: their keys are not unknown keys.
    ignored: list[str] = []
    for feature, trigger_of in cls._UNSUPPORTED:
        trigger, selecting_keys = trigger_of(raw)
        feature_keys = sorted(key for key in raw if feature.owns(key)) + selecting_keys
        if not feature_keys:
            continue
        if trigger is not None and enabled:
            raise UnsupportedFeatureError(
                f"{trigger} turns on {feature.name}, which repa_kernels does not implement; "
                f"{feature.remedy} to use {cls.PREFIX}_enabled without it")
        ignored.extend(feature_keys)

    values: dict[str, Any] = {}
    for key, value in own_keys.items():
        if key in rules:
            values[key] = value
        elif key in cls._ALIASES or any(feature.owns(key) for feature, _ in cls._UNSUPPORTED):
            continue
        else:
            valid = sorted(name for name in rules if name.startswith(prefix)) + sorted(cls._ALIASES)
            suggestion = _closest(key, valid)
            other = ("urepa_" if cls.PREFIX == "crepa" else "crepa_") + key[len(prefix):]
            hint = f" ({other!r} is a key of the other regularizer)" if other in _ALL_KEYS else ""
            raise ValueError(
                f"unknown {cls.__name__} key {key!r}; did you mean {suggestion!r}?{hint} "
                f"Valid keys: {', '.join(valid)}")
    if "max_train_steps" in raw:
        values["max_train_steps"] = raw["max_train_steps"]

    _check_irepa_host(raw)
    values = cls._resolve_aliases(raw, values)
    # JSON null for a key that cannot be None means "not set", as in SimpleTuner.
    values = {key: value for key, value in values.items() if value is not None or rules[key].nullable}

    if ignored:
        why = "they leave those features off" if enabled else f"{cls.PREFIX}_enabled is false"
        warnings.warn(
            f"{cls.__name__}: ignoring keys of features repa_kernels does not implement ({why}): "
            + ", ".join(ignored), ConfigWarning, stacklevel=3)
    return cls(**values)


def _from_json(cls, path: str | os.PathLike):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle, object_pairs_hook=JsonObject)
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{os.fspath(path)} must hold a JSON object of config keys, got a {type(data).__name__}")
    return cls.from_dict(data)


def _from_args(cls, namespace: argparse.Namespace):
    if not isinstance(namespace, argparse.Namespace):
        raise TypeError(f"from_args expects an argparse.Namespace, got {type(namespace).__name__}")
    prefix = cls.PREFIX + "_"
    data = {key: value for key, value in vars(namespace).items()
            if key.startswith((prefix, IREPA_PREFIX)) or key == "max_train_steps"}
    other = "urepa_enabled" if cls.PREFIX == "crepa" else "crepa_enabled"
    if data.get("irepa_enabled") and not data.get(f"{cls.PREFIX}_enabled") and getattr(namespace, other, False):
        data.pop("irepa_enabled")   # argparse holds both regularizers' keys: iREPA rides on the other one
    return cls.from_dict(data)


def alignment_score_bound(distance: int, tau: float, cumulative: bool, normalize_neighbour_sum: bool) -> float:
    """Largest |alignment_score| (docs/contract.md §2.1) any clip length can give: every cosine 1, every frame with
    two neighbours per offset. Adjacent mode counts offset 1 because the distance is clamped to T - 1."""
    if normalize_neighbour_sum or distance == 0:
        return 1.0
    if cumulative:
        return 1.0 + 2.0 * sum(math.exp(-k / tau) for k in range(1, distance + 1))
    return 1.0 + 2.0 * math.exp(-1.0 / tau)


_LOSS_LOGS = {
    "crepa": "crepa_loss is −λ·score",
    "urepa": "urepa_alignment_loss is −score (urepa_loss = λ·(−score + urepa_manifold_weight·manifold))",
}


def check_similarity_threshold(key: str, threshold: float | None, bound: float | None = None, why: str = "") -> None:
    """A similarity threshold must lie in (0, bound]: the score's EMA starts near 0 and rises as the student
    aligns, so a threshold <= 0 fires at the first call (a permanent cutoff: for the whole run), and one
    above the largest score (`alignment_score_bound`) never fires. `bound` None (a schedule built without
    the loss options) checks the lower end only. A negative threshold is most often the logged loss
    copied as it is (the loss is −λ·score), so the message says so."""
    if threshold is None:
        return
    valid = (f"(0, {bound:.6g}]" if bound is not None
             else "(0, 1] ((0, 1 + Σw] for CREPA without crepa_normalize_neighbour_sum)")
    if threshold <= 0:
        prefix = key.split("_", 1)[0]
        loss_log = _LOSS_LOGS.get(prefix, f"{prefix}_loss is −λ·score")
        flipped = (f": did you mean {-threshold:g}?" if threshold < 0 and (bound is None or -threshold <= bound)
                   else "")
        raise ValueError(
            f"{key}={threshold:g} is outside {valid}: the threshold is compared with the EMA of the alignment "
            f"score, which rises as the student aligns, so a value <= 0 is reached at the first call and turns "
            f"the regularizer off for the rest of the run. The logged {loss_log}, so a threshold read off the "
            f"loss log has the wrong sign{flipped}")
    if bound is not None and threshold > bound:
        raise ValueError(
            f"{key}={threshold:g} can never be reached: the alignment score lies in [{-bound:.6g}, {bound:.6g}] "
            f"{why}; valid thresholds are in {valid}")


# ---------------------------------------------------------------------------------------------------


class _ConfigSources:
    """The ways to build a config, shared by CrepaConfig and UrepaConfig (each names its PREFIX)."""

    PREFIX: ClassVar[str]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """From a mapping; a whole trainer config is fine (keys without this config's prefix are ignored,
        `max_train_steps` is read)."""
        return _parse(cls, data)

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        """From a JSON file holding an object (a whole trainer config is fine)."""
        return _from_json(cls, path)

    @classmethod
    def from_args(cls, namespace: argparse.Namespace):
        """From a namespace parsed with `add_argparse_args` (reads `max_train_steps` when present)."""
        return _from_args(cls, namespace)

    @classmethod
    def keys(cls) -> list[str]:
        """The documented keys, in documentation order (max_train_steps last)."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CrepaConfig(_ConfigSources):
    """Every documented `crepa_*` key (docs/contract.md §5) with its documented default, plus `max_train_steps`."""

    PREFIX: ClassVar[str] = "crepa"

    crepa_enabled: bool = _key(False, Bool(), "turn the regularizer on (REPA for image DiTs, CREPA for video DiTs)")
    crepa_block_index: int = _key(8, Int(0), "zero-based transformer block whose output is aligned (student)")
    crepa_lambda: float = _key(0.5, Float(0.0), "weight lambda of the alignment loss")
    crepa_adjacent_distance: int = _key(1, Int(0), "neighbour distance d; 0 = per-frame REPA")
    crepa_adjacent_tau: float = _key(1.0, Float(0.0, minimum_inclusive=False),
                                     "tau of the exp(-|k|/tau) neighbour weight")
    crepa_cumulative_neighbors: bool = _key(False, Bool(), "all offsets 1..d instead of only +-d")
    crepa_normalize_neighbour_sum: bool = _key(False, Bool(),
                                               "divide each frame's total by 1 + sum of weights (score in [-1, 1])")
    crepa_normalize_by_frames: bool = _key(True, Bool(), "divide by T so clip length does not change the loss scale")
    crepa_spatial_align: bool = _key(True, Bool(), "keep patch structure; false = mean-pool tokens (less memory)")
    crepa_encoder: str = _key("dinov2_vitg14", Text(), _ENCODER_HELP + " (alias: crepa_model)")
    crepa_encoder_dtype: str = _key("float32", Choice(ENCODER_DTYPES), "dtype of the frozen encoder")
    crepa_encoder_image_size: int = _key(518, Int(DINOV2_PATCH_SIZE),
                                         "encoder input size S: each frame is fed at about S x S pixels of area")
    crepa_encoder_tokens: str = _key("patch", Choice(ENCODER_TOKENS), "teacher tokens: patch or cls")
    crepa_encoder_frames_batch_size: int = _key(-1, Int(), "frames per encoder call; <= 0 = all at once")
    crepa_drop_vae_encoder: bool = _key(
        False, Bool(), "delete the VAE encoder after load (decode only; unsafe if pixels must be encoded)")
    crepa_use_tae: bool = _key(False, Bool(), "decode with a tiny autoencoder instead of the full VAE")
    crepa_use_backbone_features: bool = _key(
        False, Bool(), "teacher = a deeper block of the same forward pass (detached), no encoder, no decode "
        "(alias: crepa_feature_source backbone)")
    crepa_teacher_block_index: int | None = _key(
        None, Int(0, nullable=True), "teacher block in backbone mode (required there, != crepa_block_index)")
    crepa_scheduler: str = _schedule_key("crepa", "scheduler")
    crepa_warmup_steps: int = _schedule_key("crepa", "warmup_steps")
    crepa_decay_steps: int = _schedule_key("crepa", "decay_steps")
    crepa_lambda_end: float = _schedule_key("crepa", "lambda_end")
    crepa_power: float = _schedule_key("crepa", "power")
    crepa_cutoff_step: int = _schedule_key("crepa", "cutoff_step")
    crepa_similarity_threshold: float | None = _schedule_key("crepa", "similarity_threshold")
    crepa_similarity_ema_decay: float = _schedule_key("crepa", "similarity_ema_decay")
    crepa_threshold_mode: str = _schedule_key("crepa", "threshold_mode")
    irepa_enabled: bool = _irepa_key("irepa_enabled")
    irepa_spatial_norm_alpha: float = _irepa_key("irepa_spatial_norm_alpha")
    irepa_projector_kernel_size: int = _irepa_key("irepa_projector_kernel_size")
    max_train_steps: int | None = _key(None, Int(0, nullable=True), _MAX_TRAIN_STEPS_HELP)

    _ALIASES: ClassVar[tuple[str, ...]] = ("crepa_model", "crepa_feature_source")
    _UNSUPPORTED: ClassVar[tuple] = ((_SELF_FLOW, _self_flow_trigger),)

    def __post_init__(self) -> None:
        _validate_fields(self)
        bound = alignment_score_bound(self.crepa_adjacent_distance, self.crepa_adjacent_tau,
                                      self.crepa_cumulative_neighbors, self.crepa_normalize_neighbour_sum)
        check_similarity_threshold("crepa_similarity_threshold", self.crepa_similarity_threshold, bound,
                                   f"with crepa_adjacent_distance={self.crepa_adjacent_distance}, "
                                   f"crepa_adjacent_tau={self.crepa_adjacent_tau}, "
                                   f"crepa_cumulative_neighbors={self.crepa_cumulative_neighbors}, "
                                   f"crepa_normalize_neighbour_sum={self.crepa_normalize_neighbour_sum}")
        check_irepa_kernel_size(self.irepa_projector_kernel_size)
        if self.crepa_enabled and self.irepa_enabled:
            if self.crepa_encoder_tokens == "cls" or not self.crepa_spatial_align:
                which = ("crepa_encoder_tokens='cls'" if self.crepa_encoder_tokens == "cls"
                         else "crepa_spatial_align=false")
                raise ValueError(f"irepa_enabled=true with {which}: iREPA normalises the teacher over each frame's "
                                 "patch tokens and convolves the student's token grid, and one token per frame has "
                                 "no spatial spread (its std is undefined); use crepa_encoder_tokens='patch' and "
                                 "crepa_spatial_align=true, or irepa_enabled=false")
        if self.crepa_enabled and self.crepa_use_backbone_features:
            if self.crepa_teacher_block_index is None:
                raise ValueError(
                    "crepa_use_backbone_features=true (backbone mode) needs crepa_teacher_block_index: the index of "
                    f"a deeper block whose detached output is the teacher (the student is crepa_block_index="
                    f"{self.crepa_block_index}), got None")
            if self.crepa_teacher_block_index == self.crepa_block_index:
                raise ValueError(
                    f"crepa_teacher_block_index={self.crepa_teacher_block_index} equals crepa_block_index: in "
                    "backbone mode the teacher must be a different (deeper) block than the student")

    def crepa_options(self) -> CrepaOptions:
        """The loss hyper-parameters of docs/contract.md §2.1 held by this config."""
        return CrepaOptions(distance=self.crepa_adjacent_distance, tau=self.crepa_adjacent_tau,
                            cumulative=self.crepa_cumulative_neighbors,
                            normalize_by_frames=self.crepa_normalize_by_frames,
                            normalize_neighbour_sum=self.crepa_normalize_neighbour_sum)

    @staticmethod
    def _resolve_aliases(raw: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        if raw.get("crepa_model") is not None:
            model = raw["crepa_model"]
            encoder = values.get("crepa_encoder")
            if encoder is not None and encoder != model:
                warnings.warn(
                    f"CrepaConfig: crepa_model={model!r} and crepa_encoder={encoder!r} are aliases; using "
                    "crepa_model, as SimpleTuner does", ConfigWarning, stacklevel=4)
            values["crepa_encoder"] = model
        source = raw.get("crepa_feature_source")
        if source is not None:
            source = feature_source(source)
            backbone = values.get("crepa_use_backbone_features")
            backbone = None if backbone is None else Bool().coerce("crepa_use_backbone_features", backbone)
            # The legacy flag only ever turns backbone mode on: false means "not set", as SimpleTuner reads
            # it (its documented example config spells crepa_use_backbone_features = false whatever the source).
            if source == "backbone":
                values["crepa_use_backbone_features"] = True
            elif backbone:
                raise ValueError(f"crepa_feature_source={source!r} contradicts crepa_use_backbone_features=true "
                                 "(backbone mode); set crepa_feature_source to 'backbone' or remove the flag")
        return values


@dataclass
class UrepaConfig(_ConfigSources):
    """Every documented `urepa_*` key (docs/contract.md §5) with its documented default, plus `max_train_steps`."""

    PREFIX: ClassVar[str] = "urepa"

    urepa_enabled: bool = _key(False, Bool(), "turn U-REPA on (UNet mid-block alignment plus manifold loss)")
    urepa_lambda: float = _key(0.5, Float(0.0), "weight lambda of the U-REPA loss")
    urepa_manifold_weight: float = _key(3.0, Float(0.0), "weight of the manifold term relative to the alignment term")
    urepa_model: str = _key("dinov2_vitg14", Text(), _ENCODER_HELP)
    urepa_encoder_image_size: int = _key(518, Int(DINOV2_PATCH_SIZE),
                                         "encoder input size S: each image is fed at about S x S pixels of area")
    urepa_use_tae: bool = _key(False, Bool(), "decode with a tiny autoencoder instead of the full VAE")
    urepa_scheduler: str = _schedule_key("urepa", "scheduler")
    urepa_warmup_steps: int = _schedule_key("urepa", "warmup_steps")
    urepa_decay_steps: int = _schedule_key("urepa", "decay_steps")
    urepa_lambda_end: float = _schedule_key("urepa", "lambda_end")
    urepa_power: float = _schedule_key("urepa", "power")
    urepa_cutoff_step: int = _schedule_key("urepa", "cutoff_step")
    urepa_similarity_threshold: float | None = _schedule_key("urepa", "similarity_threshold")
    urepa_similarity_ema_decay: float = _schedule_key("urepa", "similarity_ema_decay")
    urepa_threshold_mode: str = _schedule_key("urepa", "threshold_mode")
    irepa_enabled: bool = _irepa_key("irepa_enabled")
    irepa_spatial_norm_alpha: float = _irepa_key("irepa_spatial_norm_alpha")
    irepa_projector_kernel_size: int = _irepa_key("irepa_projector_kernel_size")
    max_train_steps: int | None = _key(None, Int(0, nullable=True), _MAX_TRAIN_STEPS_HELP)

    _ALIASES: ClassVar[tuple[str, ...]] = ()
    _UNSUPPORTED: ClassVar[tuple] = ()

    def __post_init__(self) -> None:
        _validate_fields(self)
        check_similarity_threshold("urepa_similarity_threshold", self.urepa_similarity_threshold, 1.0,
                                   "(the U-REPA score is a mean cosine)")
        check_irepa_kernel_size(self.irepa_projector_kernel_size)

    @staticmethod
    def _resolve_aliases(raw: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        return values


_ALL_KEYS = frozenset(CrepaConfig.keys()) | frozenset(UrepaConfig.keys())


# ---------------------------------------------------------------------------------------------------


def _add_group(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name == "max_train_steps":  # the trainer's own option; from_args reads it when present
            continue
        if f.name.startswith(IREPA_PREFIX) and f"--{f.name}" in parser._option_string_actions:
            continue                     # shared by both configs: registered by the first group
        rule: Rule = f.metadata["rule"]
        help_text = f"{f.metadata['help']} (default: {f.default})"
        names = [f"--{f.name}"]
        if f.name == "crepa_encoder":
            names.append("--crepa_model")
        if isinstance(rule, Bool):
            # `--crepa_enabled` alone means true; `--crepa_enabled false` / `=false` also work.
            group.add_argument(*names, dest=f.name, nargs="?", const=True, default=f.default,
                               type=rule.argparse_type(f.name), metavar="BOOL", help=help_text)
        elif isinstance(rule, Choice):
            group.add_argument(*names, dest=f.name, default=f.default, choices=rule.choices,
                               type=rule.argparse_type(f.name), help=help_text)
        else:
            group.add_argument(*names, dest=f.name, default=f.default, type=rule.argparse_type(f.name),
                               help=help_text)
    if cls is CrepaConfig:
        group.add_argument("--crepa_feature_source", default=None, choices=FEATURE_SOURCES,
                           type=_argparse_feature_source,
                           help="teacher source: encoder (default) or backbone (= --crepa_use_backbone_features); "
                                "self_flow is not implemented")


def _argparse_feature_source(text: str) -> str:
    """SimpleTuner's aliases (internal, external, selfflow) map to a choice; anything else is left to
    argparse's choices check, which lists the valid ones."""
    return FEATURE_SOURCE_ALIASES.get(text.strip().lower(), text.strip().lower())


def add_argparse_args(parser: argparse.ArgumentParser, *, crepa: bool = True, urepa: bool = True):
    """Add every documented key as `--key` with its default and help text; returns `parser`.

    Booleans work as flags (`--crepa_enabled`) and take an explicit value (`--crepa_enabled false`).
    `max_train_steps` is not added (trainers have their own `--max_train_steps`; `from_args` reads it).
    """
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError(f"parser must be an argparse.ArgumentParser, got {type(parser).__name__}")
    if crepa:
        _add_group(parser, CrepaConfig, "CREPA / REPA regularizer (repa_kernels)")
    if urepa:
        _add_group(parser, UrepaConfig, "U-REPA regularizer (repa_kernels)")
    return parser
