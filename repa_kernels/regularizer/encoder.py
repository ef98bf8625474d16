"""The frozen DINOv2 teacher encoder (SPEC §7).

`crepa_encoder` / `urepa_model` accept a short name (dinov2_vits14 / vitb14 / vitl14 / vitg14, plus
`_reg` variants with registers), a Hugging Face hub id, or a local directory saved with
`save_pretrained`. Weights are loaded from safetensors only and never with remote code.

`FrozenEncoder.encode(frames)`: frames (N, 3, h, w) in [0, 1] with h, w multiples of the patch size ->
patch tokens (N, h/p * w/p, D) of the last layer after the final norm (CLS and register tokens removed),
or the CLS token (N, 1, D); float32, no grad.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import ENCODER_DTYPES as ENCODER_DTYPE_NAMES, ENCODER_TOKENS

ENCODER_HUB_IDS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
    "dinov2_vitg14_reg": "facebook/dinov2-with-registers-giant",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_DTYPES = {name: getattr(torch, name) for name in ENCODER_DTYPE_NAMES}
_DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class EncoderLoadError(OSError):
    """The encoder weights cannot be found or are not a DINOv2 model."""


def resolve_encoder_source(name: str) -> str:
    """Short name -> hub id; a hub id or local path is returned unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder must be a non-empty name, hub id or local path, got {name!r}")
    return ENCODER_HUB_IDS.get(name, name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _load_pretrained(name: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

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
                               f"{how}") from exc
    if config.model_type not in _DINOV2_MODEL_TYPES:
        raise EncoderLoadError(f"encoder {name!r} ({where}) is a {config.model_type!r} model; the teacher must be "
                               f"DINOv2 ({' or '.join(_DINOV2_MODEL_TYPES)})")
    cls = Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model
    try:
        return cls.from_pretrained(where, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise EncoderLoadError(f"encoder {name!r} ({where}): cannot load safetensors weights "
                               f"({str(exc).strip().rstrip('.')}). {how}") from exc


class FrozenEncoder(nn.Module):
    """A frozen DINOv2 (`Dinov2Model` / `Dinov2WithRegistersModel`) producing teacher tokens.

    model: the transformers model (eval, requires_grad off); dtype: its compute dtype;
    frames_batch_size: frames per call (<= 0: all at once); tokens: "patch" or "cls".
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float32, frames_batch_size: int = -1,
                 tokens: str = "patch") -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in _DINOV2_MODEL_TYPES:
            raise TypeError(f"the encoder must be a transformers Dinov2Model or Dinov2WithRegistersModel, got "
                            f"{type(model).__name__}")
        if tokens not in ENCODER_TOKENS:
            raise ValueError(f"tokens must be {' or '.join(map(repr, ENCODER_TOKENS))}, got {tokens!r}")
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.frames_batch_size = int(frames_batch_size)
        self.tokens = tokens
        patch = config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.hidden_size = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.frames_encoded = 0   # running count, for tests and the end-to-end benchmark

    @classmethod
    def load(cls, encoder: str | nn.Module, *, dtype: str | torch.dtype = "float32", frames_batch_size: int = -1,
             tokens: str = "patch") -> "FrozenEncoder":
        """From a name / hub id / local path, or an already built Dinov2 module or FrozenEncoder (whose
        model is wrapped again with these settings: the caller's dtype, batching and tokens win)."""
        if isinstance(dtype, str):
            if dtype not in ENCODER_DTYPES:
                raise ValueError(f"encoder dtype must be one of {', '.join(ENCODER_DTYPES)}, got {dtype!r}")
            dtype = ENCODER_DTYPES[dtype]
        if isinstance(encoder, FrozenEncoder):
            encoder = encoder.model
        model = encoder if isinstance(encoder, nn.Module) else _load_pretrained(encoder, dtype)
        return cls(model, dtype=dtype, frames_batch_size=frames_batch_size, tokens=tokens)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.model.eval()        # frozen: dropout / drop-path stay off whatever the trainer does
        return self

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, h, w) in [0, 1] -> (N, h/p * w/p, D) patch tokens, or (N, 1, D) CLS; float32."""
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
            hidden = self.model(pixel_values=chunk).last_hidden_state
            hidden = hidden[:, :1] if self.tokens == "cls" else hidden[:, self.num_prefix_tokens:]
            outputs.append(hidden.float())
            self.frames_encoded += chunk.shape[0]
        return torch.cat(outputs)
