"""Config keys of docs/contract.md §5: defaults, sources (dict, JSON, argparse), aliases, coercion, every error."""

import argparse
import contextlib
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from repa_kernels.options import CrepaOptions
from repa_kernels.regularizer.config import (ConfigWarning, CrepaConfig, UnsupportedFeatureError, UrepaConfig,
                                             add_argparse_args)
from repa_kernels.regularizer.schedule import CoefficientSchedule

DATA = Path(__file__).parent / "data"

# docs/contract.md §5, transcribed by hand (not read from the code under test).
CONTRACT_CREPA_DEFAULTS = {
    "crepa_enabled": False, "crepa_block_index": 8, "crepa_lambda": 0.5, "crepa_adjacent_distance": 1,
    "crepa_adjacent_tau": 1.0, "crepa_cumulative_neighbors": False, "crepa_normalize_neighbour_sum": False,
    "crepa_normalize_by_frames": True, "crepa_spatial_align": True, "crepa_encoder": "dinov2_vitg14",
    "crepa_encoder_dtype": "float32", "crepa_encoder_image_size": 518, "crepa_encoder_tokens": "patch",
    "crepa_encoder_frames_batch_size": -1, "crepa_drop_vae_encoder": False, "crepa_use_tae": False,
    "crepa_use_backbone_features": False, "crepa_teacher_block_index": None, "crepa_scheduler": "constant",
    "crepa_warmup_steps": 0, "crepa_decay_steps": 0, "crepa_lambda_end": 0.0, "crepa_power": 1.0,
    "crepa_cutoff_step": 0, "crepa_similarity_threshold": None, "crepa_similarity_ema_decay": 0.99,
    "crepa_threshold_mode": "permanent",
    "irepa_enabled": False, "irepa_spatial_norm_alpha": 0.6, "irepa_projector_kernel_size": 3, "max_train_steps": None,
}
CONTRACT_UREPA_DEFAULTS = {
    "urepa_enabled": False, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0, "urepa_model": "dinov2_vitg14",
    "urepa_encoder_image_size": 518, "urepa_use_tae": False, "urepa_scheduler": "constant",
    "urepa_warmup_steps": 0, "urepa_decay_steps": 0, "urepa_lambda_end": 0.0, "urepa_power": 1.0,
    "urepa_cutoff_step": 0, "urepa_similarity_threshold": None, "urepa_similarity_ema_decay": 0.99,
    "urepa_threshold_mode": "permanent",
    "irepa_enabled": False, "irepa_spatial_norm_alpha": 0.6, "irepa_projector_kernel_size": 3, "max_train_steps": None,
}
T2V_PRESET = {"crepa_scheduler": "cosine", "crepa_lambda": 0.5, "crepa_warmup_steps": 100, "crepa_decay_steps": 0,
              "crepa_lambda_end": 0.1, "crepa_similarity_threshold": 0.85, "crepa_threshold_mode": "permanent"}


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------------------------- defaults


def test_crepa_defaults_are_the_documented_ones():
    assert CrepaConfig().to_dict() == CONTRACT_CREPA_DEFAULTS
    assert CrepaConfig.keys() == list(CONTRACT_CREPA_DEFAULTS)
    assert CrepaConfig.from_dict({}).to_dict() == CONTRACT_CREPA_DEFAULTS


def test_urepa_defaults_are_the_documented_ones():
    assert UrepaConfig().to_dict() == CONTRACT_UREPA_DEFAULTS
    assert UrepaConfig.keys() == list(CONTRACT_UREPA_DEFAULTS)


def test_to_dict_from_dict_round_trip():
    cfg = CrepaConfig.from_dict({**T2V_PRESET, "crepa_enabled": True, "crepa_block_index": 3, "max_train_steps": 77})
    assert CrepaConfig.from_dict(cfg.to_dict()) == cfg
    ucfg = UrepaConfig.from_dict({"urepa_enabled": True, "urepa_manifold_weight": 0.0})
    assert UrepaConfig.from_dict(ucfg.to_dict()) == ucfg


def test_crepa_options_carry_the_loss_keys():
    cfg = CrepaConfig.from_dict({"crepa_adjacent_distance": 3, "crepa_adjacent_tau": 2.0,
                                 "crepa_cumulative_neighbors": True, "crepa_normalize_by_frames": False,
                                 "crepa_normalize_neighbour_sum": True})
    assert cfg.crepa_options() == CrepaOptions(distance=3, tau=2.0, cumulative=True, normalize_by_frames=False,
                                               normalize_neighbour_sum=True)


# ------------------------------------------------------------------------------------- presets, zeros


