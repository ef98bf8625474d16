"""Per-rank teacher cost under context parallelism: decode and encode of each rank's window, P = 1, 2, 4.

    python benchmarks/context_parallel_teacher.py [--frames 21] [--height 64] [--width 112] [--image-size 224]
                                                  [--repeats 3] [--threads 2] [--ranks 1 2 4]

Under context parallelism every rank of a context group holds the same latents and computes the teacher
tokens of its own window of student frames only (repa_kernels/regularizer/context_parallel.py): the
frames its shard of the token sequence touches plus d neighbour frames on each side. A causal Wan VAE
decodes just the latent prefix up to the window's last frame (vae.LatentDecoder.causal_prefix), and the
encoder encodes the window's frames. That work needs no communication, so the ranks are simulated one
after another in one process (on a 2-core machine also fairer than P processes contending for the
cores), each through the package's own code path: a real `CrepaRegularizer`'s teacher called as the
regularizer calls it under context parallelism, `reg._teacher.tokens(inputs, None, grid, device,
frames=window)` with `window = teacher_window((start, stop), grid, reg.options)` and (start, stop) the
rank's shard in diffusers' equal-chunk layout (`equal_chunks`: the sequence cut as tensor.chunk cuts it).
Every rank's tokens are checked against the matching frames of the whole-clip tokens (no window); the
script fails if one differs.

Shape (a reduced Wan 2.1 480p): the real AutoencoderKLWan architecture (diffusers' default config: base_dim
96, z_dim 16, temporal ratio 4, spatial 8; random weights, seed 0), B = 1, latents (1, 16, 6, 8, 14): 21
pixel frames of 64 x 112 (the 480 x 832 frame / 7.5, rounded to a multiple of 16 so that Wan's 1x2x2
patch tiles the latent; aspect 0.571 against 0.577), token grid 6 x 4 x 7 = 168 tokens. One whole decode
takes 5.8 s here on an idle machine; 120 x 208 was the first choice, but 128 x 224 took 90 s per decode
(under load), too slow for the 3 timed rounds of 14 ranks within 5 minutes. Teacher: a random-weight
DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads) at crepa_encoder_image_size 224 (each frame resized to
168 x 294: 12 x 21 patches). The student is a 2-block Wan transformer (it only names the family and the
grid: it never runs). Two CREPA configs: the default (crepa_adjacent_distance 1) and d = 2 with
crepa_cumulative_neighbors.

Time: time.perf_counter (wall) and time.process_time (CPU, both threads), torch.set_num_threads(2), one
warm-up (the whole-clip call, which also gives the reference tokens), then the median of `--repeats`
rounds, each running every rank of every P once, so that load from other processes (it drifts over
minutes on this shared machine) spreads over the ranks compared. The decode time is the teacher's decode
call (the VAE); the encode time is the rest of the tokens() call (frame choice, resize, encoder). Under
load the wall times scatter (at 48 x 80 and a load average of 4-11, 8.6 to 22.5 s for a whole decode that
takes 3.2 s idle); the table below is from an idle machine, where CPU time is twice the wall time (both
threads busy).

Measured (`python benchmarks/context_parallel_teacher.py`, 2 cores, torch 2.13 CPU, diffusers 0.42, load
average 0.1 at the start and 1.9 at the end, 248 s in all; seconds, median of 3; every rank's tokens equal
the whole clip's):

d = 1 (the default config), token grid 6 x 4 x 7:

| P | rank | tokens [start, stop) | window frames | latent frames decoded | pixel frames decoded | frames encoded | decode s | encode s | decode CPU s | encode CPU s |
|---|---|---|---|---|---|---|---|---|---|---|
| 1 | 0 | [0, 168) | [0, 6) | 6 | 21 | 6 | 5.81 | 0.30 | 11.56 | 0.61 |
| 2 | 0 | [0, 84) | [0, 4) | 4 | 13 | 4 | 3.78 | 0.20 | 7.53 | 0.41 |
| 2 | 1 | [84, 168) | [2, 6) | 6 | 21 | 4 | 5.88 | 0.20 | 11.71 | 0.41 |
| 4 | 0 | [0, 42) | [0, 3) | 3 | 9 | 3 | 2.70 | 0.16 | 5.39 | 0.31 |
| 4 | 1 | [42, 84) | [0, 4) | 4 | 13 | 4 | 3.80 | 0.21 | 7.53 | 0.41 |
| 4 | 2 | [84, 126) | [2, 6) | 6 | 21 | 4 | 6.15 | 0.21 | 12.19 | 0.41 |
| 4 | 3 | [126, 168) | [3, 6) | 6 | 21 | 3 | 5.95 | 0.16 | 11.83 | 0.32 |

| P | seconds | max decode | max encode | max decode + encode | vs P = 1 (decode, encode, both) |
|---|---|---|---|---|---|
| 1 | wall | 5.81 | 0.30 | 6.11 | 1.00x, 1.00x, 1.00x |
| 2 | wall | 5.88 | 0.20 | 6.09 | 1.01x, 0.67x, 1.00x |
| 4 | wall | 6.15 | 0.21 | 6.36 | 1.06x, 0.68x, 1.04x |
| 1 | CPU | 11.56 | 0.61 | 12.17 | 1.00x, 1.00x, 1.00x |
| 2 | CPU | 11.71 | 0.41 | 12.12 | 1.01x, 0.67x, 1.00x |
| 4 | CPU | 12.19 | 0.41 | 12.60 | 1.05x, 0.68x, 1.04x |

d = 2 cumulative:

| P | rank | tokens [start, stop) | window frames | latent frames decoded | pixel frames decoded | frames encoded | decode s | encode s | decode CPU s | encode CPU s |
|---|---|---|---|---|---|---|---|---|---|---|
| 1 | 0 | [0, 168) | [0, 6) | 6 | 21 | 6 | 5.94 | 0.31 | 11.81 | 0.62 |
| 2 | 0 | [0, 84) | [0, 5) | 5 | 17 | 5 | 4.90 | 0.26 | 9.69 | 0.52 |
| 2 | 1 | [84, 168) | [1, 6) | 6 | 21 | 5 | 6.03 | 0.26 | 11.89 | 0.53 |
| 4 | 0 | [0, 42) | [0, 4) | 4 | 13 | 4 | 3.78 | 0.21 | 7.50 | 0.42 |
| 4 | 1 | [42, 84) | [0, 5) | 5 | 17 | 5 | 4.86 | 0.26 | 9.68 | 0.53 |
| 4 | 2 | [84, 126) | [1, 6) | 6 | 21 | 5 | 5.99 | 0.27 | 11.93 | 0.53 |
| 4 | 3 | [126, 168) | [2, 6) | 6 | 21 | 4 | 6.00 | 0.21 | 11.95 | 0.42 |

| P | seconds | max decode | max encode | max decode + encode | vs P = 1 (decode, encode, both) |
|---|---|---|---|---|---|
| 1 | wall | 5.94 | 0.31 | 6.25 | 1.00x, 1.00x, 1.00x |
| 2 | wall | 6.03 | 0.26 | 6.29 | 1.02x, 0.85x, 1.01x |
| 4 | wall | 6.00 | 0.27 | 6.26 | 1.01x, 0.85x, 1.00x |
| 1 | CPU | 11.81 | 0.62 | 12.43 | 1.00x, 1.00x, 1.00x |
| 2 | CPU | 11.89 | 0.53 | 12.41 | 1.01x, 0.85x, 1.00x |
| 4 | CPU | 11.95 | 0.53 | 12.46 | 1.01x, 0.85x, 1.00x |

What it shows: the encode shrinks with P (each rank encodes its window: its frames plus the halo), the
decode does not. The last rank's window ends at the clip's last frame, so it decodes the whole clip: the
decode's critical path stays one whole decode whatever P. The first ranks decode only a prefix. The decode
cannot be split further exactly: the Wan VAE decodes latent frame k with the causal cache of frames 0..k-1
(each causal 3D convolution keeps its last input frames), so a rank cannot start at its window's first
frame without first decoding every frame before it. The script also prints each rank's window, decode
and encode at the Wan 2.1 14B 480p workload (P = 8: rank 0 decodes 13 of 81 pixel frames, rank 7 all 81,
every rank encodes 4 to 6 of 21 frames at d = 1), from the package's rules (`wan14b_frames_per_rank`;
the tables are in benchmarks/CONTEXT_PARALLEL.md).

Communication per step (`communication_volume`, from the rules of context_parallel.py's docstring) for the
Wan 2.1 14B 480p workload: 81 frames -> 21 latent frames, 30 x 52 = 1560 student tokens per frame, teacher
DINOv2-g/14 at 518 px (28 x 49 = 1372 tokens per frame, D = 1536), hidden 5120, P = 8, B = 1, the projector
output in float32 and the backbone's hidden states in bf16:

| | d = 1 | d = 2 cumulative |
|---|---|---|
| loss all_reduce (2 float64, per rank) | 16 B | 16 B |
| encoder teacher: resampled student, forward, group total | 33,546,240 B (32.0 MiB) (the same back) | 33,546,240 B (32.0 MiB) (the same back) |
| encoder teacher: resampled student, forward, most one rank receives | 8,386,560 B (8.0 MiB) | 8,386,560 B (8.0 MiB) |
| backbone teacher: halo, group total | 335,462,400 B (319.9 MiB) | 559,104,000 B (533.2 MiB) |
| backbone teacher: halo, most one rank receives | 53,913,600 B (51.4 MiB) | 85,862,400 B (81.9 MiB) |
| encoder projector gradient all_reduce (per rank) | 31,504,384 B (30.0 MiB) | 31,504,384 B (30.0 MiB) |
| backbone projector gradient all_reduce (per rank) | 104,919,040 B (100.1 MiB) | 104,919,040 B (100.1 MiB) |
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from repa_kernels.options import CrepaOptions
from repa_kernels.regularizer import CrepaRegularizer
from repa_kernels.regularizer.context_parallel import equal_chunks, loss_frames, teacher_window
from repa_kernels.regularizer.grids import TokenGrid, select_frames
from repa_kernels.regularizer.inputs import CallInputs
from repa_kernels.regularizer.token_exchange import overlap
from repa_kernels.regularizer.vae import LatentDecoder

CONFIGS = {
    "d=1 (default)": {},
    "d=2 cumulative": {"crepa_adjacent_distance": 2, "crepa_cumulative_neighbors": True},
}
BASE_CONFIG = {"crepa_enabled": True, "crepa_block_index": 1}


# ------------------------------------------------------------------------------------ per-rank teacher cost


@dataclass
class RankCost:
    """One rank's teacher work: its tokens [start, stop), its window of student frames [low, high), the
    latent and pixel frames its decode makes (per sample), the frames it encodes (per sample), and the
    median wall seconds of its decode and of its encode, and their median CPU seconds (the process's,
    all threads: less sensitive than wall time to other processes sharing the cores)."""

    ranks: int
    rank: int
    tokens: tuple[int, int]
    window: tuple[int, int]
    latent_frames_decoded: int
    pixel_frames_decoded: int
    frames_encoded: int
    decode_s: float
    encode_s: float
    decode_cpu_s: float
    encode_cpu_s: float


class _DecodeTimer:
    """Wraps the teacher's decode (an instance attribute shadowing the method, removed on exit) to record
    each call's wall and CPU seconds and latent frame count."""

    def __init__(self, teacher) -> None:
        self.teacher = teacher
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.latent_frames: list[int] = []

    def __enter__(self) -> "_DecodeTimer":
        decode = self.teacher.decode

        def timed(latents: torch.Tensor) -> torch.Tensor:
            begin, begin_cpu = time.perf_counter(), time.process_time()
            frames = decode(latents)
            self.seconds.append(time.perf_counter() - begin)
            self.cpu_seconds.append(time.process_time() - begin_cpu)
            self.latent_frames.append(latents.shape[2])
            return frames

        self.teacher.decode = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.teacher.decode


