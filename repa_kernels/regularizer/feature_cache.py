"""On-disk cache of teacher features: decode and encode each training sample once, not every step.

Fine-tuning runs see the same few hundred clips for many epochs; on the tiny Wan the VAE decode and the
encoder are ~250 ms of a ~270 ms CREPA step, and at real sizes (DINOv2-g at 518 px, ~3.5 TFLOP per frame)
they dwarf the loss kernel. The trainer gives a key per sample (its sample id plus whatever makes the
pixels differ: crop box, flip, resolution bucket, frame indices); a hit loads the features and nothing is
decoded or encoded.

Identity. Everything that changes the features for a given key forms a `CacheIdentity`: the encoder
(name and a SHA-256 of its weights), its compute dtype, the image size, the token mode, its patch size
(token stride), its resize rule and normalisation (mean / std), the frame-selection rule, the
preprocessing version, where the pixels come from (given pixels, or a named decoder with the hash of its
weights) and the storage dtype. Each identity lives in its own
folder `<root>/<identity digest>/`, so one root can hold caches for several encoders and a cache
written for one is never served for another: changing the encoder, size or dtype simply misses.

Layout and writes. `identity.json` plus `shards/*.safetensors`. Each writer (process) buffers its new
entries and writes them as a shard of its own (a temporary file, fsync, then `os.replace`, which is
atomic on POSIX file systems), so several data-parallel ranks can write at once and a reader only ever
sees whole shards; a killed writer leaves at most a `*.tmp` file, which readers ignore (and
`repa-kernels cache` reports). The index is the union of the shards' safetensors headers: each shard's
`__metadata__` lists its entries (key, token grid, frame indices, CRC-32 of the stored bytes), so an
index can never disagree with the data it describes. Another rank's new shards are picked up on a miss
(when the shard folder's modification time has changed).

Reads. Shards are memory-mapped (private mapping); an entry is a view of the mapping until the caller
converts it. Every read checks the entry's bounds, dtype, shape and CRC-32 (zlib's, measured 2.4 GB per
CPU second on this project's Xeon: ~37 ms for a Wan-480p clip of 21 x 1369 x 1536 bf16 tokens, 88 MB,
against seconds of decode and encode); a failed
check is a warning and a miss (the caller recomputes and writes a fresh entry, which later reads
prefer), never a crash and never wrong features. A shard must not be modified while it is mapped (the
cache itself never does: shards are written once).

Grids. Each entry keeps the student token grid (frames, rows, columns) of the call that wrote it (None
when precomputed without one) and the pixel frame indices the teacher used. A hit whose grid disagrees
with the call's is a miss with a warning (typically a resolution bucket missing from the key); an entry
without a grid must at least have the call's frame count and the teacher grid the call's aspect ratio
gives.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import mmap
import os
import socket
import struct
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .grids import RESIZE_RULES, TokenGrid, teacher_input_size

FORMAT = "repa_kernels.teacher_feature_cache"
FORMAT_VERSION = 1
# The teacher's frame rule (grids.select_frames) and the fixed part of its preprocessing
# (teacher.EncoderTeacher.encode_frames: bilinear antialiased resize to the size of the teacher's resize
# rule, clamp to [0, 1], then the teacher's mean / std, which `normalization` records). Bump a version
# when its code changes: old entries then miss instead of serving features the current code would not
# compute.
FRAME_SELECTION = "nearest-on-even-spacing/1"
PREPROCESSING = "bilinear-antialias-clamp01/1"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TOKEN_MODES = ("patch", "cls")
DEFAULT_SHARD_MEGABYTES = 256
SHARD_SUFFIX = ".safetensors"
TEMPORARY_SUFFIX = ".tmp"


class FeatureCacheError(RuntimeError):
    """The cache cannot be used as asked (a folder that is not a cache, an identity mismatch)."""


def _non_empty_string(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that changes the features for a given key. Two caches share entries only when equal.

    encoder: its name (e.g. "dinov2_vitg14"); encoder_weights: SHA-256 of its weights
    (`weights_fingerprint`); encoder_dtype: its compute dtype; image_size: S of `*_encoder_image_size`;
    tokens: "patch" or "cls"; patch_size: the encoder's patch size (token stride); storage_dtype:
    "bfloat16", "float16" or "float32"; pixel_source: "pixels" when the trainer gives pixels, else the
    decoder ("AutoencoderKLWan:<sha256>", a tiny decoder likewise); resize: the teacher's input-size
    rule (grids.teacher_input_size: "area", "square" or "naflex"); normalization: its mean and std as
    text; frame_selection and preprocessing: versions of the teacher's rules.
    """

    encoder: str
    encoder_weights: str
    encoder_dtype: str
    image_size: int
    tokens: str
    patch_size: int
    storage_dtype: str
    pixel_source: str = "pixels"
    resize: str = "area"
    normalization: str = "imagenet"
    frame_selection: str = FRAME_SELECTION
    preprocessing: str = PREPROCESSING
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("encoder", "encoder_weights", "encoder_dtype", "pixel_source", "resize", "normalization",
                     "frame_selection", "preprocessing"):
            _non_empty_string(name, getattr(self, name))
        for name in ("image_size", "patch_size", "format_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_RULES)}, got {self.resize!r}")
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {self.tokens!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got "
                             f"{self.storage_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CacheIdentity":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FeatureCacheError(f"cache identity has unknown fields {unknown}; written by a newer "
                                    "repa_kernels?")
        return cls(**values)

    @property
    def digest(self) -> str:
        """16 hex digits of the SHA-256 of the canonical JSON: the name of the identity's folder."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def storage_torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.storage_dtype]


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the module's state_dict (names, dtypes, shapes and bytes, in name order).

    Computed when a cache is opened (not memoised: weights loaded into the same module later must
    change it); SHA-256 measured 1.2 GB per CPU second here (with SHA-NI), so ~3.6 s for DINOv2-g's
    4.4 GB in fp32, milliseconds for the tiny test models."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"weights_fingerprint needs an nn.Module, got {type(module).__name__}")
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def canonical_key(key: object) -> str:
    """The trainer's key as one string: a non-empty str as is; a dict / list / tuple / number as
    canonical JSON (sorted keys), so {"id": 3, "flip": True} and {"flip": True, "id": 3} are one key."""
    if isinstance(key, str):
        if not key:
            raise ValueError("a cache key must not be empty")
        return key
    if isinstance(key, (Mapping, list, tuple, int, float)) and key is not None:
        try:
            return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a cache key must be a string or JSON-serialisable data (dict, list, numbers, "
                            f"strings), got {key!r}: {exc}") from exc
    raise TypeError(f"a cache key must be a string or a dict / list / tuple of JSON values (the sample id plus "
                    f"crop box, flip, resolution bucket, frame indices), got {type(key).__name__}")


def tensor_name(key: str) -> str:
    return "f" + hashlib.sha256(key.encode()).hexdigest()[:40]


class CacheEntry(NamedTuple):
    """features: (T, h, w, D) in the storage dtype (a view of the memory-mapped shard, or of the writer's
    buffer); grid: the student token grid it was written for (None if unknown); frame_indices: the
    pixel frames the teacher encoded; source_frames: how many pixel frames there were."""

    features: torch.Tensor
    grid: TokenGrid | None
    frame_indices: tuple[int, ...]
    source_frames: int


class _Location(NamedTuple):
    shard: Path
    begin: int          # absolute byte offsets in the shard file
    end: int
    dtype: str
    shape: tuple[int, ...]
    meta: dict


class ShardError(ValueError):
    """A shard file that cannot be read (truncated header, bad JSON, not a cache shard)."""


def read_shard_header(path: Path, size: int | None = None) -> tuple[dict[str, Any], dict[str, _Location]]:
    """(shard metadata, {tensor name: location}) from a safetensors header; ShardError if unreadable.

    Entries whose bytes lie past the end of the file (a truncated shard) are still listed: the read
    of that entry fails its bounds check and is a miss, the shard's other entries stay usable."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size if size is None else size
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise ShardError(f"{path.name}: {len(prefix)} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8 or length > 1 << 30:
                raise ShardError(f"{path.name}: header of {length} bytes does not fit in {size} bytes")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path.name}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise ShardError(f"{path.name}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT:
        raise ShardError(f"{path.name}: not a {FORMAT} shard")
    try:
        entries = json.loads(metadata["entries"])
        base = 8 + length
        locations = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            locations[name] = _Location(path, base + int(begin), base + int(end), str(info["dtype"]),
                                        tuple(int(s) for s in info["shape"]), dict(entries[name]))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path.name}: malformed entry list ({type(exc).__name__}: {exc})") from exc
    return metadata, locations


def expected_teacher_grid(grid: TokenGrid, identity: "CacheIdentity") -> tuple[int, int, int]:
    """The teacher grid (T, h, w) a call with student grid `grid` produces: the teacher's resize rule
    applied to frames with the student grid's aspect ratio (the pixels' aspect ratio)."""
    if identity.tokens == "cls":
        return grid.frames, 1, 1
    patch_size = identity.patch_size
    height, width = teacher_input_size(identity.resize, grid.height, grid.width, identity.image_size, patch_size)
    return grid.frames, height // patch_size, width // patch_size


class FeatureCache:
    """One identity's folder under `root`: look up, store and flush teacher features by key.

    root: the cache root (created if missing); identity: see CacheIdentity; shard_megabytes: a writer
    writes its buffered entries as one shard when they reach this size (and on flush / close / exit);
    verify: check each entry's CRC-32 on read (on by default; a corrupted entry is a miss, not wrong
    features); read_only: never write (e.g. an evaluation job), `put` then does nothing.
    """

    def __init__(self, root: str | os.PathLike, identity: CacheIdentity, *,
                 shard_megabytes: float = DEFAULT_SHARD_MEGABYTES, verify: bool = True,
                 read_only: bool = False) -> None:
        if not isinstance(identity, CacheIdentity):
            raise TypeError(f"identity must be a CacheIdentity, got {type(identity).__name__}")
        if isinstance(shard_megabytes, bool) or not isinstance(shard_megabytes, (int, float)) or \
                not shard_megabytes > 0:
            raise ValueError(f"shard_megabytes must be a positive number, got {shard_megabytes!r}")
        self.identity = identity
        self.root = Path(root)
        self.directory = self.root / identity.digest
        self.shards = self.directory / "shards"
        self.shard_bytes = int(shard_megabytes * 2**20)
        self.verify = bool(verify)
        self.read_only = bool(read_only)
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.hits = self.misses = self.writes = self.rejected = 0
        self._index: dict[str, list[_Location]] = {}
        self._bad: set[tuple[Path, int]] = set()
        self._scanned: set[str] = set()
        self._maps: dict[Path, mmap.mmap] = {}
        self._scan_stamp: int | None = None
        self._pending: dict[str, tuple[torch.Tensor, dict]] = {}
        self._pending_bytes = 0
        self._sequence = 0
        if not read_only:
            self.shards.mkdir(parents=True, exist_ok=True)
            self._write_identity()
            atexit.register(self._flush_at_exit)
        elif not (self.directory / "identity.json").is_file():
            raise FeatureCacheError(f"{self.directory} holds no cache for this identity (read_only=True writes "
                                    "nothing; build it with read_only=False or precompute it first)")
        self._check_identity_file()
        self.refresh()

    # ------------------------------------------------------------------ identity

    def _write_identity(self) -> None:
        path = self.directory / "identity.json"
        if path.exists():
            return
        tmp = self.directory / f".identity-{self.writer_id}{TEMPORARY_SUFFIX}"
        tmp.write_text(json.dumps(self.identity.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)   # atomic; concurrent writers write the same content

    def _check_identity_file(self) -> None:
        try:
            stored = CacheIdentity.from_dict(json.loads((self.directory / "identity.json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise FeatureCacheError(f"{self.directory / 'identity.json'} is unreadable ({exc}); remove the "
                                    "folder to start this cache afresh") from exc
        if stored != self.identity:
            raise FeatureCacheError(f"{self.directory} holds a cache for a different identity ({stored}) than "
                                    f"this one ({self.identity})")

    # ------------------------------------------------------------------ index

    def refresh(self) -> None:
        """Read the headers of shards written since the last scan (by this or another process)."""
        try:
            stamp = os.stat(self.shards).st_mtime_ns
            names = os.listdir(self.shards)
        except FileNotFoundError:
            return
        self._scan_stamp = stamp
        for name in sorted(names):
            if not name.endswith(SHARD_SUFFIX) or name in self._scanned:
                continue
            self._scanned.add(name)
            try:
                metadata, locations = read_shard_header(self.shards / name)
                if metadata.get("identity") != self.identity.digest:
                    raise ShardError(f"{name}: written for identity {metadata.get('identity')}")
            except ShardError as exc:
                warnings.warn(f"feature cache {self.directory}: skipping an unreadable shard ({exc}); its "
                              "entries are recomputed", RuntimeWarning, stacklevel=2)
                continue
            for location in locations.values():
                key = location.meta.get("key")
                if isinstance(key, str):
                    self._index.setdefault(key, []).append(location)

    def _refresh_if_changed(self) -> None:
        try:
            stamp = os.stat(self.shards).st_mtime_ns
        except FileNotFoundError:
            return
        if stamp != self._scan_stamp:
            self.refresh()

    def __len__(self) -> int:
        """Keys with at least one entry (on disk or buffered; not verified)."""
        return len(set(self._index) | set(self._pending))

    def keys(self) -> list[str]:
        return sorted(set(self._index) | set(self._pending))

    # ------------------------------------------------------------------ reads

    def _map(self, shard: Path) -> mmap.mmap:
        mapped = self._maps.get(shard)
        if mapped is None:
            with open(shard, "rb") as handle:
                # ACCESS_COPY: a private mapping, writable for torch.frombuffer without copying the file
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[shard] = mapped
        return mapped

    def _read(self, key: str, location: _Location) -> CacheEntry:
        """The entry at `location`, checked; ShardError when it fails any check."""
        meta = location.meta
        if meta.get("key") != key:
            raise ShardError("its key does not match")
        dtype = STORAGE_DTYPES[self.identity.storage_dtype]
        if location.dtype != _SAFETENSORS_DTYPE[dtype]:
            raise ShardError(f"dtype {location.dtype}, expected {_SAFETENSORS_DTYPE[dtype]}")
        frame_indices = tuple(int(i) for i in meta["frame_indices"])
        if len(location.shape) != 4 or location.shape[0] != len(frame_indices):
            raise ShardError(f"shape {location.shape} does not match {len(frame_indices)} frame indices")
        count = 1
        for side in location.shape:
            count *= side
        if location.end - location.begin != count * dtype.itemsize:
            raise ShardError(f"{location.end - location.begin} bytes for shape {location.shape}")
        try:
            mapped = self._map(location.shard)
        except (OSError, ValueError) as exc:
            raise ShardError(f"cannot map the shard: {exc}") from exc
        if location.end > len(mapped):
            raise ShardError(f"truncated: ends at byte {location.end} of a {len(mapped)}-byte file")
        if self.verify and zlib.crc32(memoryview(mapped)[location.begin:location.end]) != int(meta["crc32"]):
            raise ShardError("CRC-32 mismatch")
        features = torch.frombuffer(mapped, dtype=dtype, count=count, offset=location.begin).view(location.shape)
        grid = meta.get("grid")
        return CacheEntry(features, None if grid is None else TokenGrid(*grid), frame_indices,
                          int(meta["source_frames"]))

    def _valid_entry(self, key: str) -> CacheEntry | None:
        pending = self._pending.get(key)
        if pending is not None:
            features, meta = pending
            grid = meta["grid"]
            return CacheEntry(features, None if grid is None else TokenGrid(*grid), tuple(meta["frame_indices"]),
                              meta["source_frames"])
        for location in reversed(self._index.get(key, ())):   # the newest entry first
            if (location.shard, location.begin) in self._bad:
                continue
            try:
                return self._read(key, location)
            except (ShardError, KeyError, TypeError, ValueError) as exc:
                self._bad.add((location.shard, location.begin))
                warnings.warn(f"feature cache {self.directory}: the entry for key {key!r} in {location.shard.name} "
                              f"is damaged ({exc}); treated as a miss and recomputed", RuntimeWarning, stacklevel=3)
        return None

    def contains(self, key: object) -> bool:
        """A valid entry exists for `key` (checked like a read; no grid check)."""
        key = canonical_key(key)
        if self._valid_entry(key) is None:
            self._refresh_if_changed()
            return self._valid_entry(key) is not None
        return True

    def get(self, key: object, grid: Sequence[int] | None = None) -> CacheEntry | None:
        """The entry for `key` if one is valid and fits the call's student token grid, else None.

        grid: the call's (frames, rows, columns). An entry written for another grid is a miss with a
        warning; an entry without a grid must have the call's frame count and the teacher grid the call's
        aspect ratio gives. None skips the grid check."""
        key = canonical_key(key)
        entry = self._valid_entry(key)
        if entry is None:
            self._refresh_if_changed()
            entry = self._valid_entry(key)
        if entry is not None and grid is not None and not self._fits(key, entry, TokenGrid(*grid)):
            entry = None
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def _fits(self, key: str, entry: CacheEntry, grid: TokenGrid) -> bool:
        if entry.grid is not None:
            found, what = tuple(entry.grid), "student token grid"
        else:
            found, what = tuple(entry.features.shape[:3]), "teacher grid"
            grid = TokenGrid(*expected_teacher_grid(grid, self.identity))
        if found == tuple(grid):
            return True
        warnings.warn(f"feature cache: key {key!r} was cached with the {what} {found} (frames, rows, columns) but "
                      f"this call has {tuple(grid)}; treated as a miss (does the key include the resolution bucket "
                      "and frame selection?)", RuntimeWarning, stacklevel=3)
        return False

    # ------------------------------------------------------------------ writes

    def put(self, key: object, features: torch.Tensor, *, grid: Sequence[int] | None,
            frame_indices: Sequence[int], source_frames: int) -> bool:
        """Store the features of one sample; True when stored (buffered until the shard is written).

        features: (T, h, w, D), converted to the storage dtype; grid: the student token grid of the call
        (frames, rows, columns), or None when unknown; frame_indices: the T pixel frames encoded;
        source_frames: the number of pixel frames they were picked from. Features that overflow the
        storage dtype (finite values becoming Inf in float16) are not stored: warning, returns False."""
        key = canonical_key(key)
        if not isinstance(features, torch.Tensor) or features.dim() != 4 or not features.is_floating_point():
            raise ValueError(f"features must be a floating-point (T, h, w, D) tensor, got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
        frame_indices = [int(i) for i in frame_indices]
        if len(frame_indices) != features.shape[0]:
            raise ValueError(f"frame_indices has {len(frame_indices)} entries but features have "
                             f"{features.shape[0]} frames")
        if grid is not None:
            grid = list(TokenGrid(*grid))
            if grid[0] != features.shape[0]:
                raise ValueError(f"grid {tuple(grid)} has {grid[0]} frames but features have {features.shape[0]}")
        if self.read_only or key in self._pending:
            return False
        stored = features.detach().to(device="cpu", dtype=self.identity.storage_torch_dtype).contiguous()
        if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(features).all()):
            warnings.warn(f"feature cache: the features of key {key!r} overflow {self.identity.storage_dtype} "
                          "and are not cached (use storage_dtype='bfloat16' or 'float32')", RuntimeWarning,
                          stacklevel=2)
            self.rejected += 1
            return False
        crc = zlib.crc32(stored.reshape(-1).view(torch.uint8).numpy())
        meta = {"key": key, "grid": grid, "frame_indices": frame_indices, "source_frames": int(source_frames),
                "crc32": crc}
        self._pending[key] = (stored, meta)
        self._pending_bytes += stored.numel() * stored.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Write the buffered entries as one shard (atomically); returns its path, None if nothing was
        buffered or the write failed (a warning; the entries are recomputed later, training goes on)."""
        if not self._pending:
            return None
        from safetensors.torch import save_file

        self._sequence += 1
        name = f"{self.writer_id}-{self._sequence:05d}"
        final = self.shards / f"{name}{SHARD_SUFFIX}"
        tmp = self.shards / f".{name}{TEMPORARY_SUFFIX}"
        tensors = {tensor_name(key): stored for key, (stored, _) in self._pending.items()}
        entries = {tensor_name(key): meta for key, (_, meta) in self._pending.items()}
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "identity": self.identity.digest,
                    "entries": json.dumps(entries, separators=(",", ":"))}
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            warnings.warn(f"feature cache {self.directory}: writing a shard failed ({exc}); {len(tensors)} entries "
                          "stay uncached", RuntimeWarning, stacklevel=2)
            tmp.unlink(missing_ok=True)
            self._pending.clear()
            self._pending_bytes = 0
            return None
        self.writes += len(tensors)
        self._pending.clear()
        self._pending_bytes = 0
        self.refresh()
        return final

    def _flush_at_exit(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # at interpreter exit: say it, never raise
            warnings.warn(f"feature cache {self.directory}: final flush failed ({exc})", RuntimeWarning)

    def close(self) -> None:
        """Flush and stop writing; mappings are released when the last entry view is gone."""
        if not self.read_only:
            self.flush()
            atexit.unregister(self._flush_at_exit)
        self.read_only = True
        self._maps.clear()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "rejected": self.rejected,
                "damaged": len(self._bad), "pending": len(self._pending)}

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r}, entries={len(self)}, {self.identity.storage_dtype})"