def test_t2v_preset_is_accepted_as_written():
    with no_warnings():
        cfg = CrepaConfig.from_dict({"crepa_enabled": True, **T2V_PRESET})
    for key, value in T2V_PRESET.items():
        assert getattr(cfg, key) == value
    assert cfg.max_train_steps is None  # the max_train_steps rule is the schedule's (docs/contract.md §4)


@pytest.mark.parametrize("preset", [
    {"crepa_scheduler": "constant", "crepa_lambda": 0.5},                                   # i2v
    {"crepa_cutoff_step": 2000},                                                            # solid backgrounds
    {"crepa_enabled": True, "crepa_lambda": 0.5, "crepa_scheduler": "cosine", "crepa_warmup_steps": 100,
     "crepa_decay_steps": 5000, "crepa_lambda_end": 0.0},                                   # basic scheduling
    {"crepa_similarity_threshold": 0.9, "crepa_similarity_ema_decay": 0.99, "crepa_threshold_mode": "permanent"},
    {"crepa_enabled": True, "crepa_block_index": 8, "crepa_lambda": 0.5, "crepa_adjacent_distance": 1,
     "crepa_adjacent_tau": 1.0, "crepa_encoder": "dinov2_vitg14", "crepa_encoder_image_size": 518},
])
def test_user_doc_presets_are_accepted(preset):
    with no_warnings():
        cfg = CrepaConfig.from_dict(preset)
    for key, value in preset.items():
        assert getattr(cfg, key) == value


def test_urepa_doc_preset_is_accepted():
    preset = {"urepa_enabled": True, "urepa_lambda": 0.5, "urepa_manifold_weight": 3.0,
              "urepa_model": "dinov2_vitg14", "urepa_encoder_image_size": 518, "urepa_use_tae": False}
    cfg = UrepaConfig.from_dict(preset)
    assert {key: getattr(cfg, key) for key in preset} == preset


@pytest.mark.parametrize("key", ["crepa_lambda", "crepa_block_index", "crepa_adjacent_distance",
                                 "crepa_warmup_steps", "crepa_decay_steps", "crepa_cutoff_step",
                                 "crepa_lambda_end", "crepa_encoder_frames_batch_size",
                                 "crepa_similarity_ema_decay", "max_train_steps"])
def test_zero_given_by_the_user_is_respected(key):
    cfg = CrepaConfig.from_dict({key: 0})
    assert getattr(cfg, key) == 0 and getattr(cfg, key) is not None
    assert getattr(CrepaConfig.from_dict({key: "0"}), key) == 0


def test_zero_teacher_block_is_respected():
    cfg = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_use_backbone_features": True,
                                 "crepa_block_index": 4, "crepa_teacher_block_index": 0})
    assert cfg.crepa_teacher_block_index == 0


# ------------------------------------------------------------------------------------------ coercion


def test_strings_are_coerced_like_simpletuner_argparse():
    cfg = CrepaConfig.from_dict({
        "crepa_enabled": "true", "crepa_spatial_align": "False", "crepa_use_tae": "no", "crepa_drop_vae_encoder": "1",
        "crepa_lambda": "0.25", "crepa_block_index": "12", "crepa_adjacent_tau": "2e-1",
        "crepa_similarity_threshold": "none", "crepa_teacher_block_index": "null", "crepa_scheduler": "Cosine",
        "crepa_decay_steps": "10", "max_train_steps": "1000"})
    assert cfg.crepa_enabled is True and cfg.crepa_spatial_align is False
    assert cfg.crepa_use_tae is False and cfg.crepa_drop_vae_encoder is True
    assert cfg.crepa_lambda == 0.25 and cfg.crepa_block_index == 12 and cfg.crepa_adjacent_tau == 0.2
    assert cfg.crepa_similarity_threshold is None and cfg.crepa_teacher_block_index is None
    assert cfg.crepa_scheduler == "cosine" and cfg.crepa_decay_steps == 10 and cfg.max_train_steps == 1000


def test_integral_floats_are_accepted_for_integer_keys():
    cfg = CrepaConfig.from_dict({"crepa_warmup_steps": 100.0, "max_train_steps": 5e3})
    assert cfg.crepa_warmup_steps == 100 and isinstance(cfg.crepa_warmup_steps, int)
    assert cfg.max_train_steps == 5000 and isinstance(cfg.max_train_steps, int)


def test_ints_become_floats_for_number_keys():
    cfg = CrepaConfig.from_dict({"crepa_lambda": 1, "crepa_similarity_threshold": 1})
    assert cfg.crepa_lambda == 1.0 and isinstance(cfg.crepa_lambda, float)
    assert isinstance(cfg.crepa_similarity_threshold, float)


