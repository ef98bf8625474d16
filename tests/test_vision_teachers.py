"""Teachers beyond DINOv2: DINOv3, SigLIP, SigLIP2 NaFlex, Qwen2.5-VL / Qwen3-VL vision towers, ViT.

Each tiny random-weight checkpoint is saved whole (SigLIP with its text model, Qwen-VL with its language
model) to a temporary directory and loaded by path with HF_HUB_OFFLINE=1. The teacher tokens are checked
against the model's own output on its own processor's input (token count, order, prefix and padding
tokens dropped), then each teacher aligns a tiny Wan (CREPA) and a tiny UNet (U-REPA).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import tiny_models as tm
from repa_kernels.regularizer import (CrepaRegularizer, EncoderLoadError, FrozenEncoder, UrepaRegularizer,
                                      VisionTeacher, register_teacher)
from repa_kernels.regularizer import vision_teachers
from repa_kernels.regularizer.checkpoint_tensors import INDEX_FILE
from repa_kernels.regularizer.grids import teacher_input_size

BUILDERS = {"dinov3": tm.tiny_dinov3, "siglip": tm.tiny_siglip, "siglip2": tm.tiny_siglip2, "vit": tm.tiny_vit,
            "qwen2_5_vl": tm.tiny_qwen2_5_vl, "qwen3_vl": tm.tiny_qwen3_vl}
# (built module class, token stride, width, prefix tokens dropped)
EXPECTED = {"dinov3": ("DINOv3ViTModel", 4, 16, 5), "siglip": ("SiglipVisionModel", 4, 16, 0),
            "siglip2": ("Siglip2VisionModel", 4, 16, 0), "vit": ("ViTModel", 4, 16, 1),
            "qwen2_5_vl": ("Qwen2_5_VisionTransformerPretrainedModel", 4, 24, 0),
            "qwen3_vl": ("Qwen3VLVisionModel", 4, 24, 0)}


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny teacher checkpoint, saved once; Qwen-VL sharded so the language model sits in shards
    of its own, which are then deleted: loading must not need them."""
    paths = {}
    for name, build in BUILDERS.items():
        path = tmp_path_factory.mktemp(name)
        if name.startswith("qwen"):
            _save(build(), path, max_shard_size="20KB")
            index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            vision_files = {f for key, f in index.items() if key.startswith(("visual.", "model.visual."))}
            language_only = set(index.values()) - vision_files
            assert language_only, "the tiny checkpoint should have shards without vision tensors"
            for filename in language_only:
                (path / filename).unlink()
        else:
            _save(build(), path)
        paths[name] = path
    return paths


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _frames(n, height, width, seed=0):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _normalised(frames, encoder):
    return (frames - encoder.mean) / encoder.std


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loads_by_path_offline_frozen_with_its_geometry(saved, name):
    encoder = FrozenEncoder.load(str(saved[name]))
    class_name, stride, width, prefix = EXPECTED[name]
    assert type(encoder.model).__name__ == class_name
    assert (encoder.patch_size, encoder.hidden_size, encoder.num_prefix_tokens) == (stride, width, prefix)
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.parameters())
    tokens = encoder.encode(_frames(2, 8, 12))
    assert tokens.shape == (2, 2 * 3, width) and tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


def test_dinov3_drops_cls_and_four_registers_like_its_backbone(saved):
    """DINOv3ViTBackbone lays the same last-layer tokens on the (h/16, w/16) map after dropping its 1 + 4
    prefix tokens: the teacher's patch tokens are that map, row-major."""
    from transformers import DINOv3ViTBackbone

    encoder = FrozenEncoder.load(str(saved["dinov3"]))
    assert encoder.model.config.num_register_tokens == 4 and encoder.num_prefix_tokens == 5
    frames = _frames(2, 12, 16, seed=1)
    backbone = DINOv3ViTBackbone.from_pretrained(saved["dinov3"], out_indices=[1]).eval()
    with torch.no_grad():
        feature_map = backbone(pixel_values=_normalised(frames, encoder)).feature_maps[-1]     # (N, D, 3, 4)
    assert feature_map.shape == (2, 16, 3, 4)
    expected = feature_map.flatten(2).transpose(1, 2)
    assert torch.allclose(encoder.encode(frames), expected, atol=1e-5)
    cls = FrozenEncoder.load(encoder, tokens="cls").encode(frames)
    with torch.no_grad():
        full = encoder.model(pixel_values=_normalised(frames, encoder)).last_hidden_state
    assert cls.shape == (2, 1, 16) and torch.allclose(cls, full[:, :1], atol=1e-6)
    assert full.shape[1] == 1 + 4 + 12


