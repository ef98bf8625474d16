"""`repa-kernels demo`: a short, real CREPA fine-tune of a tiny video transformer on CPU.

A tiny diffusers `WanTransformer3DModel` (or `LTXVideoTransformer3DModel` with `--model ltx`) is trained
with a flow-matching (rectified-flow) loss plus the CREPA regularizer on procedurally generated clips of
moving shapes. The clips go through a tiny `AutoencoderKLWan` (or `AutoencoderKLLTXVideo`) to latents once;
every step the regularizer decodes the clean latents back to frames and encodes one frame per latent
frame with a tiny `Dinov2Model` teacher (`--backbone`: the teacher is a deeper block of the same forward
instead). The transformer, VAE and DINOv2 are random-init from a fixed seed (`--encoder PATH` loads real
DINOv2 weights from a local directory), so the run shows the machinery working end to end, not what
CREPA does for a real model.

Outputs in `--out` (default ./demo-output/): `metrics.csv` (the docs/contract.md §6 logs per step), `curves.png`
(loss and alignment score over steps) and `summary.json` (held-out loss and alignment before/after, and
the step time with the fused backend vs the reference).

    repa-kernels demo [--steps 40] [--backend auto|cpp|reference|triton] [--model wan|ltx] [--backbone]
                      [--encoder PATH] [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .. import backends

DEFAULT_OUT = "demo-output"
CLIP_FRAMES = 9
CLIP_SIZE = 48
TRAIN_CLIPS = 48
HELD_OUT_CLIPS = 4
HELD_OUT_SIGMAS = (0.2, 0.4, 0.6, 0.8)
LOG_KEYS = ("crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_similarity", "crepa_weight",
            "crepa_cutoff", "crepa_alignment_score_ema")
CSV_COLUMNS = ("step", "loss", "diffusion_loss") + LOG_KEYS + ("step_seconds",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--backend", choices=backends.IMPL_CHOICES,
                        default=os.environ.get(backends.ENV_VAR) or "auto",
                        help=f"kernel backend of the CREPA loss (default: ${backends.ENV_VAR} or auto); the "
                             "step time is also measured with the other of fused / reference")
    parser.add_argument("--model", choices=("wan", "ltx"), default="wan",
                        help="video transformer family: WanTransformer3DModel or LTXVideoTransformer3DModel")
    parser.add_argument("--backbone", action="store_true",
                        help="backbone mode: the teacher is a deeper block of the same forward (no VAE decode, "
                             "no encoder)")
    parser.add_argument("--encoder", metavar="PATH", default=None,
                        help="a local directory with real DINOv2 weights (save_pretrained format); default: a "
                             "tiny random-init Dinov2Model")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"output directory for metrics.csv, curves.png, summary.json (default ./{DEFAULT_OUT}/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models, data and noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=2, help="clips per step (default 2)")
    parser.add_argument("--clips", type=int, default=TRAIN_CLIPS, help=f"training clips (default {TRAIN_CLIPS})")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--timing-repeats", type=int, default=5,
                        help="timed steps per backend in the fused-vs-reference comparison; 0 skips it (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1: the tiny models gain little from more, and on a "
                             "busy machine extra threads stall each other)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the per-step lines stay)")


def _check_args(args: argparse.Namespace) -> None:
    for name, minimum in (("steps", 1), ("batch_size", 1), ("clips", 1), ("timing_repeats", 0), ("threads", 1)):
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.encoder is not None and args.backbone:
        raise ValueError("--encoder and --backbone exclude each other: backbone mode has no encoder")
    if args.encoder is not None and not Path(args.encoder).expanduser().is_dir():
        raise ValueError(f"--encoder {args.encoder}: no such directory (pass a local DINOv2 directory saved with "
                         "save_pretrained)")


@contextlib.contextmanager
def _impl(name: str):
    """Run with REPA_KERNELS_IMPL=name (it overrides impl= everywhere), restoring the previous value."""
    previous = os.environ.get(backends.ENV_VAR)
    os.environ[backends.ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(backends.ENV_VAR, None)
        else:
            os.environ[backends.ENV_VAR] = previous


def _comparison_backends(requested: str, device: torch.device) -> tuple[str, str, str | None]:
    """(training backend, fused backend, why no fused backend is available or None)."""
    training = backends.resolve(requested, device)
    if training != "reference":
        return training, training, None
    with _impl("auto"):
        fused = backends.resolve("auto", device)
    if fused != "reference":
        return training, fused, None
    preferred = "triton" if device.type == "cuda" else "cpp"
    return training, fused, backends.status(preferred, device)[1]


# ----------------------------------------------------------------------------------------------- setup

def _describe_models(args, models, encoder_label: str) -> list[str]:
    t_name, v_name = type(models.transformer).__name__, type(models.vae).__name__
    lines = [f"transformer: tiny {t_name}, {models.transformer_parameters / 1e3:.0f}k parameters, RANDOM INIT "
             f"(seed {args.seed}), trained here"]
    if args.backbone:
        lines.append(f"vae: tiny {v_name}, RANDOM INIT (encodes the clips to latents once; backbone mode decodes "
                     "nothing)")
        lines.append("teacher: a deeper block of the same transformer (backbone mode), detached")
    else:
        lines.append(f"vae: tiny {v_name}, RANDOM INIT, frozen (encodes the clips once; the regularizer decodes the "
                     "latents every step)")
        lines.append(f"teacher: {encoder_label}")
    lines.append("text: one fixed random caption embedding (no text encoder); data: procedural moving-shape clips "
                 f"({CLIP_FRAMES} frames, {CLIP_SIZE}x{CLIP_SIZE})")
    return lines


def _encoder(args, seed: int):
    """(encoder argument for the regularizer, encoder image size, label)."""
    from .models import ENCODER_GRID_SIDE, build_random_dinov2
    if args.encoder is None:
        model = build_random_dinov2(seed)
        return model, ENCODER_GRID_SIDE * model.config.patch_size, \
            "tiny Dinov2Model (hidden 32, 2 layers, patch 4), RANDOM INIT, frozen"
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(args.encoder)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return str(Path(args.encoder).expanduser()), ENCODER_GRID_SIDE * patch, \
        f"DINOv2 with the weights in {args.encoder} (not random-init; {config.hidden_size} wide), frozen"


def _crepa_config(args, image_size: int) -> dict:
    from .models import STUDENT_BLOCK, TEACHER_BLOCK
    config = {"crepa_enabled": True, "crepa_block_index": STUDENT_BLOCK, "crepa_lambda": 0.5,
              "crepa_adjacent_distance": 1, "crepa_adjacent_tau": 1.0}
    if args.backbone:
        config.update(crepa_use_backbone_features=True, crepa_teacher_block_index=TEACHER_BLOCK)
    else:
        config.update(crepa_encoder_image_size=image_size)
    return config


# ----------------------------------------------------------------------------------------------- training

class Batches:
    """Training batches from a seeded generator: clip indices, noise and sigmas (logit-normal)."""

    def __init__(self, latents: torch.Tensor, batch_size: int, seed: int) -> None:
        self.latents = latents
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed + 4)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.latents.shape[0], (self.batch_size,), generator=self.generator)
        clean = self.latents[idx]
        noise = torch.randn(clean.shape, generator=self.generator).to(clean.device)
        sigmas = torch.sigmoid(torch.randn(self.batch_size, generator=self.generator)).to(clean.device)
        return clean, noise, sigmas


def flow_matching_step(models, reg, caption, clean, noise, sigmas, step: int):
    """Rectified flow: x_s = (1 - s) x0 + s eps, the transformer predicts v = eps - x0.
    Returns (total loss, flow-matching loss, regularizer logs)."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - s) * clean + s * noise
    from .models import predict_velocity
    prediction = predict_velocity(models, noisy, sigmas, caption[:clean.shape[0]])
    diffusion_loss = torch.nn.functional.mse_loss(prediction.float(), (noise - clean).float())
    reg_loss, logs = reg(latents=clean, step=step)
    return diffusion_loss + reg_loss, diffusion_loss, logs