def test_json_null_means_not_set_for_keys_that_cannot_be_none():
    cfg = CrepaConfig.from_dict({"crepa_block_index": None, "crepa_lambda": None, "crepa_encoder": None,
                                 "crepa_similarity_threshold": None})
    assert cfg.crepa_block_index == 8 and cfg.crepa_lambda == 0.5 and cfg.crepa_encoder == "dinov2_vitg14"
    with pytest.raises(TypeError, match="crepa_lambda must be a finite number >= 0, got None"):
        CrepaConfig(crepa_lambda=None)


@pytest.mark.parametrize("value", [np.True_, np.False_])
def test_numpy_bools_count_as_bools(value):
    cfg = CrepaConfig.from_dict({"crepa_enabled": value, "crepa_cumulative_neighbors": value})
    assert cfg.crepa_enabled is bool(value) and cfg.crepa_cumulative_neighbors is bool(value)
    assert UrepaConfig(urepa_use_tae=value).urepa_use_tae is bool(value)


def test_numpy_numbers_count_as_numbers_and_never_as_bools():
    cfg = CrepaConfig.from_dict({"crepa_block_index": np.int64(3), "crepa_lambda": np.float32(0.25),
                                 "crepa_warmup_steps": np.float64(10.0), "max_train_steps": np.int32(100)})
    assert (cfg.crepa_block_index, cfg.crepa_lambda, cfg.crepa_warmup_steps, cfg.max_train_steps) == (3, 0.25, 10, 100)
    assert type(cfg.crepa_block_index) is int and type(cfg.crepa_lambda) is float
    with pytest.raises(TypeError, match=r"crepa_lambda must be a finite number >= 0, got np.True_ \(numpy.bool"):
        CrepaConfig.from_dict({"crepa_lambda": np.True_})
    with pytest.raises(TypeError, match=r"crepa_block_index must be an integer >= 0, got np.False_ \(numpy.bool"):
        CrepaConfig.from_dict({"crepa_block_index": np.False_})
    with pytest.raises(TypeError, match=r"crepa_enabled must be a bool \(true/false\), got np.int64\(1\)"):
        CrepaConfig.from_dict({"crepa_enabled": np.int64(1)})


def test_a_tensor_value_is_refused_with_how_to_pass_it():
    with pytest.raises(TypeError, match=r"crepa_lambda must be .*torch.Tensor.*tensor.item\(\)"):
        CrepaConfig.from_dict({"crepa_lambda": torch.tensor(0.5)})


def test_simpletuner_double_dash_keys():
    cfg = CrepaConfig.from_dict({"--crepa_enabled": True, "--crepa_lambda": "0.75", "--max_train_steps": 300,
                                 "--learning_rate": "1e-4"})
    assert cfg.crepa_enabled is True and cfg.crepa_lambda == 0.75 and cfg.max_train_steps == 300
    assert CrepaConfig.from_dict({"--crepa_lambda": 0.5, "crepa_lambda": 0.5}).crepa_lambda == 0.5
    with pytest.raises(ValueError, match="crepa_lambda.*given twice"):
        CrepaConfig.from_dict({"--crepa_lambda": 0.5, "crepa_lambda": 0.7})


@pytest.mark.parametrize("key", ["crepa-lambda", "CREPA_LAMBDA", "Crepa_Lambda", " crepa_lambda", "crepa_lambda ",
                                 "-crepa_lambda", "---crepa_lambda", "--CREPA-LAMBDA", "crepa_lambda\t"])
def test_a_misspelled_prefixed_key_is_an_unknown_key_naming_the_canonical_one(key):
    """Were silently left out (λ stayed at its default 0.5), except a trailing space."""
    for cls in (CrepaConfig, UrepaConfig):   # never a valid key anywhere: both refuse it
        with pytest.raises(ValueError, match=f"unknown {cls.__name__} key {re.escape(repr(key))}; "
                                             "did you mean 'crepa_lambda'"):
            cls.from_dict({"crepa_enabled": True, key: 0.05})


@pytest.mark.parametrize("key, canonical", [
    ("URepa-Manifold-Weight", "urepa_manifold_weight"), ("IREPA_ENABLED", "irepa_enabled"),
    ("Crepa-Model", "crepa_model"), ("crepa-feature-source", "crepa_feature_source"),
    ("MAX_TRAIN_STEPS", "max_train_steps"), ("max-train-steps", "max_train_steps"),
    ("Crepa-Lamda", "crepa_lambda"),
])
def test_misspelled_keys_of_every_kind_suggest_the_key_they_mean(key, canonical):
    with pytest.raises(ValueError, match=f"did you mean '{canonical}'"):
        CrepaConfig.from_dict({key: 1})


def test_unprefixed_keys_in_any_spelling_are_still_ignored():
    cfg = CrepaConfig.from_dict({"Learning-Rate": 1e-4, " seed": 3, "-resolution": 512, "crepa_lambda": 0.1})
    assert cfg.crepa_lambda == 0.1


