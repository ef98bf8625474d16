"""An encoder teacher that looks in a feature cache before it decodes or encodes (feature_cache.py).

    reg = CrepaRegularizer.from_config(cfg, transformer=transformer, vae=vae, max_train_steps=...,
                                       feature_cache="/data/crepa-cache", feature_cache_dtype="bfloat16")
    reg_loss, logs = reg(latents=clean_latents, cache_keys=batch["keys"], step=global_step)

Per sample of the batch: a valid entry for its key whose grid fits the call is a hit (loaded, nothing
decoded or encoded); the misses are decoded (latents) and encoded together, as a smaller batch, and
written. A call without `cache_keys` runs the teacher as if there were no cache. Hits give the
features rounded to the storage dtype; misses the live float32 features (what they would be without a
cache); the two differ by that rounding only.

The identity (feature_cache.CacheIdentity) is built from the teacher itself: the encoder's name and
weight hash, dtype, image size, token mode, patch size, resize rule and mean / std; for `latents=`
calls also the decoder (its class, weight hash and the config values its denormalisation reads, or the
`denormalize` callable's name), so pixels and latents of one sample are separate entries and a
different VAE misses. The hashes are taken when the first keyed call of each kind arrives.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Iterable

import torch
from torch import nn

from .feature_cache import STORAGE_DTYPES, CacheIdentity, FeatureCache, weights_fingerprint
from .feature_precompute import ComputedFeatures, PrecomputeReport, precompute_features
from .grids import TokenGrid, select_frames

# config values the class denormalisation rules of vae.py read: they change the pixels, like weights
_DENORMALIZATION_CONFIG = ("latents_mean", "latents_std", "scaling_factor", "shift_factor")


def decoder_source(decoder) -> str:
    """The `pixel_source` of a LatentDecoder: what turns latents into pixels."""
    module = decoder.decoder
    if module is None:
        return "no-decoder"
    if isinstance(module, nn.Module):
        name = f"{type(module).__name__}:{weights_fingerprint(module)}"
    else:
        name = f"callable:{getattr(module, '__qualname__', type(module).__name__)}"
    config = getattr(module, "config", None)
    values = {key: getattr(config, key, None) for key in _DENORMALIZATION_CONFIG if getattr(config, key, None)
              is not None}
    rule = getattr(decoder.denormalize, "__qualname__", type(decoder.denormalize).__name__)
    return f"{name}|denormalize:{rule}|{json.dumps(values, sort_keys=True, default=str)}"


class CachedTeacher:
    """Wraps an EncoderTeacher; `tokens(inputs, captured, grid, device)` as every teacher.

    teacher: the EncoderTeacher; root: the cache root folder; storage_dtype: "bfloat16" (default),
    "float16" or "float32"; shard_megabytes, verify: see FeatureCache. The identity names the encoder
    by the teacher's description (e.g. "encoder dinov2_vitg14"); its weight hash is what tells encoders
    apart."""

    def __init__(self, teacher, root: str | os.PathLike, *, storage_dtype: str = "bfloat16",
                 shard_megabytes: float | None = None, verify: bool = True) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise TypeError(f"feature_cache must be a folder path (str or os.PathLike), got {root!r}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"feature_cache_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
        self.teacher = teacher
        self.root = root
        self.storage_dtype = storage_dtype
        self.encoder_name = teacher.description
        self.options = {"verify": verify} | ({} if shard_megabytes is None else {"shard_megabytes": shard_megabytes})
        self._caches: dict[str, FeatureCache] = {}
        self._warned_window_misses = False

    # the regularizer reads these from whichever teacher it holds
    @property
    def encoder(self):
        return self.teacher.encoder

    @property
    def decoder(self):
        return self.teacher.decoder

    @property
    def width(self) -> int:
        return self.teacher.width

    @property
    def description(self) -> str:
        return f"{self.teacher.description}, feature cache {self.root}"

    @property
    def frames_decoded(self) -> int:
        return self.teacher.frames_decoded

    @property
    def frames_encoded(self) -> int:
        return self.teacher.frames_encoded

    def follow(self, device: torch.device) -> None:
        self.teacher.follow(device)

    @property
    def input_ranges(self):
        return self.teacher.input_ranges

    def set_decoder(self, decoder) -> None:
        """Another decoder: latents now decode to other pixels, so the latents cache (whose identity
        names the decoder) is written out and reopened under the new identity at its next use."""
        latents_cache = self._caches.pop("latents", None)
        if latents_cache is not None:
            latents_cache.close()
        self.teacher.set_decoder(decoder)

    def cache(self, source: str) -> FeatureCache:
        """The cache of `source` ("pixels" or "latents"), opened on first use."""
        cache = self._caches.get(source)
        if cache is None:
            encoder = self.teacher.encoder
            identity = CacheIdentity(
                encoder=self.encoder_name, encoder_weights=weights_fingerprint(encoder.model),
                encoder_dtype=str(encoder.dtype).removeprefix("torch."), image_size=self.teacher.image_size,
                tokens=encoder.tokens, patch_size=encoder.patch_size, storage_dtype=self.storage_dtype,
                pixel_source="pixels" if source == "pixels" else decoder_source(self.teacher.decoder),
                resize=encoder.resize, normalization=f"mean={list(encoder.preprocessing.mean)} "
                                                     f"std={list(encoder.preprocessing.std)}")
            cache = self._caches[source] = FeatureCache(self.root, identity, **self.options)
        return cache

    def flush(self) -> None:
        for cache in self._caches.values():
            cache.flush()

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()

    def tokens(self, inputs, captured, grid: TokenGrid, device: torch.device,
               frames: tuple[int, int] | None = None) -> torch.Tensor:
        """frames: the student frames [low, high) only (a rank's window under context parallelism): hits
        give those frames of their entry; misses compute only those and are not stored (an entry holds
        the whole clip: fill the cache before such a run with precompute_teacher_features)."""
        keys = inputs.cache_keys
        if keys is None or inputs.teacher_features is not None:
            return self.teacher.tokens(inputs, captured, grid, device, frames)
        source = "pixels" if inputs.pixels is not None else "latents"
        cache = self.cache(source)
        entries = [cache.get(key, grid) for key in keys]
        missing = [index for index, entry in enumerate(entries) if entry is None]
        window = slice(*frames) if frames else slice(None)
        if not missing:
            return torch.stack([entry.features[window] for entry in entries]).to(device=device, dtype=torch.float32)
        self.follow(device)
        tensor = getattr(inputs, source)
        subset = tensor if len(missing) == len(keys) else tensor[missing]
        if frames is not None:
            computed = (self.teacher.encode_frames(subset, grid.frames, source="pixels", window=frames)
                        if source == "pixels" else self.teacher.from_latents(subset, grid.frames, window=frames))
            self._warn_window_misses(len(missing))
        else:
            decoded = subset if source == "pixels" else self.teacher.decode(subset)
            range_source = "pixels" if source == "pixels" else self.teacher.decoder.range_source
            computed = self.teacher.encode_frames(decoded, grid.frames, source=range_source)
            indices = select_frames(decoded.shape[1], grid.frames)
            for row, index in enumerate(missing):
                cache.put(keys[index], computed[row], grid=grid, frame_indices=indices,
                          source_frames=decoded.shape[1])
        computed = computed.to(device)
        if len(missing) == len(keys):
            return computed
        rows = iter(computed)
        return torch.stack([next(rows) if entry is None else entry.features[window].to(device=device,
                                                                                        dtype=torch.float32)
                            for entry in entries])

    def _warn_window_misses(self, count: int) -> None:
        if not self._warned_window_misses:
            self._warned_window_misses = True
            warnings.warn(f"feature cache {self.root}: {count} sample(s) missed under context parallelism; each rank "
                          "computes only its window of frames, which is not a whole entry, so misses are not stored. "
                          "Fill the cache first with reg.precompute_teacher_features(...)", UserWarning, stacklevel=4)

    def precompute(self, samples: Iterable, *, source: str, grid_of_latents, image_model: bool,
                   progress: bool = True) -> PrecomputeReport:
        """Fill the cache of `source` from (key, tensor[, token_grid]) samples of single examples (no batch
        dimension); grid_of_latents(latents with a batch dimension) -> the student TokenGrid, or None
        when only the forward knows it (then stored without a grid, one frame); image_model: one frame
        per sample, so pixels need no grid."""
        if source not in ("latents", "pixels"):
            raise ValueError(f"source must be 'latents' or 'pixels', got {source!r}")
        device = self.teacher.encoder.mean.device

        def compute(tensor: torch.Tensor, token_grid: TokenGrid | None) -> ComputedFeatures:
            batch = tensor.unsqueeze(0)
            if source == "latents":
                grid = token_grid or grid_of_latents(batch)
                frames = self.teacher.decode(batch)
            else:
                frames = batch.unsqueeze(1) if batch.dim() == 4 else batch
                grid = token_grid
                if grid is None and not image_model:
                    raise ValueError("precomputing from video pixels needs each sample's student token grid: "
                                     "give (key, pixels, (frames, rows, columns)) items, or precompute from latents")
            frames_used = grid.frames if grid is not None else 1
            features = self.teacher.encode_frames(frames.to(device), frames_used)[0]
            return ComputedFeatures(features, grid, select_frames(frames.shape[1], frames_used), frames.shape[1])

        return precompute_features(samples, self.cache(source), compute, progress=progress,
                                   description=f"teacher features ({source})")