@torch.no_grad()
def evaluate(models, reg, caption, held_out: torch.Tensor, seed: int) -> dict[str, float]:
    """Flow-matching loss and CREPA alignment on held-out clips at fixed noise levels and noise.
    The regularizer's schedule state is restored afterwards (evaluation must not move its EMA)."""
    generator = torch.Generator().manual_seed(seed + 5)
    noise = torch.randn(held_out.shape, generator=generator).to(held_out.device)
    sigmas = torch.tensor(HELD_OUT_SIGMAS[:held_out.shape[0]], device=held_out.device)
    schedule_state = reg.schedule.state_dict()
    models.transformer.eval()
    try:
        _, diffusion_loss, logs = flow_matching_step(models, reg, caption, held_out, noise, sigmas, step=0)
    finally:
        models.transformer.train()
        reg.schedule.load_state_dict(schedule_state)
    return {"diffusion_loss": float(diffusion_loss), "alignment_score": float(logs["crepa_alignment_score"]),
            "similarity_self": float(logs["crepa_similarity_self"])}


def _console_line(step: int, steps: int, row: dict) -> str:
    def fmt(key: str, spec: str = ".4f") -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)
    return (f"step {step + 1:>{len(str(steps))}}/{steps}  loss {fmt('loss')}  fm {fmt('diffusion_loss')}  "
            f"crepa {fmt('crepa_loss', '+.4f')}  align {fmt('crepa_alignment_score')}  "
            f"self {fmt('crepa_similarity_self')}  ema {fmt('crepa_alignment_score_ema')}  "
            f"w {fmt('crepa_weight', '.2f')}  {fmt('step_seconds', '.2f')}s")