def test_a_json_key_given_twice_is_the_same_error_as_in_a_dict(tmp_path):
    """json.load keeps the last value; the file's pairs are read instead."""
    path = tmp_path / "twice.json"
    path.write_text('{"crepa_enabled": true, "crepa_lambda": 0.5, "learning_rate": 1e-4, "crepa_lambda": 0.05}')
    with pytest.raises(ValueError, match=re.escape(
            "config key 'crepa_lambda' is given twice with different values: 'crepa_lambda'=0.5 and "
            "'crepa_lambda'=0.05")):
        CrepaConfig.from_json(path)
    with pytest.raises(ValueError, match="given twice"):
        UrepaConfig.from_json(path)   # a whole trainer config: any key given twice is ambiguous
    path.write_text('{"crepa_lambda": 0.5, "--crepa_lambda": 0.05}')
    with pytest.raises(ValueError, match="'crepa_lambda'=0.5 and '--crepa_lambda'=0.05"):
        CrepaConfig.from_json(path)
    path.write_text('{"crepa_lambda": 0.25, "crepa_lambda": 0.25, "nested": {"a": 1, "a": 2}}')
    assert CrepaConfig.from_json(path).crepa_lambda == 0.25   # the same value twice agrees


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls, key, suggestion", [
    (CrepaConfig, "crepa_lamda", "crepa_lambda"),
    (CrepaConfig, "crepa_block_idx", "crepa_block_index"),
    (CrepaConfig, "crepa_warmup_step", "crepa_warmup_steps"),
    (CrepaConfig, "crepa_normalize_neighbor_sum", "crepa_normalize_neighbour_sum"),
    (CrepaConfig, "crepa_threshold", "crepa_threshold_mode"),
    (CrepaConfig, "crepa_encoder_dype", "crepa_encoder_dtype"),
    (UrepaConfig, "urepa_manifold_wieght", "urepa_manifold_weight"),
    (UrepaConfig, "urepa_sheduler", "urepa_scheduler"),
])
def test_unknown_key_names_the_closest_valid_key(cls, key, suggestion):
    with pytest.raises(ValueError, match=f"unknown {cls.__name__} key '{key}'; did you mean '{suggestion}'"):
        cls.from_dict({key: 1})


def test_unknown_key_with_the_other_prefix_says_so():
    with pytest.raises(ValueError, match="'urepa_manifold_weight' is a key of the other regularizer"):
        CrepaConfig.from_dict({"crepa_manifold_weight": 3.0})


def test_each_config_ignores_the_other_prefix_and_unprefixed_keys():
    data = {"crepa_lambda": 0.1, "urepa_lambda": 0.2, "learning_rate": 1e-4, "crepa_bogus_x": 1}
    assert UrepaConfig.from_dict(data).urepa_lambda == 0.2  # crepa_* (even unknown ones) are not its keys
    assert CrepaConfig.from_dict({"crepa_lambda": 0.1, "urepa_bogus": 1, "lr": 3}).crepa_lambda == 0.1


@pytest.mark.parametrize("key, value, expected", [
    ("crepa_enabled", 1, "a bool"),
    ("crepa_enabled", "maybe", "a bool"),
    ("crepa_block_index", 8.5, "an integer >= 0"),
    ("crepa_block_index", "eight", "an integer >= 0"),
    ("crepa_block_index", True, "an integer >= 0"),
    ("crepa_adjacent_distance", [1], "an integer >= 0"),
    ("crepa_lambda", "high", "a finite number >= 0"),
    ("crepa_lambda", False, "a finite number >= 0"),
    ("crepa_encoder", 14, "a non-empty string"),
    ("crepa_encoder_dtype", 32, "one of 'float32', 'bfloat16', 'float16'"),
    ("crepa_encoder_frames_batch_size", 2.5, "an integer"),
    ("crepa_scheduler", 3, "one of 'constant'"),
    ("crepa_similarity_threshold", "high", "a finite number or None"),
    ("crepa_teacher_block_index", 1.5, "an integer >= 0 or None"),
    ("max_train_steps", "many", "an integer >= 0 or None"),
])
def test_wrong_type_names_key_value_and_valid_range(key, value, expected):
    with pytest.raises(TypeError) as info:
        CrepaConfig.from_dict({key: value})
    message = str(info.value)
    assert message.startswith(f"{key} must be {expected}") and repr(value) in message


