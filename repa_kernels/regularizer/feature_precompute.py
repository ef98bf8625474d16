"""Fill a teacher-feature cache before training, for trainers that know their samples up front.

    report = precompute_features(samples, cache, compute)

`samples` is any iterable of `(key, source)` or `(key, source, token_grid)`: the key the trainer will
pass at training time, and the pixels or latents its own transform produces for that key (or a
zero-argument callable returning them, so that a resumed run does not even load what is cached).
`compute(source, token_grid)` returns the sample's `ComputedFeatures` (the regularizer provides one
that runs its teacher). Keys already in the cache are skipped, so a stopped precompute resumes where it
was: at most the entries of the shard being buffered are computed again (`shard_megabytes` of the cache
bounds that). A tqdm progress bar shows computed and skipped samples.

`image_folder_samples(folder, size=..., crop=...)` is a convenience for image datasets on disk: its
resize/crop rule, the file's size and modification time and the flip are part of each key, so a changed
rule or file misses instead of serving stale features. Video files go through the trainer's own reader
(any iterable of keys and frames works).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from .feature_cache import FeatureCache, canonical_key
from .grids import TokenGrid, parse_token_grid


class ComputedFeatures(NamedTuple):
    """features: (T, h, w, D) of one sample; grid: the student token grid (None if unknown);
    frame_indices: the pixel frames encoded; source_frames: how many pixel frames there were."""

    features: torch.Tensor
    grid: TokenGrid | None
    frame_indices: Sequence[int]
    source_frames: int


Compute = Callable[[torch.Tensor, TokenGrid | None], ComputedFeatures]


@dataclass
class PrecomputeReport:
    computed: int = 0          # samples encoded and stored in this run
    skipped: int = 0           # samples already in the cache
    not_stored: int = 0        # computed but refused by the cache (e.g. float16 overflow; warned)


def _unpack(sample, index: int):
    if not isinstance(sample, (tuple, list)) or len(sample) not in (2, 3):
        raise TypeError(f"sample {index} must be (key, source) or (key, source, token_grid), got "
                        f"{type(sample).__name__}{'' if not isinstance(sample, (tuple, list)) else f' of {len(sample)}'}")
    key, source = sample[0], sample[1]
    grid = parse_token_grid(sample[2]) if len(sample) == 3 and sample[2] is not None else None
    return key, source, grid


def _materialise(source, key) -> torch.Tensor:
    value = source() if callable(source) else source
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"the source of key {key!r} must be a floating-point tensor (pixels in [0, 1] or latents), "
                        f"or a callable returning one; got {type(value).__name__}")
    return value


def precompute_features(samples: Iterable, cache: FeatureCache, compute: Compute, *, progress: bool = True,
                        description: str = "teacher features") -> PrecomputeReport:
    """Compute and store the features of every sample whose key is not cached yet; flushes at the end.

    samples: (key, source) or (key, source, token_grid) items; cache: an open, writable FeatureCache;
    compute: source, token_grid -> ComputedFeatures; progress: show a tqdm bar on stderr."""
    from tqdm import tqdm

    if not isinstance(cache, FeatureCache):
        raise TypeError(f"cache must be a FeatureCache, got {type(cache).__name__}")
    if cache.read_only:
        raise ValueError(f"cache {cache.directory} is read-only; precompute needs read_only=False")
    if not callable(compute):
        raise TypeError(f"compute must be a callable (source, token_grid) -> ComputedFeatures, got {compute!r}")
    report = PrecomputeReport()
    total = len(samples) if hasattr(samples, "__len__") else None
    with tqdm(total=total, desc=description, unit="sample", disable=not progress, file=sys.stderr) as bar:
        for index, sample in enumerate(samples):
            key, source, grid = _unpack(sample, index)
            key = canonical_key(key)
            if cache.contains(key):
                report.skipped += 1
            else:
                result = compute(_materialise(source, key), grid)
                stored = cache.put(key, result.features, grid=result.grid, frame_indices=result.frame_indices,
                                   source_frames=result.source_frames)
                if stored:
                    report.computed += 1
                else:
                    report.not_stored += 1
            bar.update(1)
            bar.set_postfix(computed=report.computed, skipped=report.skipped, refresh=False)
    cache.flush()
    return report


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROP_RULES = ("center", "resize", "none")


def transform_rule(size: int | None, crop: str) -> str:
    """The name of the resize/crop rule, part of each key (bump the version when the code changes)."""
    if crop == "none":
        return "original-size/v1"
    if crop == "resize":
        return f"resize-{size}x{size}-bicubic/v1"
    return f"shorter-side-{size}-bicubic/center-crop-{size}x{size}/v1"


def load_image(path: Path, size: int | None, crop: str, flip: bool) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] after the rule of `transform_rule(size, crop)` and the flip."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if crop == "resize":
            image = image.resize((size, size), Image.BICUBIC)
        elif crop == "center":
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = data.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255.0)
    return pixels.flip(-1) if flip else pixels


def image_folder_samples(folder: str | os.PathLike, *, size: int | None, crop: str = "center",
                         flips: Sequence[bool] = (False,),
                         extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[tuple[dict, Callable[[], torch.Tensor]]]:
    """(key, loader) for every image under `folder` (recursively, sorted), one per value in `flips`.

    size / crop: "center" resizes the shorter side to `size` and crops the centre `size` x `size`;
    "resize" resizes to `size` x `size`; "none" keeps the image as is (size must be None). The key is
    {"image": path relative to folder, "bytes", "mtime_ns", "transform": the rule's name, "flip"};
    the trainer's training-time key must be built the same way (`image_sample_key`). A flipped image's
    features are not the flipped features, so each flip is its own entry."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist or is not a folder")
    if crop not in CROP_RULES:
        raise ValueError(f"crop must be one of {', '.join(CROP_RULES)}, got {crop!r}")
    if crop == "none":
        if size is not None:
            raise ValueError(f"crop='none' keeps the image size; size must be None, got {size!r}")
    elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer for crop={crop!r}, got {size!r}")
    if not flips or not all(isinstance(f, bool) for f in flips):
        raise ValueError(f"flips must be a non-empty sequence of bools, got {flips!r}")
    suffixes = tuple(e.lower() for e in extensions)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    samples = []
    for path in paths:
        for flip in flips:
            samples.append((image_sample_key(folder, path, size=size, crop=crop, flip=flip),
                            lambda path=path, flip=flip: load_image(path, size, crop, flip)))
    return samples


def image_sample_key(folder: str | os.PathLike, path: str | os.PathLike, *, size: int | None, crop: str,
                     flip: bool) -> dict:
    """The key `image_folder_samples` gives the image at `path` (for the trainer's training-time call)."""
    folder = Path(folder)
    path = folder / path   # an absolute path stays as it is
    stat = path.stat()
    return {"image": path.relative_to(folder).as_posix(), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transform": transform_rule(size, crop), "flip": bool(flip)}