def test_siglip_has_no_cls_and_keeps_every_token(saved):
    whole = tm.tiny_siglip()
    encoder = FrozenEncoder.load(str(saved["siglip"]))
    assert encoder.input_size(40, 90, 16) == (16, 16)          # the processor's square, at the configured size
    frames = _frames(2, 8, 8, seed=2)
    with torch.no_grad():
        expected = whole.vision_model(pixel_values=_normalised(frames, encoder),
                                      interpolate_pos_encoding=True).last_hidden_state
    assert expected.shape == (2, 4, 16)
    assert torch.allclose(encoder.encode(frames), expected, atol=1e-5)
    with pytest.raises(ValueError, match="SigLIP has none"):
        FrozenEncoder.load(encoder, tokens="cls")


def test_siglip2_naflex_matches_its_processor_and_model_with_padding_dropped(saved):
    """Its image processor patchifies one frame and pads it to max_num_patches; the model's valid
    positions, laid on spatial_shapes, are the teacher tokens (order and count)."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    whole = tm.tiny_siglip2()
    encoder = FrozenEncoder.load(str(saved["siglip2"]))
    height, width = encoder.input_size(30, 50, 16)
    processor = Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16)
    assert (height, width) == (12, 20)                          # 3 x 5 = 15 patches within the budget of 16
    frames = _frames(2, height, width, seed=3)
    inputs = processor(images=[f.permute(1, 2, 0).numpy() for f in frames], do_resize=False, do_rescale=False,
                       return_tensors="pt")
    assert inputs["pixel_attention_mask"].sum(1).tolist() == [15, 15] and inputs["pixel_values"].shape[1] == 16
    assert inputs["spatial_shapes"].tolist() == [[3, 5], [3, 5]]
    with torch.no_grad():
        out = whole.vision_model(**inputs).last_hidden_state
    expected = out[inputs["pixel_attention_mask"].bool()].reshape(2, 15, 16)
    assert torch.allclose(encoder.encode(frames), expected, atol=1e-5)


def test_siglip2_resize_rule_is_its_processors():
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    for height, width, size in ((480, 832, 512), (37, 1000, 64), (512, 512, 256)):
        budget = round(size * size / 256)
        assert teacher_input_size("naflex", height, width, size, 16) == \
            get_image_size_for_max_num_patches(height, width, 16, budget)
    assert teacher_input_size("naflex", 480, 832, 512, 16) == (384, 672)      # 24 x 42 = 1008 <= 1024 patches
    with pytest.raises(ValueError, match="resize rule must be one of area, square, naflex, got 'crop'"):
        teacher_input_size("crop", 8, 8, 16, 4)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_tower_only_matches_the_vlms_image_features(saved, name):
    """Only the vision tower is read from the whole VLM checkpoint (its language-model shards are gone);
    its tokens equal the VLM's own image features on Qwen's processor input: merged tokens after the 2x2
    merger, one per 2x2 patches, in row-major order."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    whole = BUILDERS[name]()
    encoder = FrozenEncoder.load(str(saved[name]))
    assert not any(n.startswith(("language_model", "lm_head", "layers")) for n, _ in encoder.model.named_parameters())
    frames = _frames(3, 16, 24, seed=4)
    processor = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2,
                                         image_mean=list(encoder.preprocessing.mean),
                                         image_std=list(encoder.preprocessing.std))
    inputs = processor(images=[f.permute(1, 2, 0).numpy() for f in frames], do_resize=False, do_rescale=False,
                       return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 12]] * 3
    with torch.no_grad():
        features = whole.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    expected = torch.stack(list(features))
    assert expected.shape == (3, 4 * 6, 24)
    assert torch.allclose(encoder.encode(frames), expected, atol=1e-5)
    passed_in = FrozenEncoder.load(whole)                       # a whole VLM passed in: its tower is used
    assert passed_in.model is whole.model.visual and passed_in.hidden_size == 24
    with pytest.raises(ValueError, match="has none"):
        FrozenEncoder.load(encoder, tokens="cls")