@pytest.mark.parametrize("key, value, expected", [
    ("crepa_block_index", -1, "an integer >= 0, got -1"),
    ("crepa_lambda", -0.5, "a finite number >= 0, got -0.5"),
    ("crepa_lambda", float("inf"), "a finite number >= 0, got inf"),
    ("crepa_lambda", "nan", "a finite number >= 0, got nan"),
    ("crepa_adjacent_distance", -2, "an integer >= 0, got -2"),
    ("crepa_adjacent_tau", 0.0, "a finite number > 0, got 0.0"),
    ("crepa_encoder_image_size", 13, "an integer >= 14, got 13"),
    ("crepa_encoder", "  ", "a non-empty string, got '  '"),
    ("crepa_encoder_dtype", "float64", "one of 'float32', 'bfloat16', 'float16', got 'float64'"),
    ("crepa_encoder_tokens", "mean", "one of 'patch', 'cls', got 'mean'"),
    ("crepa_scheduler", "exponential", "one of 'constant', 'linear', 'cosine', 'polynomial', got 'exponential'"),
    ("crepa_threshold_mode", "sticky", "one of 'permanent', 'recoverable', got 'sticky'"),
    ("crepa_warmup_steps", -1, "an integer >= 0, got -1"),
    ("crepa_decay_steps", -100, "an integer >= 0, got -100"),
    ("crepa_cutoff_step", -3, "an integer >= 0, got -3"),
    ("crepa_lambda_end", -0.1, "a finite number >= 0, got -0.1"),
    ("crepa_power", 0, "a finite number > 0, got 0.0"),
    ("crepa_similarity_ema_decay", 1.0, "a finite number >= 0 and < 1, got 1.0"),
    ("crepa_similarity_ema_decay", -0.1, "a finite number >= 0 and < 1, got -0.1"),
    ("crepa_similarity_threshold", float("nan"), "a finite number or None, got nan"),
    ("crepa_teacher_block_index", -1, "an integer >= 0 or None, got -1"),
    ("max_train_steps", -10, "an integer >= 0 or None, got -10"),
])
def test_out_of_range_names_key_value_and_valid_range(key, value, expected):
    with pytest.raises(ValueError, match="^" + re.escape(f"{key} must be {expected}") + "$"):
        CrepaConfig.from_dict({key: value})


@pytest.mark.parametrize("key, value, error", [
    ("urepa_manifold_weight", -1.0, ValueError), ("urepa_lambda", "x", TypeError),
    ("urepa_encoder_image_size", 0, ValueError), ("urepa_scheduler", "step", ValueError),
    ("urepa_threshold_mode", "once", ValueError), ("urepa_use_tae", "sometimes", TypeError),
    ("urepa_model", "", ValueError), ("urepa_similarity_ema_decay", 1.5, ValueError),
])
def test_urepa_errors_name_the_key(key, value, error):
    with pytest.raises(error, match=f"^{key} must be"):
        UrepaConfig.from_dict({key: value})


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="crepa_block_index must be an integer >= 0, got -3"):
        CrepaConfig(crepa_block_index=-3)
    assert CrepaConfig(crepa_lambda="0.3").crepa_lambda == 0.3


def test_similarity_threshold_must_be_reachable():
    # adjacent, d=1, tau=1: |score| <= 1 + 2/e ~ 1.7358, so 1.5 is reachable ...
    assert CrepaConfig.from_dict({"crepa_similarity_threshold": 1.5}).crepa_similarity_threshold == 1.5
    # ... but not with the neighbour sum normalised (score in [-1, 1]) ...
    with pytest.raises(ValueError, match=r"crepa_similarity_threshold=1.5 can never be reached.*\[-1, 1\].*"
                                         r"valid thresholds are in \(0, 1\]"):
        CrepaConfig.from_dict({"crepa_similarity_threshold": 1.5, "crepa_normalize_neighbour_sum": True})
    # ... nor per-frame REPA (distance 0).
    with pytest.raises(ValueError, match="can never be reached"):
        CrepaConfig.from_dict({"crepa_similarity_threshold": 1.01, "crepa_adjacent_distance": 0})
    bound = 1 + 2 * (math.exp(-1) + math.exp(-2))
    assert CrepaConfig.from_dict({"crepa_similarity_threshold": bound - 1e-9, "crepa_adjacent_distance": 2,
                                  "crepa_cumulative_neighbors": True}).crepa_similarity_threshold < bound
    with pytest.raises(ValueError, match="urepa_similarity_threshold=1.2 can never be reached"):
        UrepaConfig.from_dict({"urepa_similarity_threshold": 1.2})