def train(args, models, reg, optimizer, caption, batches: Batches, csv_path: Path) -> list[dict]:
    from tqdm.auto import tqdm
    rows: list[dict] = []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        bar = tqdm(range(args.steps), desc="CREPA fine-tune", unit="step", disable=args.no_progress,
                   dynamic_ncols=True, leave=False)
        for step in bar:
            start = time.perf_counter()
            clean, noise, sigmas = batches.next()
            loss, diffusion_loss, logs = flow_matching_step(models, reg, caption, clean, noise, sigmas, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            row = {"step": step, "loss": float(loss.detach()), "diffusion_loss": float(diffusion_loss.detach())}
            row.update({key: float(logs[key]) for key in LOG_KEYS if key in logs})
            row["step_seconds"] = time.perf_counter() - start
            writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})
            handle.flush()
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", align=f"{row.get('crepa_alignment_score', float('nan')):.3f}")
            tqdm.write(_console_line(step, args.steps, row))
        bar.close()
    return rows


# ----------------------------------------------------------------------------------------------- timing

def _timed_step(models, reg, caption, batch) -> float:
    """Seconds for one forward + regularizer + backward (no optimizer update)."""
    clean, noise, sigmas = batch
    start = time.perf_counter()
    loss, _, _ = flow_matching_step(models, reg, caption, clean, noise, sigmas, step=0)
    loss.backward()
    seconds = time.perf_counter() - start
    models.transformer.zero_grad(set_to_none=True)
    return seconds


