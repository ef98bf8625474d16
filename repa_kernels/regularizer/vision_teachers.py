"""The vision teachers: one declared adapter per transformers model class.

An adapter (`VisionTeacher`) says everything the frozen encoder needs to know about one model class:
- which checkpoints it serves (`config.model_type` of the checkpoint, and of the module it builds) and
  its short names (name -> hub id; `gated` when the hub repositories need a token and a licence);
- how to build the module: `from_pretrained` with safetensors only and never remote code, or (Qwen-VL)
  only the vision tower's tensors out of the whole vision-language checkpoint;
- its preprocessing: mean / std (a checkpoint's `preprocessor_config.json` wins over the defaults
  here), the resize rule and the token stride (pixels per teacher token side: the patch size, or
  patch x merge after Qwen-VL's 2x2 merger);
- where the patch tokens sit in its output (CLS, register, pooled and padding tokens dropped), and
  their width.

Resize rules (`grids.teacher_input_size`), for a frame of h x w pixels and the configured size S
(`*_encoder_image_size`):
- "area":   about S*S pixels of area at the frame's aspect ratio, each side rounded to the nearest
            multiple of the stride (DINOv2 / DINOv3 / ViT, and Qwen-VL, whose own `smart_resize` uses
            the same nearest rounding to multiples of 28 / 32);
- "square": S x S rounded to the stride, aspect not kept (SigLIP's processor resizes to a square);
- "naflex": SigLIP2's own rule (`get_image_size_for_max_num_patches`) with a budget of round(S²/p²)
            patches: the largest scale whose sides, rounded up to the patch, fit the budget.
The token grid is then (h'/stride, w'/stride), row-major, for every teacher: the regularizer lays
the tokens on it and resamples the student onto it (or it onto the student).

Adding a teacher is one entry: a `VisionTeacher(...)` (or a small subclass with its own `patch_tokens`
when the forward is not `model(pixel_values=...).last_hidden_state` with prefix tokens first) passed to
`register_teacher`. docs/teachers.md lists the built-in ones. The common layout is pure data that
`FrozenEncoder` reads (prefix count, forward keyword arguments), so one call of a DINO-like teacher
enters this module only when the encoder is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .checkpoint_tensors import load_prefixed_tensors
from .grids import RESIZE_RULES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)                  # SigLIP, SigLIP2, Qwen3-VL: x -> 2x - 1
HALF_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # Qwen2.5-VL
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation of frames in [0, 1]: (x - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name, value in (("mean", self.mean), ("std", self.std)):
            if len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ValueError(f"preprocessing {name} must be 3 finite numbers (R, G, B), got {value!r}")
        if min(self.std) <= 0:
            raise ValueError(f"preprocessing std must be positive, got {self.std!r}")


def _int(value) -> int:
    return int(value if isinstance(value, int) else value[0])


class VisionTeacher:
    """A ViT-like teacher: `model(pixel_values=x).last_hidden_state` is its prefix tokens (CLS first,
    then registers) followed by the patch tokens in row-major order.

    label: for messages; model_types: `config.model_type` of the checkpoints and modules it serves;
    class_name: the transformers class built from a checkpoint; mean / std: default preprocessing;
    resize: one of RESIZE_RULES; prefix_tokens(config): tokens before the patches; has_cls: whether the
    first prefix token is a CLS (crepa_encoder_tokens='cls'); names: short name -> hub id; gated: the
    hub repositories need a token and an accepted licence; forward_kwargs: extra keyword arguments of
    the forward (e.g. position-embedding interpolation); vision_attribute: where a whole (vision + text)
    model of a served type holds its vision model.
    """

    def __init__(self, label: str, *, model_types: tuple[str, ...], class_name: str,
                 mean: tuple[float, float, float], std: tuple[float, float, float], resize: str = "area",
                 prefix_tokens: Callable[[object], int] = lambda config: 0, has_cls: bool = False,
                 names: dict[str, str] | None = None, gated: bool = False,
                 forward_kwargs: dict | None = None, vision_attribute: str | None = None) -> None:
        if resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_RULES)}, got {resize!r}")
        if not model_types or not all(isinstance(t, str) and t for t in model_types):
            raise ValueError(f"model_types must be non-empty model_type strings, got {model_types!r}")
        self.label = label
        self.model_types = tuple(model_types)
        self.class_name = class_name
        self.preprocessing = Preprocessing(tuple(mean), tuple(std))
        self.resize = resize
        self._prefix_tokens = prefix_tokens
        self.has_cls = has_cls
        self.names = dict(names or {})
        self.gated = gated
        self.forward_kwargs = dict(forward_kwargs or {})
        self.vision_attribute = vision_attribute

    def __repr__(self) -> str:
        return f"VisionTeacher({self.label!r}, model_types={self.model_types})"

    # ------------------------------------------------------------------ building
    def load(self, where: str, config, dtype: torch.dtype) -> nn.Module:
        """The module from a local directory or hub id (`config` is its AutoConfig)."""
        import transformers

        cls = getattr(transformers, self.class_name)
        return cls.from_pretrained(where, dtype=dtype, use_safetensors=True, trust_remote_code=False)

    def vision_module(self, model: nn.Module) -> nn.Module:
        """The module that encodes images: a whole (vision + text) model passed in gives the vision model
        under `vision_attribute` (SiglipModel.vision_model)."""
        inner = getattr(model, self.vision_attribute, None) if self.vision_attribute else None
        inner_type = getattr(getattr(inner, "config", None), "model_type", None)
        if isinstance(inner, nn.Module) and inner_type in self.model_types and inner_type != model.config.model_type:
            return inner
        return model

    # ------------------------------------------------------------------ geometry
    def token_stride(self, config) -> int:
        """Pixels per teacher token side."""
        return _int(config.patch_size)

    def width(self, config) -> int:
        return int(config.hidden_size)

    def prefix_tokens(self, config) -> int:
        return int(self._prefix_tokens(config))

    # ------------------------------------------------------------------ tokens
    # The common layout (`model(pixel_values=x, **forward_kwargs).last_hidden_state`, prefix tokens
    # first) is read by FrozenEncoder from the data above; a teacher whose forward or layout differs
    # defines patch_tokens(model, pixels): normalised frames (N, 3, h, w) in the model's dtype ->
    # (N, h/s * w/s, D) patch tokens in row-major order.
    patch_tokens: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


class Siglip2Teacher(VisionTeacher):
    """SigLIP2 NaFlex: the forward takes patchified pixels (N, L, p*p*3), `pixel_attention_mask` (N, L)
    and `spatial_shapes` (N, 2). Frames are patchified as its image processor does (patches row-major,
    each patch flattened as (row, column, channel)); all frames of one call have the same size, so no
    sequence is padded and every output position is a patch token of the (h/p, w/p) grid."""

    def patch_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        n, c, h, w = pixels.shape
        p = self.token_stride(model.config)
        rows, cols = h // p, w // p
        patches = pixels.reshape(n, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(n, rows * cols, p * p * c)
        mask = torch.ones(n, rows * cols, dtype=torch.int32, device=pixels.device)
        shapes = torch.tensor([[rows, cols]] * n, dtype=torch.long, device=pixels.device)
        hidden = model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        return hidden[:, :rows * cols]


class QwenVisionTeacher(VisionTeacher):
    """A Qwen-VL vision tower; the teacher tokens are the tower's output after the 2x2 patch merger
    (`pooler_output`), one per 2x2 patches, in row-major order of the merged grid: the tokens the
    language model sees.

    Built from the whole VLM checkpoint with only the tower's tensors read (`visual.` or
    `model.visual.`; the language model is never read). Each frame is one image: patchified as
    Qwen's image processor does (2x2 merge groups contiguous, each patch repeated over the temporal
    patch of 2), grid (1, h/p, w/p).
    """

    PREFIXES = ("model.visual.", "visual.")

    def __init__(self, label: str, *, tower_class: str, **settings) -> None:
        super().__init__(label, class_name=tower_class, **settings)

    def load(self, where: str, config, dtype: torch.dtype) -> nn.Module:
        import transformers

        tensors, prefix = load_prefixed_tensors(where, self.PREFIXES)
        cls = getattr(transformers, self.class_name)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:                      # older layouts: initialise, then overwrite
            from contextlib import nullcontext as no_init_weights
        with no_init_weights():
            tower = cls._from_config(config.vision_config, dtype=dtype)
        missing, unexpected = tower.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"the {prefix}* tensors do not fit {self.class_name}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        return tower

    def vision_module(self, model: nn.Module) -> nn.Module:
        for path in ("model.visual", "visual"):
            module = model
            for part in path.split("."):
                module = getattr(module, part, None)
            if isinstance(module, nn.Module):
                return module
        return model

    def token_stride(self, config) -> int:
        return _int(config.patch_size) * int(config.spatial_merge_size)

    def width(self, config) -> int:
        return int(config.out_hidden_size)

    def patch_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        config = model.config
        n, c, h, w = pixels.shape
        p, m, temporal = _int(config.patch_size), int(config.spatial_merge_size), _int(config.temporal_patch_size)
        rows, cols = h // p, w // p
        patches = pixels.reshape(n, c, rows // m, m, p, cols // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
        patches = patches.reshape(n * rows * cols, c * temporal * p * p)
        grid = torch.tensor([[1, rows, cols]] * n, dtype=torch.long, device=pixels.device)
        merged = model(patches, grid_thw=grid).pooler_output
        return merged.reshape(n, (rows // m) * (cols // m), -1)


def _registers(config) -> int:
    return int(getattr(config, "num_register_tokens", 0) or 0)


BUILT_IN_TEACHERS = (
    VisionTeacher(
        "DINOv2", model_types=("dinov2",), class_name="Dinov2Model", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        prefix_tokens=lambda config: 1, has_cls=True,
        names={f"dinov2_vit{size}14": f"facebook/dinov2-{name}"
               for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))}),
    VisionTeacher(
        "DINOv2 with registers", model_types=("dinov2_with_registers",), class_name="Dinov2WithRegistersModel",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, prefix_tokens=lambda config: 1 + _registers(config), has_cls=True,
        names={f"dinov2_vit{size}14_reg": f"facebook/dinov2-with-registers-{name}"
               for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))}),
    VisionTeacher(
        "DINOv3 ViT", model_types=("dinov3_vit",), class_name="DINOv3ViTModel", mean=IMAGENET_MEAN,
        std=IMAGENET_STD, prefix_tokens=lambda config: 1 + _registers(config), has_cls=True, gated=True,
        names={**{f"dinov3_{arch}": f"facebook/dinov3-{arch}-pretrain-lvd1689m"
                  for arch in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")},
               **{f"dinov3_{arch}_sat": f"facebook/dinov3-{arch}-pretrain-sat493m"
                  for arch in ("vitl16", "vit7b16")}}),
    VisionTeacher(
        "SigLIP", model_types=("siglip", "siglip_vision_model"), class_name="SiglipVisionModel", mean=HALF_MEAN,
        std=HALF_STD, resize="square", forward_kwargs={"interpolate_pos_encoding": True},
        vision_attribute="vision_model",
        names={"siglip_so400m_patch14_384": "google/siglip-so400m-patch14-384",
               "siglip_base_patch16_224": "google/siglip-base-patch16-224"}),
    Siglip2Teacher(
        "SigLIP2 NaFlex", model_types=("siglip2", "siglip2_vision_model"), class_name="Siglip2VisionModel",
        mean=HALF_MEAN, std=HALF_STD, resize="naflex", vision_attribute="vision_model",
        names={"siglip2_so400m_patch16_naflex": "google/siglip2-so400m-patch16-naflex",
               "siglip2_base_patch16_naflex": "google/siglip2-base-patch16-naflex"}),
    QwenVisionTeacher(
        "Qwen2.5-VL vision tower", model_types=("qwen2_5_vl", "qwen2_5_vl_vision"),
        tower_class="Qwen2_5_VisionTransformerPretrainedModel", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        names={"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}),
    QwenVisionTeacher(
        "Qwen3-VL vision tower", model_types=("qwen3_vl", "qwen3_vl_vision"), tower_class="Qwen3VLVisionModel",
        mean=HALF_MEAN, std=HALF_STD,
        names={"qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
               "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct"}),
    VisionTeacher(
        "ViT", model_types=("vit",), class_name="ViTModel", mean=HALF_MEAN, std=HALF_STD,
        prefix_tokens=lambda config: 1, has_cls=True, forward_kwargs={"interpolate_pos_encoding": True}),
)

_TEACHERS: dict[str, VisionTeacher] = {}
TEACHER_HUB_IDS: dict[str, str] = {}      # every short name -> hub id


def register_teacher(teacher: VisionTeacher, *, replace: bool = False) -> VisionTeacher:
    """Make `teacher` serve its model types and names. A model type or name already served is an error
    unless replace=True."""
    if not isinstance(teacher, VisionTeacher):
        raise TypeError(f"teacher must be a VisionTeacher, got {type(teacher).__name__}")
    if not replace:
        taken = [t for t in teacher.model_types if t in _TEACHERS] + [n for n in teacher.names if n in TEACHER_HUB_IDS]
        if taken:
            raise ValueError(f"{', '.join(taken)} already served by a registered teacher; pass replace=True to "
                             "replace it")
    for model_type in teacher.model_types:
        _TEACHERS[model_type] = teacher
    TEACHER_HUB_IDS.update(teacher.names)
    return teacher


for _teacher in BUILT_IN_TEACHERS:
    register_teacher(_teacher)


def supported_model_types() -> list[str]:
    return sorted(_TEACHERS)


def teacher_for_model_type(model_type: str | None) -> VisionTeacher | None:
    return _TEACHERS.get(model_type or "")


def teacher_for_module(model: nn.Module) -> VisionTeacher | None:
    config = getattr(model, "config", None)
    return None if config is None else teacher_for_model_type(getattr(config, "model_type", None))


def checkpoint_preprocessing(where: str, default: Preprocessing) -> Preprocessing:
    """The checkpoint's `preprocessor_config.json` image_mean / image_std when it has them, else `default`."""
    from transformers.utils import cached_file

    try:
        path = cached_file(where, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return default
    if path is None:
        return default
    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    mean, std = values.get("image_mean"), values.get("image_std")
    if mean is None or std is None:
        return default
    mean, std = ([v] * 3 if isinstance(v, (int, float)) else v for v in (mean, std))
    try:
        return Preprocessing(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: preprocessor_config.json has an unusable image_mean / image_std ({exc})") from exc