@pytest.mark.parametrize("value", [-0.5, "-0.5", 0, 0.0, -1.7])
def test_a_similarity_threshold_at_or_below_zero_is_refused_naming_the_loss_sign(value):
    """A negative threshold (the logged loss, −λ·score, copied with its sign) fired the permanent cutoff at
    the first call: the regularizer was off for the whole run, and only crepa_cutoff = 1 showed it."""
    with pytest.raises(ValueError) as info:
        CrepaConfig.from_dict({"crepa_enabled": True, "crepa_similarity_threshold": value})
    message = str(info.value)
    assert message.startswith(f"crepa_similarity_threshold={float(value):g} is outside (0, 1.73576]")
    assert "logged crepa_loss is −λ·score" in message
    assert ("did you mean 0.5?" in message) == (float(value) == -0.5)
    with pytest.raises(ValueError, match=r"urepa_similarity_threshold=-0.5 is outside \(0, 1\].*"
                                         "urepa_alignment_loss is −score"):
        UrepaConfig.from_dict({"urepa_similarity_threshold": -0.5})
    with pytest.raises(ValueError, match=r"crepa_similarity_threshold=-0.5 is outside \(0, 1\] \(\(0, 1 \+ Σw\]"):
        CoefficientSchedule(lambda_=0.5, similarity_threshold=-0.5)   # the schedule alone refuses it too


# ----------------------------------------------------------------------------------------- aliases


def test_crepa_model_is_an_alias_of_crepa_encoder():
    with no_warnings():
        assert CrepaConfig.from_dict({"crepa_model": "dinov2_vits14"}).crepa_encoder == "dinov2_vits14"
        assert CrepaConfig.from_dict({"crepa_model": "x/y", "crepa_encoder": "x/y"}).crepa_encoder == "x/y"
    with pytest.warns(ConfigWarning, match="crepa_model='dinov2_vits14' and crepa_encoder='dinov2_vitg14'"):
        cfg = CrepaConfig.from_dict({"crepa_model": "dinov2_vits14", "crepa_encoder": "dinov2_vitg14"})
    assert cfg.crepa_encoder == "dinov2_vits14"  # SimpleTuner prefers crepa_model
    with pytest.raises(ValueError, match="crepa_encoder must be a non-empty string"):
        CrepaConfig.from_dict({"crepa_model": ""})


def test_feature_source_backbone_is_an_alias_of_backbone_mode():
    base = {"crepa_enabled": True, "crepa_block_index": 4, "crepa_teacher_block_index": 12}
    with no_warnings():
        assert CrepaConfig.from_dict({**base, "crepa_feature_source": "backbone"}).crepa_use_backbone_features
        assert CrepaConfig.from_dict({**base, "crepa_feature_source": "backbone",
                                      "crepa_use_backbone_features": True}).crepa_use_backbone_features
        assert not CrepaConfig.from_dict({**base, "crepa_feature_source": "encoder"}).crepa_use_backbone_features
        assert not CrepaConfig.from_dict({**base, "crepa_feature_source": None}).crepa_use_backbone_features
    with pytest.raises(ValueError, match="crepa_feature_source='encoder' contradicts crepa_use_backbone_features"):
        CrepaConfig.from_dict({**base, "crepa_feature_source": "encoder", "crepa_use_backbone_features": "true"})
    with pytest.raises(ValueError, match="crepa_feature_source must be one of 'encoder', 'backbone', 'self_flow'"):
        CrepaConfig.from_dict({"crepa_feature_source": "dino"})


def test_a_false_legacy_backbone_flag_is_unset_as_in_simpletuner(tmp_path):
    """SimpleTuner's documented example config spells crepa_use_backbone_features = false; with
    crepa_feature_source backbone that raised 'contradicts' from a dict or JSON file, while argparse loaded it."""
    settings = {"crepa_enabled": True, "crepa_block_index": 4, "crepa_teacher_block_index": 12,
                "crepa_use_backbone_features": False, "crepa_feature_source": "backbone"}
    with no_warnings():
        from_dict = CrepaConfig.from_dict(settings)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    from_args = CrepaConfig.from_args(make_parser().parse_args(
        ["--crepa_enabled", "--crepa_block_index", "4", "--crepa_teacher_block_index", "12",
         "--crepa_use_backbone_features", "false", "--crepa_feature_source", "backbone"]))
    assert from_dict.crepa_use_backbone_features is True
    assert from_dict == CrepaConfig.from_json(path) == from_args
    assert CrepaConfig.from_dict({**settings, "crepa_use_backbone_features": "false"}) == from_dict


@pytest.mark.parametrize("spelling, meaning", [("internal", True), ("external", False), ("Backbone ", True)])
def test_simpletuners_feature_source_spellings(spelling, meaning):
    base = {"crepa_enabled": True, "crepa_block_index": 4, "crepa_teacher_block_index": 12}
    assert CrepaConfig.from_dict({**base, "crepa_feature_source": spelling}).crepa_use_backbone_features is meaning
    args = make_parser().parse_args(["--crepa_enabled", "--crepa_block_index", "4", "--crepa_teacher_block_index",
                                     "12", "--crepa_feature_source", spelling])
    assert CrepaConfig.from_args(args).crepa_use_backbone_features is meaning
    with pytest.raises(UnsupportedFeatureError, match="Self-Flow"):
        CrepaConfig.from_dict({**base, "crepa_feature_source": "selfflow"})