def _timed_loss(z: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds for one CREPA loss forward + backward."""
    from ..functional import crepa_loss
    start = time.perf_counter()
    crepa_loss(z, y, distance=1).loss.backward()
    if z.device.type == "cuda":
        torch.cuda.synchronize(z.device)
    z.grad = None
    return time.perf_counter() - start


def compare_backends(args, models, reg, caption, batches, training: str, fused: str, why_no_fused: str | None,
                     token_shape: tuple[int, ...], device: torch.device) -> dict:
    """Median step time (forward + CREPA + backward on one batch) and CREPA-loss time per backend.

    The backends alternate run by run, so a load change on a shared machine hits both alike; the first
    run of each is a warm-up. The regularizer's schedule state is restored afterwards."""
    timing: dict = {"training_backend": training, "fused_backend": fused, "repeats": args.timing_repeats}
    names = ["reference"] if why_no_fused else [fused, "reference"]
    if why_no_fused:
        timing["fused_unavailable"] = why_no_fused
    batch = batches.next()
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(token_shape, generator=generator).to(device).requires_grad_(True)
    y = torch.randn(token_shape, generator=generator).to(device)
    steps = {name: [] for name in names}
    losses = {name: [] for name in names}
    schedule_state = reg.schedule.state_dict()
    try:
        for _ in range(args.timing_repeats + 1):
            for name in names:
                with _impl(name):
                    steps[name].append(_timed_step(models, reg, caption, batch))
                    losses[name].append(statistics.median(_timed_loss(z, y) for _ in range(10)))
    finally:
        reg.schedule.load_state_dict(schedule_state)
    for name in names:
        timing[f"step_ms_{name}"] = 1e3 * statistics.median(steps[name][1:])
        timing[f"loss_ms_{name}"] = 1e3 * statistics.median(losses[name][1:])
    return timing


# ----------------------------------------------------------------------------------------------- outputs

def _moving_average(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_align) = plt.subplots(1, 2, figsize=(11, 4))
    fm = [r["diffusion_loss"] for r in rows]
    ax_loss.plot(steps, fm, color="tab:blue", alpha=0.35, label="flow-matching loss")
    ax_loss.plot(steps, _moving_average(fm), color="tab:blue", label="flow-matching loss (5-step mean)")
    ax_loss.plot(steps, _moving_average([r["loss"] for r in rows]), color="tab:red",
                 label="total = flow matching + CREPA (5-step mean)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    for key, label, color in (("crepa_alignment_score", "alignment score", "tab:green"),
                              ("crepa_similarity_self", "similarity (same frame)", "tab:olive"),
                              ("crepa_alignment_score_ema", "alignment score EMA", "tab:gray")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax_align.plot(*zip(*points), color=color, label=label)
    ax_align.set_xlabel("step")
    ax_align.set_title("CREPA alignment")
    ax_align.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loss_token_shape(args, latents: torch.Tensor, width: int) -> tuple[int, int, int, int]:
    """(B, T, N, D) of the loss call in a training step: the student grid (Wan patches 2x2, LTX 1x1),
    resampled down to the encoder's ENCODER_GRID_SIDE^2 patches when that grid is smaller (docs/contract.md §3)."""
    from .models import ENCODER_GRID_SIDE
    patch = 2 if args.model == "wan" else 1
    tokens = (latents.shape[3] // patch) * (latents.shape[4] // patch)
    if not args.backbone:
        tokens = min(tokens, ENCODER_GRID_SIDE ** 2)
    return args.batch_size, latents.shape[2], tokens, width


def _mean(rows: list[dict], key: str, part: slice) -> float | None:
    values = [r[key] for r in rows[part] if key in r]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    try:
        _check_args(args)
    except ValueError as exc:
        print(f"repa-kernels demo: error: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        device = torch.device(args.device)
        with _impl(args.backend):
            training, fused, why_no_fused = _comparison_backends(args.backend, device)
    except (ValueError, RuntimeError) as exc:   # a bad --device, or BackendUnavailableError
        print(f"repa-kernels demo: error: {exc}", file=sys.stderr)
        return 2
    try:
        from .data import moving_shapes, to_vae_input
        from .models import build_video_models, caption_embedding, encode_to_latents, normalise_latents
        from ..regularizer import CrepaRegularizer
    except ImportError as exc:
        print(f"repa-kernels demo: error: {exc}. The demo needs diffusers, transformers, matplotlib and tqdm: "
              "pip install 'repa-kernels[diffusers]' matplotlib", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with _impl(args.backend):
        models = build_video_models(args.model, args.seed)
        encoder, image_size, encoder_label = (None, 0, "") if args.backbone else _encoder(args, args.seed)
        print("repa-kernels demo: a real CREPA fine-tune of a tiny video transformer. What is random-init:")
        for line in _describe_models(args, models, encoder_label):
            print(f"  - {line}")
        print(f"  backend: {args.backend} -> {training} ({backends.status(training, device)[1]})"
              + ("" if training == fused else f"; fused backend for the timing comparison: {fused}")
              + f"; {args.threads} CPU thread{'s' if args.threads > 1 else ''}")

        clips = moving_shapes(args.clips + HELD_OUT_CLIPS, CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE, seed=args.seed)
        t0 = time.perf_counter()
        raw = encode_to_latents(models.vae, to_vae_input(clips))
        latents = normalise_latents(models.vae, raw).to(device)
        models.transformer.to(device)
        models.vae.to(device)
        print(f"  encoded {clips.shape[0]} clips to latents {tuple(latents.shape[1:])} in "
              f"{time.perf_counter() - t0:.1f}s")
        train_latents, held_out = latents[:args.clips], latents[args.clips:]

        reg = CrepaRegularizer.from_config(_crepa_config(args, image_size), transformer=models.transformer,
                                           vae=None if args.backbone else models.vae,
                                           encoder=encoder, max_train_steps=args.steps, impl=args.backend)
        # the projector is the regularizer's own: its parameters join the transformer's
        optimizer = torch.optim.AdamW([*models.transformer.parameters(), *reg.parameters()], lr=args.lr,
                                      weight_decay=0.0)
        caption = caption_embedding(max(args.batch_size, HELD_OUT_CLIPS), args.seed).to(device)
        batches = Batches(train_latents, args.batch_size, args.seed)

        before = evaluate(models, reg, caption, held_out, args.seed)
        rows = train(args, models, reg, optimizer, caption, batches, out / "metrics.csv")
        after = evaluate(models, reg, caption, held_out, args.seed)

    token_shape = _loss_token_shape(args, latents, reg.projector.out_features)
    timing = None
    if args.timing_repeats:
        print(f"timing {args.timing_repeats} steps per backend (forward + CREPA + backward) ...")
        timing = compare_backends(args, models, reg, caption, batches, training, fused, why_no_fused, token_shape,
                                  device)

    elapsed = time.perf_counter() - started
    title = (f"tiny {type(models.transformer).__name__} (random init) + CREPA "
             f"({'backbone teacher' if args.backbone else 'DINOv2 teacher'}), backend {training}")
    write_plot(rows, out / "curves.png", title)
    n = max(1, min(5, len(rows) // 2))
    summary = {
        "model": args.model, "backbone": args.backbone, "steps": args.steps, "batch_size": args.batch_size,
        "seed": args.seed, "backend": training, "encoder": args.encoder or ("none (backbone)" if args.backbone else
                                                                            "random tiny Dinov2Model"),
        "random_init": ["transformer", "vae"] + ([] if args.backbone or args.encoder else ["encoder"]),
        "held_out_before": before, "held_out_after": after,
        "train_first_steps": {"steps": n, "diffusion_loss": _mean(rows, "diffusion_loss", slice(0, n)),
                              "alignment_score": _mean(rows, "crepa_alignment_score", slice(0, n))},
        "train_last_steps": {"steps": n, "diffusion_loss": _mean(rows, "diffusion_loss", slice(-n, None)),
                             "alignment_score": _mean(rows, "crepa_alignment_score", slice(-n, None))},
        "timing": timing, "token_shape": list(token_shape), "seconds_total": elapsed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    before, after = summary["held_out_before"], summary["held_out_after"]
    first, last = summary["train_first_steps"], summary["train_last_steps"]
    print("\nresults")
    print(f"  held-out flow-matching loss: {before['diffusion_loss']:.4f} -> {after['diffusion_loss']:.4f}   "
          f"alignment score: {before['alignment_score']:.4f} -> {after['alignment_score']:.4f}")
    print(f"  training, mean of the first vs last {first['steps']} steps: flow-matching loss "
          f"{first['diffusion_loss']:.4f} -> {last['diffusion_loss']:.4f}, alignment score "
          f"{first['alignment_score']:.4f} -> {last['alignment_score']:.4f}")
    print("  (the alignment score counts each frame's neighbour terms too, so it can exceed 1: up to 1 + 2/e ~ 1.74 "
          "here; crepa_normalize_neighbour_sum keeps it in [-1, 1])")
    timing = summary["timing"]
    if timing:
        ref_step, ref_loss = timing["step_ms_reference"], timing["loss_ms_reference"]
        if "fused_unavailable" in timing:
            print(f"  step time (reference): {ref_step:.0f} ms; no fused backend here: {timing['fused_unavailable']}")
        else:
            fused = timing["fused_backend"]
            f_step, f_loss = timing[f"step_ms_{fused}"], timing[f"loss_ms_{fused}"]
            print(f"  step time, forward + CREPA + backward: {fused} {f_step:.0f} ms vs reference {ref_step:.0f} ms "
                  f"(x{ref_step / f_step:.2f})")
            print(f"  CREPA loss alone, forward + backward on {tuple(summary['token_shape'])}: {fused} "
                  f"{f_loss:.3f} ms vs reference {ref_loss:.3f} ms (x{ref_loss / f_loss:.2f}); at this tiny size "
                  "the loss is a small part of the step")
    print(f"  random-init: {', '.join(summary['random_init'])} -- the curves show the regularizer working, not "
          "the quality CREPA gives a real model")
    print(f"  wrote {out / 'metrics.csv'}, {out / 'curves.png'}, {out / 'summary.json'} "
          f"({summary['seconds_total']:.0f}s in all)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repa_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
