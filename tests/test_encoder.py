"""The frozen DINOv2 teacher: names, local loading, token selection, dtype, batching, errors (docs/contract.md §7)."""

import json

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer.encoder import (ENCODER_HUB_IDS, IMAGENET_MEAN, IMAGENET_STD, EncoderLoadError,
                                              FrozenEncoder, resolve_encoder_source)


@pytest.fixture(scope="module")
def saved_dinov2(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2")
    tm.tiny_dinov2().save_pretrained(path)
    return path


def _expected_tokens(model, frames, prefix):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=(frames - mean) / std).last_hidden_state[:, prefix:]


def test_short_names_map_to_hub_ids():
    assert resolve_encoder_source("dinov2_vits14") == "facebook/dinov2-small"
    assert resolve_encoder_source("dinov2_vitb14") == "facebook/dinov2-base"
    assert resolve_encoder_source("dinov2_vitl14") == "facebook/dinov2-large"
    assert resolve_encoder_source("dinov2_vitg14") == "facebook/dinov2-giant"
    assert resolve_encoder_source("dinov2_vitg14_reg") == "facebook/dinov2-with-registers-giant"
    assert resolve_encoder_source("dinov2_vits14_reg") == "facebook/dinov2-with-registers-small"
    assert resolve_encoder_source("my-org/my-dino") == "my-org/my-dino"
    assert sum(name.startswith("dinov2_") for name in ENCODER_HUB_IDS) == 8
    with pytest.raises(ValueError, match="non-empty"):
        resolve_encoder_source("")


def test_loads_a_saved_tiny_dinov2_from_a_local_directory_offline(saved_dinov2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (saved_dinov2 / "model.safetensors").exists()
    encoder = FrozenEncoder.load(str(saved_dinov2))
    assert type(encoder.model).__name__ == "Dinov2Model"
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.parameters())
    assert (encoder.patch_size, encoder.hidden_size, encoder.num_prefix_tokens) == (4, 16, 1)
    frames = torch.rand(3, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    tokens = encoder.encode(frames)
    assert tokens.shape == (3, 4 * 3, 16) and tokens.dtype == torch.float32 and not tokens.requires_grad
    assert torch.allclose(tokens, _expected_tokens(tm.tiny_dinov2(), frames, 1), atol=1e-5)
    encoder.train()
    assert not encoder.model.training          # stays frozen whatever the trainer does


def test_register_tokens_and_cls_are_dropped_from_patch_tokens(tmp_path):
    tm.tiny_dinov2(with_registers=True).save_pretrained(tmp_path)
    encoder = FrozenEncoder.load(str(tmp_path))
    assert type(encoder.model).__name__ == "Dinov2WithRegistersModel" and encoder.num_prefix_tokens == 3
    frames = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    tokens = encoder.encode(frames)
    assert tokens.shape == (2, 4, 16)
    assert torch.allclose(tokens, _expected_tokens(tm.tiny_dinov2(with_registers=True), frames, 3), atol=1e-5)


def test_cls_token_mode():
    model = tm.tiny_dinov2()
    encoder = FrozenEncoder.load(model, tokens="cls")
    frames = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    full = _expected_tokens(tm.tiny_dinov2(), frames, 0)
    assert torch.allclose(encoder.encode(frames), full[:, :1], atol=1e-5)


def test_frames_batch_size_gives_the_same_tokens_in_several_calls():
    frames = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    whole = FrozenEncoder.load(tm.tiny_dinov2(), frames_batch_size=-1)
    batched = FrozenEncoder.load(tm.tiny_dinov2(), frames_batch_size=2)
    calls = []
    batched.model.register_forward_hook(lambda m, a, o: calls.append(a))
    assert torch.allclose(whole.encode(frames), batched.encode(frames), atol=1e-6)
    assert len(calls) == 3 and batched.frames_encoded == 5


def test_a_frozen_encoder_passed_in_takes_the_settings_asked_for():
    """The config's tokens / batching / dtype win over those the passed FrozenEncoder was built with
    (they were silently ignored: a 'cls' encoder under crepa_encoder_tokens='patch' squeezed the grid)."""
    built = FrozenEncoder.load(tm.tiny_dinov2(), tokens="cls", frames_batch_size=1)
    encoder = FrozenEncoder.load(built, tokens="patch", frames_batch_size=2, dtype="bfloat16")
    assert (encoder.tokens, encoder.frames_batch_size, encoder.dtype) == ("patch", 2, torch.bfloat16)
    assert encoder.model is built.model
    assert encoder.encode(torch.rand(1, 3, 8, 8)).shape == (1, 4, 16)


def test_encoder_dtype_bfloat16():
    encoder = FrozenEncoder.load(tm.tiny_dinov2(), dtype="bfloat16")
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    tokens = encoder.encode(torch.rand(1, 3, 8, 8))
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        FrozenEncoder.load(tm.tiny_dinov2(), dtype="int8")


def test_missing_weights_offline_say_how_to_provide_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderLoadError) as info:
        FrozenEncoder.load("facebook/dinov2-this-repo-is-not-cached")
    message = str(info.value)
    assert "offline" in message and "network" in message and "local" in message and "path" in message


def test_missing_local_directory_is_an_error(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        FrozenEncoder.load(str(tmp_path / "nope"))


def test_a_model_no_teacher_serves_is_refused(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(tmp_path)
    with pytest.raises(EncoderLoadError, match="'resnet' model, which no registered teacher serves") as info:
        FrozenEncoder.load(str(tmp_path))
    assert "dinov3_vit" in str(info.value) and "register_teacher" in str(info.value)
    with pytest.raises(TypeError, match="registered teacher"):
        FrozenEncoder.load(torch.nn.Linear(2, 2))


def test_pickle_only_weights_are_refused(saved_dinov2, tmp_path):
    # safetensors only: a directory holding just a pickled checkpoint must not load
    (tmp_path / "config.json").write_text((saved_dinov2 / "config.json").read_text())
    torch.save(tm.tiny_dinov2().state_dict(), tmp_path / "pytorch_model.bin")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "dinov2"
    with pytest.raises(EncoderLoadError, match="safetensors"):
        FrozenEncoder.load(str(tmp_path))


def test_encode_checks_frame_shapes():
    encoder = FrozenEncoder.load(tm.tiny_dinov2())
    with pytest.raises(ValueError, match="multiples of the encoder patch size 4"):
        encoder.encode(torch.rand(1, 3, 10, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        encoder.encode(torch.rand(3, 8, 8))