def wan_token_grid(latents: torch.Tensor, transformer) -> TokenGrid:
    """The token grid of Wan latents (B, C, F, H, W) under the transformer's patch (1, 2, 2)."""
    pt, ph, pw = transformer.config.patch_size
    return TokenGrid(latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw)


def _timed_tokens(teacher, inputs: CallInputs, grid: TokenGrid, device: torch.device, window):
    """(tokens, decode and encode wall seconds, decode and encode CPU seconds, latent frames decoded, pixel
    frames decoded and frames encoded per sample)."""
    batch = inputs.latents.shape[0]
    decoded, encoded = teacher.frames_decoded, teacher.frames_encoded
    with _DecodeTimer(teacher) as timer:
        begin, begin_cpu = time.perf_counter(), time.process_time()
        tokens = teacher.tokens(inputs, None, grid, device, frames=window)
        total, total_cpu = time.perf_counter() - begin, time.process_time() - begin_cpu
    if len(timer.seconds) != 1:
        raise RuntimeError(f"the teacher decoded {len(timer.seconds)} times in one call; expected once")
    return (tokens, timer.seconds[0], total - timer.seconds[0], timer.cpu_seconds[0], total_cpu - timer.cpu_seconds[0],
            timer.latent_frames[0],
            (teacher.frames_decoded - decoded) // batch, (teacher.frames_encoded - encoded) // batch)


def rank_costs(reg: CrepaRegularizer, latents: torch.Tensor, grid: TokenGrid, ranks=(1, 2, 4),
               repeats: int = 3) -> list[RankCost]:
    """Every rank of a context group of each size in `ranks` (equal chunks of grid.tokens): its window,
    frames decoded and encoded, and the median decode and encode seconds of `repeats` rounds after one
    warm-up (the whole-clip call, whose tokens every rank's are checked against: a RuntimeError names the
    first rank that differs). Each round runs every rank once, one after another, so that load from other
    processes, which drifts over minutes on a shared machine, spreads over the ranks compared."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    teacher = reg._teacher
    device = next(reg.parameters()).device
    inputs = CallInputs.check(latents=latents)
    jobs = [(size, rank, shard, teacher_window(shard, grid, reg.options))
            for size in ranks for rank, shard in enumerate(equal_chunks(None, 0, size, grid.tokens).shards)]
    runs = {job: [] for job in range(len(jobs))}
    with torch.no_grad():
        whole = teacher.tokens(inputs, None, grid, device)          # warm-up and the reference
        for round_ in range(repeats):
            for job, (size, rank, shard, window) in enumerate(jobs):
                tokens, *measured = _timed_tokens(teacher, inputs, grid, device, window)
                if round_ == 0:
                    want = whole[:, window[0]:window[1]]
                    if tokens.shape != want.shape or not torch.equal(tokens, want):
                        diff = (tokens - want).abs().max().item() if tokens.shape == want.shape else "shape"
                        raise RuntimeError(f"P={size} rank tokens {shard}, window {window}: the teacher tokens "
                                           f"differ from the whole clip's frames {window} (max |diff| {diff})")
                runs[job].append(measured)
    rows = []
    for job, (size, rank, shard, window) in enumerate(jobs):
        decode_s, encode_s, decode_cpu_s, encode_cpu_s, latent_frames, pixel_frames, encoded = zip(*runs[job])
        rows.append(RankCost(size, rank, shard, window, latent_frames[0], pixel_frames[0], encoded[0],
                             *(statistics.median(s) for s in (decode_s, encode_s, decode_cpu_s, encode_cpu_s))))
    return rows


def critical_path(rows: list[RankCost], cpu: bool = False) -> dict[int, tuple[float, float, float]]:
    """P -> (max decode s, max encode s, max decode + encode s) over the ranks of the group, in wall
    seconds or (cpu) CPU seconds."""
    def seconds(row: RankCost) -> tuple[float, float]:
        return (row.decode_cpu_s, row.encode_cpu_s) if cpu else (row.decode_s, row.encode_s)
    return {size: (max(seconds(r)[0] for r in group), max(seconds(r)[1] for r in group),
                   max(sum(seconds(r)) for r in group))
            for size in sorted({r.ranks for r in rows}) for group in [[r for r in rows if r.ranks == size]]}


def format_table(rows: list[RankCost]) -> str:
    """A markdown table of the rows, then each P's critical path against P = 1 (wall, then CPU seconds)."""
    lines = ["| P | rank | tokens [start, stop) | window frames | latent frames decoded | pixel frames decoded | "
             "frames encoded | decode s | encode s | decode CPU s | encode CPU s |", "|---" * 11 + "|"]
    lines += [f"| {r.ranks} | {r.rank} | [{r.tokens[0]}, {r.tokens[1]}) | [{r.window[0]}, {r.window[1]}) | "
              f"{r.latent_frames_decoded} | {r.pixel_frames_decoded} | {r.frames_encoded} | {r.decode_s:.2f} | "
              f"{r.encode_s:.2f} | {r.decode_cpu_s:.2f} | {r.encode_cpu_s:.2f} |" for r in rows]
    lines += ["", "| P | seconds | max decode | max encode | max decode + encode | vs P = 1 (decode, encode, both) |",
              "|---" * 6 + "|"]
    for kind, cpu in (("wall", False), ("CPU", True)):
        paths = critical_path(rows, cpu)
        base = paths[min(paths)]
        lines += [f"| {size} | {kind} | {d:.2f} | {e:.2f} | {b:.2f} | {d / base[0]:.2f}x, {e / base[1]:.2f}x, "
                  f"{b / base[2]:.2f}x |" for size, (d, e, b) in paths.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ communication volume


@dataclass
class CommunicationVolume:
    """Bytes per training step of one context group (summed over its ranks; `*_max_rank`: the most one
    rank receives). loss_all_reduce: the payload of the one all_reduce of 2 float64 each rank joins;
    student_exchange: resampled student grids, the projected tokens of each split frame held by later
    ranks, sent to the frame's first rank (the same again for their gradient in the backward);
    backbone_halo: backbone mode, the teacher block tokens of each rank's window held by other ranks;
    projector_all_reduce: the projector's gradient each rank all-reduces (as without context parallelism)."""

    loss_all_reduce: int
    student_exchange: int
    student_exchange_max_rank: int
    backbone_halo: int
    backbone_halo_max_rank: int
    projector_all_reduce: int
    backbone_projector_all_reduce: int


def _received_tokens(shards, wants) -> list[int]:
    """Per rank: the tokens of its wanted range that other ranks hold."""
    return [(hi - lo) - (0 if not (common := overlap(shard, (lo, hi))) else common[1] - common[0])
            for shard, (lo, hi) in zip(shards, wants)]


def communication_volume(frames: int, student_grid: tuple[int, int], teacher_grid: tuple[int, int], ranks: int,
                         batch: int, teacher_width: int, hidden: int, options: CrepaOptions,
                         projected_bytes: int = 4, hidden_bytes: int = 2) -> CommunicationVolume:
    """The communication of one step for `frames` frames of student_grid tokens (rows, columns) cut into
    `ranks` equal chunks: an encoder teacher of teacher_grid tokens per frame and width teacher_width
    (the student is resampled when its grid holds more tokens per frame), or backbone mode (a teacher
    block of width `hidden` on the student grid, halo of the options' largest offset)."""
    per_frame = student_grid[0] * student_grid[1]
    grid = TokenGrid(frames, *student_grid)
    shards = equal_chunks(None, 0, ranks, grid.tokens).shards
    resampled = teacher_grid[0] * teacher_grid[1] < per_frame
    student = [0] * ranks
    if resampled:
        wants = [tuple(f * per_frame for f in loss_frames(span, per_frame, True)) for span in shards]
        student = _received_tokens(shards, wants)
    halo = _received_tokens(shards, [tuple(f * per_frame for f in teacher_window(span, grid, options))
                                     for span in shards])
    student_bytes = batch * teacher_width * projected_bytes
    halo_bytes = batch * hidden * hidden_bytes
    return CommunicationVolume(
        loss_all_reduce=2 * 8,
        student_exchange=sum(student) * student_bytes, student_exchange_max_rank=max(student) * student_bytes,
        backbone_halo=sum(halo) * halo_bytes, backbone_halo_max_rank=max(halo) * halo_bytes,
        projector_all_reduce=4 * (2 * hidden + hidden * teacher_width + teacher_width),   # LayerNorm + Linear
        backbone_projector_all_reduce=4 * (2 * hidden + hidden * hidden + hidden))


def _size(count: int) -> str:
    return f"{count:,} B" + (f" ({count / 2**20:.1f} MiB)" if count >= 2**20 else "")


WAN14B_480P = dict(frames=21, student_grid=(30, 52), teacher_grid=(28, 49), ranks=8, batch=1, teacher_width=1536,
                   hidden=5120)


def wan14b_frames_per_rank(options: CrepaOptions) -> str:
    """Each rank's window, causal-prefix decode and encode at the Wan 2.1 14B 480p workload (P = 8), from
    the package's own rules (teacher_window, LatentDecoder.causal_prefix on a default AutoencoderKLWan
    built on the meta device, select_frames), as a markdown table: nothing is decoded or encoded."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        decoder = LatentDecoder(vae=AutoencoderKLWan(), video=True)
        latents = torch.empty(WAN14B_480P["batch"], 16, WAN14B_480P["frames"], 60, 104)
    total, latent_frames_for = decoder.causal_prefix(latents)
    grid = TokenGrid(WAN14B_480P["frames"], *WAN14B_480P["student_grid"])
    picks = select_frames(total, grid.frames)
    ratio = (total - 1) // (grid.frames - 1)                    # the VAE's temporal ratio (4)
    lines = ["| rank | tokens [start, stop) | window frames | latent frames decoded | pixel frames decoded | "
             "frames encoded |", "|---" * 6 + "|"]
    decoded = encoded = 0
    for rank, shard in enumerate(equal_chunks(None, 0, WAN14B_480P["ranks"], grid.tokens).shards):
        low, high = teacher_window(shard, grid, options)
        latent = latent_frames_for(picks[high - 1])
        decoded, encoded = decoded + ratio * (latent - 1) + 1, encoded + high - low
        lines.append(f"| {rank} | [{shard[0]}, {shard[1]}) | [{low}, {high}) | {latent} | {ratio * (latent - 1) + 1} | "
                     f"{high - low} |")
    lines.append(f"| all | | | | {decoded} ({decoded / total:.1f} whole decodes) | {encoded} ({encoded / grid.frames:.1f} "
                 "clips) |")
    return "\n".join(lines)


def format_volumes(distances=((1, False), (2, True))) -> str:
    """The Wan 2.1 14B 480p communication volumes for each (d, cumulative), as a markdown table."""
    lines = ["| | d = " + " | d = ".join(f"{d}{' cumulative' if c else ''}" for d, c in distances) + " |",
             "|---" * (len(distances) + 1) + "|"]
    volumes = [communication_volume(**WAN14B_480P, options=CrepaOptions(distance=d, cumulative=c))
               for d, c in distances]
    for label, attribute, note in [
            ("loss all_reduce (2 float64, per rank)", "loss_all_reduce", ""),
            ("encoder teacher: resampled student, forward, group total", "student_exchange", " (the same back)"),
            ("encoder teacher: resampled student, forward, most one rank receives", "student_exchange_max_rank", ""),
            ("backbone teacher: halo, group total", "backbone_halo", ""),
            ("backbone teacher: halo, most one rank receives", "backbone_halo_max_rank", ""),
            ("encoder projector gradient all_reduce (per rank)", "projector_all_reduce", ""),
            ("backbone projector gradient all_reduce (per rank)", "backbone_projector_all_reduce", "")]:
        cells = [f"{_size(getattr(v, attribute))}{note}" for v in volumes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the reduced Wan 480p shape


def build(config: dict, image_size: int):
    """(regularizer, transformer) for the reduced shape: default AutoencoderKLWan and DINOv2 ViT-S/14,
    random weights, seed 0."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64).eval()
    vae = AutoencoderKLWan().eval().requires_grad_(False)
    encoder = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                       patch_size=14)).eval().requires_grad_(False)
    reg = CrepaRegularizer.from_config({**BASE_CONFIG, "crepa_encoder_image_size": image_size, **config},
                                       transformer=transformer, vae=vae, encoder=encoder)
    return reg, transformer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=21, help="pixel frames, 4k + 1 (k + 1 latent frames)")
    parser.add_argument("--height", type=int, default=64, help="pixel height, a multiple of 16")
    parser.add_argument("--width", type=int, default=112, help="pixel width, a multiple of 16")
    parser.add_argument("--image-size", type=int, default=224, help="crepa_encoder_image_size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per rank (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="context group sizes")
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            parser.error(f"--{name} must be a positive multiple of 16 (8x VAE, 2x2 patch), got {getattr(args, name)}")
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames must be 4k + 1 (the Wan VAE's temporal ratio 4), got {args.frames}")
    if args.repeats < 1 or args.threads < 1 or any(p < 1 for p in args.ranks):
        parser.error("--repeats, --threads and --ranks must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.1f}; {args.frames} frames of {args.height} x {args.width}, "
          f"DINOv2 ViT-S/14 at {args.image_size}, {args.threads} threads, median of {args.repeats}", flush=True)
    latents = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8,
                          generator=torch.Generator().manual_seed(1))
    for name, config in CONFIGS.items():
        reg, transformer = build(config, args.image_size)
        grid = wan_token_grid(latents, transformer)
        rows = rank_costs(reg, latents, grid, tuple(args.ranks), args.repeats)
        print(f"\n### {name}: token grid {tuple(grid)} (frames, rows, columns); every rank's tokens equal the "
              f"whole clip's\n\n{format_table(rows)}", flush=True)
    print(f"\n### Communication per step, Wan 2.1 14B 480p, P = {WAN14B_480P['ranks']}\n\n{format_volumes()}")
    for name, config in CONFIGS.items():
        options = CrepaOptions(distance=config.get("crepa_adjacent_distance", 1),
                               cumulative=config.get("crepa_cumulative_neighbors", False))
        print(f"\n### Frames per rank, Wan 2.1 14B 480p, P = {WAN14B_480P['ranks']}, {name}\n\n"
              f"{wan14b_frames_per_rank(options)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
