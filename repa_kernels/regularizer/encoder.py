"""The frozen teacher encoder (docs/contract.md §7, docs/teachers.md): any vision model with a declared adapter.

`crepa_encoder` / `urepa_model` accept a short name (dinov2_vitg14, dinov3_vitl16, siglip2_so400m_patch16_naflex,
qwen2.5-vl-7b, ...: `ENCODER_HUB_IDS`), a Hugging Face hub id, or a local directory saved with
`save_pretrained`. The checkpoint's `config.model_type` picks the adapter; weights are loaded from
safetensors only and never with remote code (Qwen-VL: only the vision tower's tensors of the VLM).

`FrozenEncoder.encode(frames)`: frames (N, 3, h, w) in [0, 1] with h, w multiples of the token stride
(`patch_size`: pixels per teacher token side) -> patch tokens (N, h/s * w/s, D) of the last layer (CLS,
register, pooled and padding tokens removed), or the CLS token (N, 1, D) where the teacher has one;
float32, no grad. `input_size(h, w, S)` is the teacher's own resize rule for a frame of h x w pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import ENCODER_DTYPES as ENCODER_DTYPE_NAMES, ENCODER_TOKENS
from .grids import teacher_input_size
from .vision_teachers import (IMAGENET_MEAN, IMAGENET_STD, TEACHER_HUB_IDS, Preprocessing, VisionTeacher,
                              checkpoint_preprocessing, supported_model_types, teacher_for_model_type,
                              teacher_for_module)

ENCODER_HUB_IDS = TEACHER_HUB_IDS            # short name -> hub id, every registered teacher's names
ENCODER_DTYPES = {name: getattr(torch, name) for name in ENCODER_DTYPE_NAMES}

__all__ = ["ENCODER_HUB_IDS", "EncoderLoadError", "FrozenEncoder", "IMAGENET_MEAN", "IMAGENET_STD",
           "resolve_encoder_source"]


class EncoderLoadError(OSError):
    """The encoder weights cannot be found or are not a model of a registered teacher."""


def resolve_encoder_source(name: str) -> str:
    """Short name -> hub id; a hub id or local path is returned unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder must be a non-empty name, hub id or local path, got {name!r}")
    return ENCODER_HUB_IDS.get(name, name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _supported() -> str:
    return ", ".join(supported_model_types())


def _gated_hint(source: str, error: Exception) -> str:
    """Said when the repository may be gated (DINOv3's are): a token and the licence are needed."""
    gated_ids = {hub_id for teacher in _registered_teachers() if teacher.gated for hub_id in teacher.names.values()}
    text = str(error).lower()
    if source in gated_ids or source.startswith("facebook/dinov3") or "gated" in text or "401" in text:
        return (f" The hub repository {source} may be gated: accept its licence on its Hugging Face page, then log "
                "in (`huggingface-cli login`) or set HF_TOKEN before the download.")
    return ""


def _registered_teachers() -> list[VisionTeacher]:
    seen = {}
    for model_type in supported_model_types():
        teacher = teacher_for_model_type(model_type)
        seen[id(teacher)] = teacher
    return list(seen.values())


def _load_pretrained(name: str, dtype: torch.dtype) -> tuple[nn.Module, Preprocessing]:
    from transformers import AutoConfig

    source = resolve_encoder_source(name)
    local = Path(source).expanduser()
    is_local = local.is_dir()
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
    if looks_like_path and not is_local:
        raise EncoderLoadError(f"encoder {name!r}: the directory {source} does not exist")
    where = str(local) if is_local else source
    how = (f"Download it on a machine with network access (e.g. `huggingface-cli download {source} --local-dir "
           f"<dir>` or `transformers.AutoModel.from_pretrained({source!r}).save_pretrained(<dir>)`, "
           "which writes safetensors), copy the directory here and pass its path as the encoder "
           "(crepa_encoder / urepa_model), or pre-fill the Hugging Face cache and keep HF_HUB_OFFLINE=1")
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        state = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if _offline() and not is_local else \
            "not loadable"
        raise EncoderLoadError(f"encoder {name!r} ({where}) is {state} ({str(exc).strip().rstrip('.')}). "
                               f"{how}.{'' if is_local else _gated_hint(source, exc)}") from exc
    teacher = teacher_for_model_type(config.model_type)
    if teacher is None:
        raise EncoderLoadError(f"encoder {name!r} ({where}) is a {config.model_type!r} model, which no registered "
                               f"teacher serves (supported model types: {_supported()}); add one with "
                               "repa_kernels.regularizer.register_teacher (README: Teachers)")
    try:
        model = teacher.load(where, config, dtype)
        preprocessing = checkpoint_preprocessing(where, teacher.preprocessing)
    except (OSError, ValueError) as exc:
        raise EncoderLoadError(f"encoder {name!r} ({where}): cannot load the {teacher.label} from safetensors "
                               f"weights ({str(exc).strip().rstrip('.')}). {how}") from exc
    return model, preprocessing


class FrozenEncoder(nn.Module):
    """A frozen vision model of a registered teacher, producing teacher tokens.

    model: the transformers model (a whole Qwen-VL model gives its vision tower; eval, requires_grad
    off); dtype: its compute dtype; frames_batch_size: frames per call (<= 0: all at once); tokens:
    "patch" or "cls" (teachers with a CLS token only); preprocessing: mean / std (default: the
    teacher's).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float32, frames_batch_size: int = -1,
                 tokens: str = "patch", preprocessing: Preprocessing | None = None) -> None:
        super().__init__()
        teacher = teacher_for_module(model) if isinstance(model, nn.Module) else None
        if teacher is None:
            raise TypeError(f"the encoder must be a transformers vision model of a registered teacher (model types: "
                            f"{_supported()}; e.g. Dinov2Model, DINOv3ViTModel, Siglip2VisionModel), got "
                            f"{type(model).__name__}")
        if tokens not in ENCODER_TOKENS:
            raise ValueError(f"tokens must be {' or '.join(map(repr, ENCODER_TOKENS))}, got {tokens!r}")
        if tokens == "cls" and not teacher.has_cls:
            raise ValueError(f"tokens='cls' needs a teacher with a CLS token; the {teacher.label} has none (use "
                             "'patch')")
        model = teacher.vision_module(model)
        self.teacher = teacher
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.frames_batch_size = int(frames_batch_size)
        self.tokens = tokens
        config = model.config
        self.patch_size = teacher.token_stride(config)
        self.hidden_size = teacher.width(config)
        self.num_prefix_tokens = teacher.prefix_tokens(config)
        self.resize = teacher.resize
        self.preprocessing = preprocessing or teacher.preprocessing
        self.register_buffer("mean", torch.tensor(self.preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.preprocessing.std).view(1, 3, 1, 1), persistent=False)
        self.frames_encoded = 0   # running count, for tests and the end-to-end benchmark

    @classmethod
    def load(cls, encoder: str | nn.Module, *, dtype: str | torch.dtype = "float32", frames_batch_size: int = -1,
             tokens: str = "patch") -> "FrozenEncoder":
        """From a name / hub id / local path, or an already built module or FrozenEncoder (whose model and
        preprocessing are wrapped again with these settings: the caller's dtype, batching and tokens win)."""
        if isinstance(dtype, str):
            if dtype not in ENCODER_DTYPES:
                raise ValueError(f"encoder dtype must be one of {', '.join(ENCODER_DTYPES)}, got {dtype!r}")
            dtype = ENCODER_DTYPES[dtype]
        preprocessing = None
        if isinstance(encoder, FrozenEncoder):
            encoder, preprocessing = encoder.model, encoder.preprocessing
        if not isinstance(encoder, nn.Module):
            encoder, preprocessing = _load_pretrained(encoder, dtype)
        return cls(encoder, dtype=dtype, frames_batch_size=frames_batch_size, tokens=tokens,
                   preprocessing=preprocessing)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.model.eval()        # frozen: dropout / drop-path stay off whatever the trainer does
        return self

    def input_size(self, height: int, width: int, image_size: int) -> tuple[int, int]:
        """The encoder input (h, w) for frames of height x width pixels at the configured size S, by the
        teacher's resize rule; both multiples of `patch_size`."""
        return teacher_input_size(self.resize, height, width, image_size, self.patch_size)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, h, w) in [0, 1] -> (N, h/s * w/s, D) patch tokens, or (N, 1, D) CLS; float32."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (N, 3, h, w), got {tuple(frames.shape)}")
        h, w = frames.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"frame sides {h}x{w} must be multiples of the encoder patch size {self.patch_size}")
        device = self.mean.device
        step = frames.shape[0] if self.frames_batch_size <= 0 else self.frames_batch_size
        outputs = []
        for start in range(0, frames.shape[0], step):
            chunk = frames[start:start + step].to(device=device, dtype=torch.float32)
            chunk = ((chunk - self.mean) / self.std).to(self.dtype)
            if self.tokens == "patch" and self.teacher.patch_tokens is not None:
                hidden = self.teacher.patch_tokens(self.model, chunk)     # its own forward and layout
            else:                                                          # prefix tokens, then patches
                hidden = self.model(pixel_values=chunk, **self.teacher.forward_kwargs).last_hidden_state
                hidden = hidden[:, :1] if self.tokens == "cls" else hidden[:, self.num_prefix_tokens:]
            outputs.append(hidden.float())
            self.frames_encoded += chunk.shape[0]
        return torch.cat(outputs)
