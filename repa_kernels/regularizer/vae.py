"""Decode the trainer's normalised latents to frames in [0, 1] (docs/contract.md §7).

Each VAE class gets the denormalisation its diffusers pipeline applies before `vae.decode`:

- AutoencoderKLWan (Wan, SanaVideo, Cosmos 2), AutoencoderKLQwenImage (Qwen-Image): z / (1 / std) + mean,
  from the config lists. Qwen-Image's VAE is a video VAE: image latents (B, C, H, W) decode as one frame.
- AutoencoderKLLTXVideo (LTX-Video), AutoencoderKLLTX2Video (LTX-2): z * std / scaling_factor + mean
  (buffers); decode(z, temb) with a zero decode timestep when the VAE is timestep-conditioned.
- AutoencoderKLHunyuanVideo (Kandinsky5, HunyuanVideo), AutoencoderKLHunyuanVideo15 (HunyuanVideo 1.5),
  AutoencoderDC (Sana): z / scaling_factor.
- AutoencoderKLFlux2 (Flux2): the latents Flux2Pipeline gives its transformer are the VAE latents after a
  2x2 patchify (4C channels at half the size) normalised by the VAE's batch-norm running statistics; the
  decode undoes that: z * sqrt(running_var + eps) + running_mean, then the 2x2 unpatchify.
- AutoencoderKL (SD, SDXL, SD3, Flux, PixArt): z * std / scaling_factor + mean when the config has
  latents_mean / latents_std, else z / scaling_factor + shift_factor (the shift when set).
- AutoencoderTiny (any image pipeline given a TAE): z / scaling_factor + shift_factor.

Any other VAE needs a `denormalize(latents) -> latents` callable; among the families' pipelines that is
AutoencoderKLCosmos (Cosmos 1.0), whose pipeline divides by its scheduler's sigma_data, which the VAE does
not know: denormalize=lambda z: z * std[:, :, :F] / sigma_data + mean, with std and mean the config lists
viewed (1, C, -1, 1, 1). Decoding runs under no_grad in the
VAE's dtype. All latent frames are decoded and the needed pixel frames are picked afterwards, except
where a rank needs only the first frames (its window under context parallelism): AutoencoderKLWan decodes
frame by frame with a causal cache, so its first r*k + 1 frames (r the temporal ratio) are exactly the
decode of latent frames 0..k, and `causal_prefix` says how many latent frames to decode. The other
video VAEs decode every frame (LTX-Video's decoder is not causal by default; the rest are not checked).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Denormalize = Callable[[torch.Tensor], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]

# The contract of a `decode=` callable (README, docs/contract.md §7), quoted by every error about it.
DECODE_CONTRACT = ("decode(latents) -> frames: latents as the regularizer is given them, (B, C, F, H, W) for video "
                   "or (B, C, H, W) for images, in the trainer's normalised space (denormalise inside decode); "
                   "frames: a float tensor in [0, 1], (B, F, 3, H, W) for video or (B, 3, H, W) for images, with "
                   "the same B (the layout and range pixels= takes); run under no_grad")

SUPPORTED_VAES = ("AutoencoderKLWan", "AutoencoderKLQwenImage", "AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video",
                  "AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15", "AutoencoderDC", "AutoencoderKLFlux2",
                  "AutoencoderKL", "AutoencoderTiny")
TIMESTEP_CONDITIONED = ("AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video")
ONE_FRAME_VIDEO_VAES = ("AutoencoderKLQwenImage",)   # image latents (B, C, H, W) decode as (B, C, 1, H, W)
# Decoders whose pixel frames r*k + 1 onwards never change frames 0..r*k (frame-by-frame causal decode).
CAUSAL_PREFIX_VAES = ("AutoencoderKLWan",)
# diffusers 0.42's AutoencoderKLHunyuanVideo15 mid-block attention builds its causal mask as (B, S, S) against
# (B, 1, S, S) queries, which fails for batch > 1; one sample at a time gives the same frames.
ONE_SAMPLE_PER_DECODE = ("AutoencoderKLHunyuanVideo15",)


def _class_name(vae) -> str | None:
    names = [cls.__name__ for cls in type(vae).__mro__]
    return next((n for n in names if n in SUPPORTED_VAES), None)


def _channel_view(values, latents: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (latents.dim() - 2)
    return torch.as_tensor(values).to(latents.device, latents.dtype).view(shape)


def latent_channels(vae) -> int | None:
    """Channels of the latents the trainer passes for this VAE (Flux2: its 2x2-patchified latents)."""
    config = getattr(vae, "config", None)
    for key in ("z_dim", "latent_channels"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value * _flux2_patch_area(vae)
    return None


def _flux2_patch_area(vae) -> int:
    if _class_name(vae) != "AutoencoderKLFlux2":
        return 1
    ph, pw = vae.config.patch_size
    return int(ph) * int(pw)


def _flux2_denormalize(vae):
    """Flux2Pipeline before vae.decode: z * sqrt(bn.running_var + eps) + bn.running_mean in the patchified
    space, then the 2x2 unpatchify (Flux2Pipeline._unpatchify_latents)."""
    ph, pw = (int(p) for p in vae.config.patch_size)

    def flux2(z):
        mean = vae.bn.running_mean.to(z.device, z.dtype).view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.to(z.device, z.dtype).view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        z = z * std + mean
        b, c, h, w = z.shape
        z = z.reshape(b, c // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // (ph * pw), h * ph, w * pw)
    return flux2


def denormalizer_for(vae) -> Denormalize | None:
    """The class's own denormalisation (table above), or None for an unknown class."""
    name = _class_name(vae)
    if name is None:
        return None
    config = vae.config
    if name == "AutoencoderKLFlux2":
        return _flux2_denormalize(vae)
    if name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        def wan(z):
            return z / (1.0 / _channel_view(config.latents_std, z)) + _channel_view(config.latents_mean, z)
        return wan
    if name in TIMESTEP_CONDITIONED:
        def ltx(z):
            return z * _channel_view(vae.latents_std, z) / config.scaling_factor + _channel_view(vae.latents_mean, z)
        return ltx
    if name in ("AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15", "AutoencoderDC"):
        return lambda z: z / config.scaling_factor
    if name == "AutoencoderKL" and getattr(config, "latents_mean", None) is not None \
            and getattr(config, "latents_std", None) is not None:
        def kl_mean_std(z):
            std, mean = _channel_view(config.latents_std, z), _channel_view(config.latents_mean, z)
            return z * std / config.scaling_factor + mean
        return kl_mean_std
    shift = getattr(config, "shift_factor", None)   # AutoencoderKL, AutoencoderTiny
    return (lambda z: z / config.scaling_factor + shift) if shift is not None else (lambda z: z / config.scaling_factor)