def test_backbone_mode_needs_a_distinct_teacher_block():
    with pytest.raises(ValueError, match="backbone mode.*needs crepa_teacher_block_index.*got None"):
        CrepaConfig.from_dict({"crepa_enabled": True, "crepa_feature_source": "backbone"})
    with pytest.raises(ValueError, match="crepa_teacher_block_index=8 equals crepa_block_index"):
        CrepaConfig.from_dict({"crepa_enabled": True, "crepa_use_backbone_features": True,
                               "crepa_teacher_block_index": 8})
    # A disabled regularizer is not checked: leftover keys of an off feature must not stop a trainer.
    assert not CrepaConfig.from_dict({"crepa_use_backbone_features": True}).crepa_enabled


# ------------------------------------------------------------------------------ unimplemented features


@pytest.mark.parametrize("data, feature", [
    ({"crepa_feature_source": "self_flow"}, "Self-Flow"),
    ({"crepa_self_flow": True, "crepa_self_flow_mask_ratio": 0.25}, "Self-Flow"),
    ({"crepa_self_flow": "true"}, "Self-Flow"),
])
def test_unimplemented_feature_turned_on_is_an_error_naming_it(data, feature):
    with pytest.raises(UnsupportedFeatureError, match=f"turns on {feature}.*does not implement"):
        CrepaConfig.from_dict({"crepa_enabled": True, **data})


def test_self_flow_doc_preset_is_an_error():
    preset = {"use_ema": True, "crepa_enabled": True, "crepa_feature_source": "self_flow", "crepa_block_index": 8,
              "crepa_teacher_block_index": 16, "crepa_lambda": 0.5, "crepa_self_flow_mask_ratio": 0.25}
    with pytest.raises(UnsupportedFeatureError, match="crepa_feature_source='self_flow' turns on Self-Flow"):
        CrepaConfig.from_dict(preset)


def test_unimplemented_keys_left_off_give_exactly_one_warning():
    data = {"crepa_enabled": True, "crepa_self_flow": False, "crepa_self_flow_mask_ratio": 0.1,
            "crepa_feature_source": "encoder"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = CrepaConfig.from_dict(data)
    assert cfg.crepa_enabled
    assert len(caught) == 1 and issubclass(caught[0].category, ConfigWarning)
    message = str(caught[0].message)
    for key in ("crepa_self_flow", "crepa_self_flow_mask_ratio"):
        assert key in message
    assert "crepa_feature_source" not in message  # 'encoder' is implemented


def test_unimplemented_feature_on_but_regularizer_off_only_warns():
    with pytest.warns(ConfigWarning, match=r"crepa_enabled is false\): crepa_feature_source"):
        cfg = CrepaConfig.from_dict({"crepa_feature_source": "self_flow", "crepa_teacher_block_index": 16})
    assert not cfg.crepa_enabled and not cfg.crepa_use_backbone_features
    with pytest.raises(TypeError, match="crepa_self_flow must be a bool"):
        CrepaConfig.from_dict({"crepa_self_flow": "perhaps"})


# -------------------------------------------------------------------------------------------- JSON


def test_json_whole_trainer_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "wan", "learning_rate": 1e-4, "max_train_steps": 10_000,
                                "urepa_enabled": False, "crepa_enabled": True, **T2V_PRESET}))
    cfg = CrepaConfig.from_json(path)
    assert cfg.crepa_enabled and cfg.max_train_steps == 10_000 and cfg.crepa_scheduler == "cosine"
    assert UrepaConfig.from_json(str(path)).max_train_steps == 10_000
    schedule = CoefficientSchedule.from_config(cfg)
    assert schedule.weight(10_000) == pytest.approx(0.1)