def test_qwen_checkpoint_without_a_vision_tower_is_refused(tmp_path, saved):
    (tmp_path / "config.json").write_text((saved["qwen3_vl"] / "config.json").read_text())
    from safetensors.torch import save_file
    save_file({"model.language_model.norm.weight": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(EncoderLoadError, match="no tensor under 'model.visual.' or 'visual.'"):
        FrozenEncoder.load(str(tmp_path))


def test_preprocessor_config_mean_and_std_win(tmp_path, saved):
    for item in saved["dinov3"].iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.430, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]}))   # DINOv3 satellite values
    encoder = FrozenEncoder.load(str(tmp_path))
    assert encoder.preprocessing.mean == (0.430, 0.411, 0.296)
    assert torch.allclose(encoder.std.flatten(), torch.tensor([0.213, 0.156, 0.143]))
    assert FrozenEncoder.load(str(saved["dinov3"])).preprocessing.mean == vision_teachers.IMAGENET_MEAN


def test_short_names_map_to_hub_ids_and_dinov3_says_it_may_be_gated():
    from repa_kernels.regularizer.encoder import ENCODER_HUB_IDS

    assert ENCODER_HUB_IDS["qwen2.5-vl-7b"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert ENCODER_HUB_IDS["qwen3-vl-4b"] == "Qwen/Qwen3-VL-4B-Instruct"
    assert ENCODER_HUB_IDS["dinov3_vitl16"] == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert ENCODER_HUB_IDS["siglip2_so400m_patch16_naflex"] == "google/siglip2-so400m-patch16-naflex"
    with pytest.raises(EncoderLoadError) as info:
        FrozenEncoder.load("dinov3_vitl16")
    message = str(info.value)
    assert "offline" in message and "gated" in message and "licence" in message and "HF_TOKEN" in message
    with pytest.raises(EncoderLoadError) as info:
        FrozenEncoder.load("qwen3-vl-4b")
    assert "gated" not in str(info.value)


@pytest.fixture
def restore_registry():
    teachers, names = dict(vision_teachers._TEACHERS), dict(vision_teachers.TEACHER_HUB_IDS)
    yield
    vision_teachers._TEACHERS.clear()
    vision_teachers._TEACHERS.update(teachers)
    vision_teachers.TEACHER_HUB_IDS.clear()
    vision_teachers.TEACHER_HUB_IDS.update(names)


def test_a_new_teacher_is_one_entry(tmp_path, restore_registry):
    """I-JEPA (no CLS: every token is a patch) becomes a teacher with one register_teacher call."""
    from transformers import IJepaConfig, IJepaModel

    torch.manual_seed(0)
    model = IJepaModel(IJepaConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32))
    model.save_pretrained(tmp_path)
    with pytest.raises(EncoderLoadError, match="'ijepa' model, which no registered teacher serves"):
        FrozenEncoder.load(str(tmp_path))
    register_teacher(VisionTeacher("I-JEPA", model_types=("ijepa",), class_name="IJepaModel",
                                   mean=vision_teachers.IMAGENET_MEAN, std=vision_teachers.IMAGENET_STD,
                                   forward_kwargs={"interpolate_pos_encoding": True},
                                   names={"ijepa_tiny_test": str(tmp_path)}))
    encoder = FrozenEncoder.load("ijepa_tiny_test")
    frames = _frames(1, 8, 12)
    with torch.no_grad():
        expected = model.eval()(pixel_values=_normalised(frames, encoder),
                                interpolate_pos_encoding=True).last_hidden_state
    assert torch.allclose(encoder.encode(frames), expected, atol=1e-5) and expected.shape[1] == 6
    with pytest.raises(ValueError, match="already served"):
        register_teacher(VisionTeacher("again", model_types=("ijepa",), class_name="IJepaModel",
                                       mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(ValueError, match="resize must be one of"):
        VisionTeacher("bad", model_types=("x",), class_name="X", mean=(0.5,) * 3, std=(0.5,) * 3, resize="crop")
    with pytest.raises(ValueError, match="std must be positive"):
        VisionTeacher("bad", model_types=("x",), class_name="X", mean=(0.5,) * 3, std=(0.5, 0.0, 0.5))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_teacher_aligns_a_tiny_wan_and_a_tiny_unet(saved, name):
    _, stride, width, _ = EXPECTED[name]
    transformer = tm.tiny_wan().train()
    crepa = CrepaRegularizer.from_config(
        {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder": str(saved[name]),
         "crepa_encoder_image_size": 16}, transformer=transformer, vae=tm.tiny_wan_vae(), impl="reference")
    assert crepa.projector.out_features == width
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    tm.tiny_forward(transformer, latents)
    loss, logs = crepa(latents=latents, step=0)
    loss.backward()
    assert torch.isfinite(loss) and crepa.projector.linear.weight.grad.abs().sum() > 0
    assert crepa.frames_encoded == 3

    unet = tm.tiny_unet().train()
    urepa = UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_model": str(saved[name]),
                                          "urepa_encoder_image_size": 16}, unet=unet, vae=tm.tiny_image_vae(),
                                         impl="reference")
    image_latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(6))
    tm.tiny_forward(unet, image_latents)
    loss, logs = urepa(latents=image_latents, step=0)
    loss.backward()
    assert torch.isfinite(loss) and urepa.projector.linear.weight.grad.abs().sum() > 0
    teacher = urepa._teacher.from_pixels(torch.rand(2, 3, 8, 12), 1)
    rows, cols = urepa.encoder.input_size(8, 12, 16)
    assert teacher.shape == (2, 1, rows // stride, cols // stride, width)



def test_a_whole_siglip_model_passed_in_gives_its_vision_model():
    whole = tm.tiny_siglip2()
    encoder = FrozenEncoder.load(whole)
    assert encoder.model is whole.vision_model and encoder.resize == "naflex"
    assert FrozenEncoder.load(whole.vision_model).model is whole.vision_model


def test_the_feature_cache_follows_the_teachers_resize_rule_and_normalisation(tmp_path):
    """An entry stored without a grid (precomputed from an image) is checked against the grid the teacher's
    own resize rule gives: SigLIP's square 4 x 4, not the 3 x 5 of the area rule (a warned miss and a
    second decode otherwise); the identity names SigLIP's mean / std and rule."""
    unet, vae = tm.tiny_unet().train(), tm.tiny_image_vae()
    reg = UrepaRegularizer.from_config({"urepa_enabled": True, "urepa_encoder_image_size": 16}, unet=unet, vae=vae,
                                       encoder=tm.tiny_siglip(), impl="reference", feature_cache=tmp_path)
    decodes = []
    decode = vae.decode
    vae.decode = lambda *args, **kwargs: decodes.append(1) or decode(*args, **kwargs)
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    reg.precompute_teacher_features([("image-1", latents[1])], progress=False)
    assert len(decodes) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "treated as a miss" warning
        tm.tiny_forward(unet, latents)
        reg(latents=latents, cache_keys=["image-0", "image-1"], step=0)
    assert len(decodes) == 2                                   # image-0 only: image-1 was a hit
    identity = json.loads(next(tmp_path.glob("*/identity.json")).read_text())
    assert identity["resize"] == "square" and "mean=[0.5, 0.5, 0.5]" in identity["normalization"]