def _decoded_tensor(out) -> torch.Tensor:
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the decoder returned {type(out).__name__}; expected a tensor, a tuple or an object with "
                        ".sample")
    return out


def drop_vae_encoder(vae: nn.Module) -> bool:
    """crepa_drop_vae_encoder: delete `vae.encoder` (decode-only; the VAE can no longer encode pixels).
    Returns whether there was an encoder to delete (building a second regularizer on the same VAE finds
    it gone already)."""
    if getattr(vae, "encoder", None) is None:
        return False
    del vae.encoder
    return True


class LatentDecoder:
    """Turns normalised latents into frames (B, F, 3, H, W) float32 in [0, 1].

    vae: the trainer's VAE (used unless use_tae). tae: tiny decoder for crepa_use_tae: a diffusers
    AutoencoderTiny (image models) or any module / callable mapping denormalised latents (B, C, F, H, W)
    to frames in [-1, 1] (B, 3, F', H', W') like a diffusers decoder (tensor, tuple or `.sample`).
    denormalize: overrides the class rule. video: whether the denoiser is a video model. decode: a
    callable that does it all (DECODE_CONTRACT), for VAE classes of any other kind; excludes vae, tae
    and denormalize. `with_vae` / `with_decode` give the decoder a trainer sets after construction.
    """

    def __init__(self, *, vae=None, tae=None, denormalize: Denormalize | None = None, use_tae: bool = False,
                 video: bool, use_tae_key: str = "crepa_use_tae", decode: Decode | None = None) -> None:
        if denormalize is not None and not callable(denormalize):
            raise TypeError(f"denormalize must be a callable latents -> latents, got {type(denormalize).__name__}")
        self.video = video
        self.use_tae = use_tae
        self.use_tae_key = use_tae_key
        self.vae, self.tae = vae, tae
        self.custom = decode is not None
        if decode is not None:
            if not callable(decode):
                raise TypeError(f"decode must be a callable ({DECODE_CONTRACT}), got {type(decode).__name__}")
            given = [name for name, value in (("vae", vae), ("tae", tae), ("denormalize", denormalize)) if value
                     is not None]
            if given or use_tae:
                raise ValueError(f"decode= does the whole decode ({DECODE_CONTRACT}); do not pass it with "
                                 f"{', '.join(given) or use_tae_key + '=true'}")
            self.decoder, self.denormalize = decode, None
            self.range_source = f"the frames decode={getattr(decode, '__qualname__', type(decode).__name__)} returned"
            return
        self.range_source = None      # a VAE's frames are clamped to [0, 1] by the decode
        if use_tae:
            if tae is None:
                if video:
                    raise ValueError(
                        f"{use_tae_key}=true needs the tiny video decoder passed as tae=<module>: diffusers 0.42 has "
                        "no video tiny autoencoder, so load one yourself (e.g. TAEHV for Wan / LTX from "
                        "madebyollin/taehv, wrapped to map latents (B, C, F, H, W) to frames in [-1, 1]) or set "
                        f"{use_tae_key}=false to decode with the full VAE")
                raise ValueError(f"{use_tae_key}=true needs tae=<diffusers AutoencoderTiny> (e.g. "
                                 "AutoencoderTiny.from_pretrained('madebyollin/taef1') for Flux, 'madebyollin/taesdxl' "
                                 f"for SDXL) or {use_tae_key}=false")
            self.decoder = tae
            rule = denormalize or denormalizer_for(tae) or (denormalizer_for(vae) if vae is not None else None)
            if rule is None:
                raise ValueError(f"cannot tell how to denormalise latents for the tiny decoder {type(tae).__name__}: "
                                 "pass denormalize=<callable> (or vae= of a supported class: "
                                 f"{', '.join(SUPPORTED_VAES)})")
        else:
            self.decoder = vae
            rule = denormalize
            if vae is not None and rule is None:
                rule = denormalizer_for(vae)
                if rule is None:
                    raise ValueError(f"{type(vae).__name__} is not a VAE class with a known latent normalisation "
                                     f"({', '.join(SUPPORTED_VAES)}); pass denormalize=<callable latents -> latents "
                                     "as the pipeline gives them to vae.decode>")
        self.denormalize = rule

    def _dtype_device(self) -> tuple[torch.dtype, torch.device | None]:
        if isinstance(self.decoder, nn.Module):
            param = next(self.decoder.parameters(), None)
            if param is not None:
                return param.dtype, param.device
        return torch.float32, None

    def with_vae(self, vae, denormalize: Denormalize | None = None) -> "LatentDecoder":
        """This decoder's settings with another VAE (a tiny decoder given at construction stays in use)."""
        return LatentDecoder(vae=vae, tae=self.tae, denormalize=denormalize, use_tae=self.use_tae, video=self.video,
                             use_tae_key=self.use_tae_key)

    def with_decode(self, decode: Decode) -> "LatentDecoder":
        return LatentDecoder(decode=decode, video=self.video, use_tae_key=self.use_tae_key)

    def causal_prefix(self, latents: torch.Tensor):
        """For video latents (B, C, F, H, W) and a frame-by-frame causal VAE (CAUSAL_PREFIX_VAES):
        (the clip's pixel frame count r*(F - 1) + 1, a function pixel frame p -> the latent frames
        ceil(p / r) + 1 whose decode holds frames 0..p). None where only a whole decode is exact."""
        if self.custom or self.use_tae or latents.dim() != 5 or _class_name(self.decoder) not in CAUSAL_PREFIX_VAES:
            return None
        ratio = 2 ** sum(bool(t) for t in self.decoder.config.temperal_downsample)   # each halves time
        return ratio * (latents.shape[2] - 1) + 1, lambda frame: -(-frame // ratio) + 1

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, F, H, W) or (B, C, H, W) -> frames (B, F, 3, H', W') float32 in [0, 1]."""
        if self.decoder is None:
            raise ValueError("latents were given but the regularizer has no VAE: pass vae=<the trainer's VAE> "
                             "(or decode=<callable>) when building it, or set one later with reg.set_vae(vae) / "
                             "reg.set_decoder(decode), or call it with pixels= or teacher_features= instead")
        if self.custom:
            return self._decode_custom(latents)
        expected = latent_channels(self.decoder) if isinstance(self.decoder, nn.Module) else None
        if expected is not None and latents.shape[1] != expected:
            what = ("the latents Flux2Pipeline packs, (B, 4C, H/2, W/2) after its 2x2 patchify"
                    if _class_name(self.decoder) == "AutoencoderKLFlux2"
                    else "the unpacked latents (B, C, F, H, W) / (B, C, H, W)")
            raise ValueError(f"latents have {latents.shape[1]} channels but {type(self.decoder).__name__} expects "
                             f"{expected}: pass {what}")
        dtype, device = self._dtype_device()
        z = latents.detach().to(device=device or latents.device, dtype=dtype)
        z = self.denormalize(z)
        decode = getattr(self.decoder, "decode", self.decoder)
        if _class_name(self.decoder) in ONE_FRAME_VIDEO_VAES and z.dim() == 4:
            z = z.unsqueeze(2)
        if _class_name(self.decoder) in TIMESTEP_CONDITIONED:  # subclasses too, as denormalizer_for
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype) \
                if self.decoder.config.timestep_conditioning else None
            frames = _decoded_tensor(decode(z, temb))
        elif _class_name(self.decoder) in ONE_SAMPLE_PER_DECODE:
            frames = torch.cat([_decoded_tensor(decode(z[i:i + 1])) for i in range(z.shape[0])])
        else:
            frames = _decoded_tensor(decode(z))
        frames = frames.float()
        if frames.dim() == 4:
            frames = frames.unsqueeze(2)
        if frames.dim() != 5 or frames.shape[1] != 3 or frames.shape[0] != latents.shape[0]:
            raise ValueError(f"{type(self.decoder).__name__}.decode returned shape {tuple(frames.shape)} for latents "
                             f"{tuple(latents.shape)}; a VAE's decode must give (B, 3, F, H, W) or (B, 3, H, W) "
                             f"in [-1, 1] with B={latents.shape[0]} (a tensor, a tuple or an object with .sample), "
                             f"as diffusers VAEs do. For a VAE of another kind pass decode=<callable> "
                             f"(reg.set_decoder(decode)): {DECODE_CONTRACT}")
        return (frames.permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp_(0.0, 1.0)

    def _decode_custom(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.decoder(latents.detach())
        name = getattr(self.decoder, "__qualname__", type(self.decoder).__name__)
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
            raise TypeError(f"decode={name} returned {frames.dtype if isinstance(frames, torch.Tensor) else type(frames).__name__}; "
                            f"expected {DECODE_CONTRACT}")
        channels = frames.shape[2] if frames.dim() == 5 else (frames.shape[1] if frames.dim() == 4 else None)
        if channels != 3 or frames.shape[0] != latents.shape[0]:
            hint = (" (that is the (B, 3, F, H, W) layout of a diffusers decoder: permute(0, 2, 1, 3, 4), and map "
                    "[-1, 1] to [0, 1])" if frames.dim() == 5 and frames.shape[1] == 3 and frames.shape[2] != 3
                    else "")
            raise ValueError(f"decode={name} returned shape {tuple(frames.shape)} for latents {tuple(latents.shape)}"
                             f"{hint}; expected {DECODE_CONTRACT}")
        frames = frames.float()
        return frames.unsqueeze(1) if frames.dim() == 4 else frames