def test_json_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{\"crepa_enabled\": true,}")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        CrepaConfig.from_json(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(TypeError, match="must hold a JSON object"):
        CrepaConfig.from_json(listed)
    with pytest.raises(TypeError, match="a config must be a mapping"):
        CrepaConfig.from_dict([("crepa_enabled", True)])


def test_real_simpletuner_config_loads():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = CrepaConfig.from_json(DATA / "simpletuner_crepa.json")
        ucfg = UrepaConfig.from_json(DATA / "simpletuner_crepa.json")
    assert [issubclass(w.category, ConfigWarning) for w in caught] == [True]  # the ignored crepa_self_flow keys
    assert "crepa_self_flow_mask_ratio" in str(caught[0].message)
    assert cfg.crepa_enabled and cfg.crepa_block_index == 8 and cfg.crepa_encoder == "dinov2_vitg14"
    assert cfg.crepa_scheduler == "cosine" and cfg.crepa_similarity_threshold == 0.85
    assert cfg.max_train_steps == 10_000 and not cfg.crepa_use_backbone_features
    assert not ucfg.urepa_enabled and ucfg.max_train_steps == 10_000
    schedule = CoefficientSchedule.from_config(cfg)
    assert schedule.weight(0) == 0.0 and schedule.weight(100) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ argparse


def make_parser(**kwargs):
    return add_argparse_args(argparse.ArgumentParser(prog="train.py"), **kwargs)


def test_argparse_defaults_are_the_documented_ones():
    namespace = make_parser().parse_args([])
    assert CrepaConfig.from_args(namespace) == CrepaConfig()
    assert UrepaConfig.from_args(namespace) == UrepaConfig()


def test_argparse_flags_values_and_aliases():
    parser = make_parser()
    namespace = parser.parse_args([
        "--crepa_enabled", "--crepa_lambda", "0.25", "--crepa_block_index", "0", "--crepa_model", "dinov2_vits14",
        "--crepa_spatial_align", "false", "--crepa_use_tae=true", "--crepa_similarity_threshold", "0.9",
        "--crepa_scheduler", "polynomial", "--crepa_decay_steps", "50", "--urepa_enabled", "no"])
    cfg = CrepaConfig.from_args(namespace)
    assert cfg.crepa_enabled is True and cfg.crepa_lambda == 0.25 and cfg.crepa_block_index == 0
    assert cfg.crepa_encoder == "dinov2_vits14" and cfg.crepa_spatial_align is False and cfg.crepa_use_tae is True
    assert cfg.crepa_similarity_threshold == 0.9 and cfg.crepa_scheduler == "polynomial"
    assert UrepaConfig.from_args(namespace).urepa_enabled is False
    backbone = parser.parse_args(["--crepa_enabled", "--crepa_feature_source", "backbone",
                                  "--crepa_teacher_block_index", "20"])
    assert CrepaConfig.from_args(backbone).crepa_use_backbone_features is True


def test_argparse_round_trip():
    cfg = CrepaConfig.from_dict({"crepa_enabled": True, **T2V_PRESET, "crepa_encoder_dtype": "bfloat16",
                                 "crepa_encoder_tokens": "cls", "crepa_encoder_frames_batch_size": 0,
                                 "crepa_use_backbone_features": True, "crepa_teacher_block_index": 20})
    argv = []
    for key, value in cfg.to_dict().items():
        if key != "max_train_steps":
            argv += [f"--{key}", str(value)]
    assert CrepaConfig.from_args(make_parser(urepa=False).parse_args(argv)) == cfg


def test_argparse_reads_the_trainers_max_train_steps():
    parser = make_parser()
    parser.add_argument("--max_train_steps", type=int, default=None)
    namespace = parser.parse_args(["--crepa_scheduler", "linear", "--max_train_steps", "500"])
    cfg = CrepaConfig.from_args(namespace)
    assert cfg.max_train_steps == 500
    assert CoefficientSchedule.from_config(cfg).weight(250) == pytest.approx(0.25)


@pytest.mark.parametrize("argv, fragment", [
    (["--crepa_lambda", "-1"], "crepa_lambda must be a finite number >= 0, got -1.0"),
    (["--crepa_enabled", "maybe"], "crepa_enabled must be a bool"),
    (["--crepa_block_index", "2.5"], "crepa_block_index must be an integer >= 0"),
    (["--crepa_scheduler", "step"], "crepa_scheduler must be one of"),
    (["--urepa_power", "0"], "urepa_power must be a finite number > 0"),
])
def test_argparse_rejects_bad_values_with_the_rule(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(argv)
    assert fragment in capsys.readouterr().err


def test_argparse_adds_every_key_with_help_and_only_the_requested_groups():
    parser = make_parser()
    options = {action.dest: action for action in parser._actions}
    for key in list(CONTRACT_CREPA_DEFAULTS) + list(CONTRACT_UREPA_DEFAULTS):
        if key == "max_train_steps":
            assert key not in options  # the trainer's own option
            continue
        assert options[key].help and "(default: " in options[key].help
        assert options[key].default == (CONTRACT_CREPA_DEFAULTS | CONTRACT_UREPA_DEFAULTS)[key]
    only_urepa = {action.dest for action in make_parser(crepa=False)._actions}
    assert "urepa_lambda" in only_urepa and "crepa_lambda" not in only_urepa
    with pytest.raises(TypeError, match="from_args expects an argparse.Namespace"):
        CrepaConfig.from_args({"crepa_enabled": True})
