"""End to end (docs/contract.md §8): a training step of a diffusers WanTransformer3DModel with and without CREPA.

Configurations, each a full optimizer step (flow-matching loss [+ CREPA], backward, AdamW step):
  baseline             no regularizer
  encoder / <backend>  CREPA with a DINOv2 teacher: VAE decode of the clean latents + encoder + loss
  backbone / <backend> CREPA with a deeper block of the same forward as the teacher (no decode, no encoder)
each CREPA configuration once with the reference loss and once with the fused backend `impl="auto"`
picks on the device (cpp on CPU, triton on CUDA), when that is not the reference itself. Then, with the
fused backend only, the teacher-feature cache (one process, three rows):
  cached-cold          every step a new key: a miss, so decode + encode as `encoder`, plus the write
  cached-warm          keys of the cold steps again, read from the flushed shards: no decode, no encoder
  teacher-features     the same features passed as `teacher_features=`, interleaved step by step with
                       cached-warm so both see the same machine state; `vs_teacher_features` of the
                       cached-warm row is the ratio of their medians (goal: at most 1.10)

Figures: step time (median, p20, p80 over `steps` timed steps after `warmup`; also the process's CPU
time per step, steadier than wall time on a shared machine), peak memory of a step
above the state before it (models, optimizer state, inputs) and in total, and frames encoded per step,
which must equal batch x latent frames in encoder mode (the teacher encodes one decoded frame per
latent frame) and 0 otherwise; frames decoded per step (the VAE's output frames; 0 on cache hits). On CPU each configuration runs in its own subprocess and memory is
peak RSS (as in measure.py); on CUDA it comes from the allocator.

Presets: `tiny` (CPU; random-init tiny Wan, Wan VAE and DINOv2, seconds per step) and `wan-1.3b`
(GPU; Wan2.1-T2V-1.3B's transformer config at 480p x 81 frames, the full Wan VAE and DINOv2-g/14
configs, random init, bf16 autocast).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import backends
from . import measure, report
from .workloads import DTYPES

CONFIGURATIONS = ("baseline", "encoder", "backbone")
CACHED_CONFIGURATIONS = ("cached-cold", "cached-warm", "teacher-features")


@dataclass(frozen=True)
class E2EPreset:
    """Model configs (diffusers / transformers kwargs) and the batch of one training step."""

    name: str
    device_class: str
    wan: dict
    vae: dict
    encoder: dict
    latent_shape: tuple[int, int, int, int, int]  # (B, C, F, H, W)
    text_shape: tuple[int, int]                    # (tokens, width) of the random text embedding
    encoder_image_size: int
    block_index: int
    teacher_block_index: int
    autocast_dtype: str | None = None
    encoder_dtype: str = "float32"
    gradient_checkpointing: bool = False  # needed at real sizes: 30 blocks x 32k tokens of activations
    description: str = ""

    @property
    def latent_frames_per_step(self) -> int:
        return self.latent_shape[0] * self.latent_shape[2]


PRESETS = {p.name: p for p in (
    E2EPreset(
        "tiny", "cpu",
        wan=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64),
        vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                 latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0]),
        encoder=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64,
                     patch_size=8),
        latent_shape=(1, 4, 5, 16, 16), text_shape=(8, 32), encoder_image_size=64,
        block_index=1, teacher_block_index=3,
        description="tiny random-init Wan (4 blocks, hidden 32), Wan VAE (base 8) and DINOv2 (hidden 32)"),
    E2EPreset(
        "wan-1.3b", "gpu",
        wan=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        vae=dict(),  # AutoencoderKLWan's defaults are the Wan2.1 VAE
        encoder=dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, image_size=518,
                     patch_size=14, use_swiglu_ffn=True),
        latent_shape=(1, 16, 21, 60, 104), text_shape=(512, 4096), encoder_image_size=518,
        block_index=8, teacher_block_index=16, autocast_dtype="bfloat16", encoder_dtype="bfloat16",
        gradient_checkpointing=True,
        description="Wan2.1-T2V-1.3B transformer at 480p x 81 frames, Wan VAE, DINOv2-g/14; random init"),
)}


@dataclass
class E2EResult:
    configuration: str
    impl: str = ""
    backend: str = ""
    status: str = "ok"
    reason: str = ""
    samples_ms: list[float] = field(default_factory=list)
    cpu_samples_ms: list[float] = field(default_factory=list)  # process CPU time (all threads) per step
    peak_step_extra_bytes: int | None = None
    peak_total_bytes: int | None = None
    memory_method: str = ""
    frames_encoded_per_step: float | None = None
    frames_decoded_per_step: float | None = None
    last_crepa_loss: float | None = None


def build_models(preset: E2EPreset, device: torch.device, with_encoder: bool):
    """(transformer, vae, encoder) with a fixed seed; vae and encoder are None unless `with_encoder`."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**preset.wan).to(device).train()
    if preset.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # diffusers' default: non-reentrant
    if not with_encoder:
        return transformer, None, None
    from transformers import Dinov2Config, Dinov2Model

    frozen_dtype = DTYPES[preset.autocast_dtype] if preset.autocast_dtype else torch.float32
    vae = AutoencoderKLWan(**preset.vae).to(device).eval().requires_grad_(False)
    if frozen_dtype != torch.float32:
        vae = vae.to(frozen_dtype)
    encoder = Dinov2Model(Dinov2Config(**preset.encoder)).eval().requires_grad_(False)
    return transformer, vae, encoder


class TrainingRun:
    """The models, regularizer, optimizer and fixed batch of one configuration; `step(index, **call)` is
    one optimizer step whose regularizer call gets `latents=` and `call` (e.g. cache_keys=)."""

    def __init__(self, preset: E2EPreset, configuration: str, impl: str, device: torch.device, *,
                 max_train_steps: int, feature_cache=None) -> None:
        from ..regularizer import CrepaRegularizer

        self.device = device
        self.transformer, vae, encoder = build_models(preset, device, with_encoder=configuration == "encoder")
        self.regularizer = None
        if configuration != "baseline":
            config = {"crepa_enabled": True, "crepa_block_index": preset.block_index,
                      "crepa_encoder_image_size": preset.encoder_image_size,
                      "crepa_encoder_dtype": preset.encoder_dtype}
            if configuration == "backbone":
                config.update(crepa_use_backbone_features=True, crepa_teacher_block_index=preset.teacher_block_index)
            cache = {} if feature_cache is None else {"feature_cache": feature_cache}
            self.regularizer = CrepaRegularizer.from_config(config, transformer=self.transformer, vae=vae,
                                                            encoder=encoder, max_train_steps=max_train_steps,
                                                            impl=impl, **cache)
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        if self.regularizer is not None:
            trainable += list(self.regularizer.parameters())   # the projector is the regularizer's own
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        generator = torch.Generator(device="cpu").manual_seed(1)
        self.latents = torch.randn(preset.latent_shape, generator=generator).to(device)
        self.text = torch.randn((preset.latent_shape[0],) + preset.text_shape, generator=generator).to(device)
        self.autocast_dtype = DTYPES[preset.autocast_dtype] if preset.autocast_dtype else None
        self.last_loss = None

    def frames(self) -> tuple[int, int]:
        """(decoded, encoded) so far."""
        if self.regularizer is None:
            return 0, 0
        return self.regularizer.frames_decoded, self.regularizer.frames_encoded

    def step(self, index: int, **call) -> None:
        latents, device = self.latents, self.device
        noise = torch.randn_like(latents)
        t = torch.rand(latents.shape[0], device=device)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            prediction = self.transformer(noisy, t * 1000, self.text, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
            if self.regularizer is not None:
                teacher_input = {"latents": latents} if "teacher_features" not in call else {}
                crepa_loss, _ = self.regularizer(**teacher_input, **call, step=index)
                loss = loss + crepa_loss
                self.last_loss = float(crepa_loss.detach())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _Phase:
    """Times steps of one row and counts the frames decoded and encoded during them."""

    def __init__(self, name: str, run: TrainingRun, timer) -> None:
        self.name, self.run, self.timer = name, run, timer
        self.samples, self.cpu_samples = [], []
        self.decoded = self.encoded = 0

    def step(self, index: int, **call) -> None:
        decoded, encoded = self.run.frames()
        cpu_start = time.process_time()
        self.timer.start()
        self.run.step(index, **call)
        self.samples.append(self.timer.stop())
        self.cpu_samples.append((time.process_time() - cpu_start) * 1e3)
        after = self.run.frames()
        self.decoded += after[0] - decoded
        self.encoded += after[1] - encoded
        self.last_loss = self.run.last_loss

    def result(self, impl: str, backend: str, **memory) -> E2EResult:
        steps = len(self.samples)
        return E2EResult(self.name, impl, backend, samples_ms=self.samples, cpu_samples_ms=self.cpu_samples,
                         frames_encoded_per_step=self.encoded / steps, frames_decoded_per_step=self.decoded / steps,
                         last_crepa_loss=self.last_loss, **memory)


def run_configuration(preset: E2EPreset, configuration: str, impl: str, device: torch.device, *,
                      steps: int, warmup: int, isolated: bool) -> E2EResult:
    """Build the models, warm up, then time `steps` optimizer steps of one configuration."""
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"configuration={configuration!r} is not valid; valid: {', '.join(CONFIGURATIONS)}")
    device = torch.device(device)
    backend = backends.resolve(impl, device) if configuration != "baseline" else ""
    run = TrainingRun(preset, configuration, impl, device, max_train_steps=warmup + steps)
    phase = _Phase(configuration, run, measure._Timer(device))
    for index in range(warmup):
        run.step(index)
    probe = measure.memory_probe(device, isolated)
    probe.start()
    for index in range(warmup, warmup + steps):
        phase.step(index)
    peak_extra = probe.stop()
    result = phase.result(impl if run.regularizer is not None else "", backend, peak_step_extra_bytes=peak_extra,
                          peak_total_bytes=_peak_total(device, isolated), memory_method=probe.method)
    if run.regularizer is None:
        result.frames_decoded_per_step = 0.0
    return result


def _peak_total(device: torch.device, isolated: bool) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if isolated:
        return measure._proc_status_kib("VmHWM") * 1024
    return None


def run_cached(preset: E2EPreset, impl: str, device: torch.device, *, steps: int, warmup: int,
               cache_root=None) -> list[E2EResult]:
    """The three cache rows (module docstring) from one process and one model: cold steps with new keys,
    then warm (cached) steps interleaved with teacher_features= steps of the same features."""
    import tempfile

    device = torch.device(device)
    backend = backends.resolve(impl, device)
    with tempfile.TemporaryDirectory(prefix="repa-e2e-cache-") as scratch:
        root = cache_root or scratch
        run = TrainingRun(preset, "encoder", impl, device, max_train_steps=warmup + 3 * steps + 2 * warmup,
                          feature_cache=root)
        timer = measure._Timer(device)
        cold, warm, features = (_Phase(name, run, timer) for name in CACHED_CONFIGURATIONS)
        keys = [[f"sample-{index}-{b}" for b in range(preset.latent_shape[0])] for index in range(warmup + steps)]
        index = 0
        for batch_keys in keys[:warmup]:
            run.step(index, cache_keys=batch_keys)
            index += 1
        for batch_keys in keys[warmup:]:
            cold.step(index, cache_keys=batch_keys)
            index += 1
        run.regularizer.flush_feature_cache()   # warm reads come from the shards on disk, as in a next epoch
        cache = run.regularizer.feature_cache("latents")
        grid = cache.get(keys[0][0]).grid
        stored = [torch.stack([cache.get(k, grid).features.flatten(1, 2) for k in batch_keys]).float().to(device)
                  for batch_keys in keys]
        for repeat in range(warmup + steps):
            timed = repeat >= warmup
            pick = repeat % len(keys)
            for phase, call in ((warm, {"cache_keys": keys[pick]}), (features, {"teacher_features": stored[pick]})):
                if timed:
                    phase.step(index, **call)
                else:
                    run.step(index, **call)
                index += 1
        run.regularizer.close_feature_cache()
    return [phase.result(impl, backend) for phase in (cold, warm, features)]


def run_isolated_configuration(preset: E2EPreset, configuration: str, impl: str, *, steps: int,
                               warmup: int, timeout_s: float = 3600.0) -> list[E2EResult]:
    """run_configuration (or run_cached for "cached") on CPU in its own subprocess (peak RSS belongs to
    that configuration)."""
    request = {"preset": preset.name, "configuration": configuration, "impl": impl, "steps": steps,
               "warmup": warmup}
    item, failure = measure.run_worker("repa_kernels.bench.e2e", request, timeout_s)
    if item is None:
        names = CACHED_CONFIGURATIONS if configuration == "cached" else (configuration,)
        return [E2EResult(name, impl, status="failed", reason=failure) for name in names]
    return [E2EResult(**fields) for fields in item]


def cases(device: torch.device) -> list[tuple[str, str]]:
    """(configuration, impl) pairs: baseline, then each CREPA mode with the reference and the fused
    backend (the latter only when `auto` does not fall back to the reference on this device), then the
    feature-cache rows ("cached") with the fused backend."""
    fused = backends.resolve("auto", device)
    pairs = [("baseline", "")]
    for configuration in ("encoder", "backbone"):
        pairs.append((configuration, "reference"))
        if fused != "reference":
            pairs.append((configuration, fused))
    pairs.append(("cached", fused))
    return pairs


def run_all(preset: E2EPreset, device: torch.device, *, steps: int, warmup: int, progress=None) -> list[E2EResult]:
    results = []
    for configuration, impl in cases(device):
        if progress is not None:
            progress.set_postfix_str(f"{configuration} {impl}".strip())
        try:
            if device.type == "cpu":
                results.extend(run_isolated_configuration(preset, configuration, impl or "reference", steps=steps,
                                                          warmup=warmup))
            elif configuration == "cached":
                results.extend(run_cached(preset, impl, device, steps=steps, warmup=warmup))
            else:
                results.append(run_configuration(preset, configuration, impl or "reference", device, steps=steps,
                                                 warmup=warmup, isolated=False))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # one configuration failing must not hide the others
            results.append(E2EResult(configuration, impl, status="failed",
                                     reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
        if progress is not None:
            progress.update(1)
    return results


E2E_COLUMNS = [
    "preset", "configuration", "impl", "backend", "status", "reason", "steps", "median_ms", "p20_ms", "p80_ms",
    "step_time_vs_baseline", "median_cpu_ms", "cpu_time_vs_baseline", "peak_step_extra_mb", "peak_total_mb", "memory_method", "frames_encoded_per_step",
    "frames_decoded_per_step", "latent_frames_per_step", "vs_teacher_features", "last_crepa_loss", "latent_shape",
    "device", "device_name", "threads", "torch_version", "triton_version", "package_version", "source_revision",
    "timestamp", "notes",
]


def result_rows(preset: E2EPreset, results: list[E2EResult], context: dict) -> list[dict]:
    baseline = next((r for r in results if r.configuration == "baseline" and r.samples_ms), None)
    baseline_ms = statistics.median(baseline.samples_ms) if baseline else None
    baseline_cpu_ms = statistics.median(baseline.cpu_samples_ms) if baseline else None
    features = next((r for r in results if r.configuration == "teacher-features" and r.samples_ms), None)
    features_ms = statistics.median(features.samples_ms) if features else None
    rows = []
    for r in results:
        median = statistics.median(r.samples_ms) if r.samples_ms else None
        cpu = statistics.median(r.cpu_samples_ms) if r.cpu_samples_ms else None
        rows.append({
            "preset": preset.name, "configuration": r.configuration, "impl": r.impl, "backend": r.backend,
            "status": r.status, "reason": r.reason, "steps": len(r.samples_ms), "median_ms": median,
            "p20_ms": measure.percentile(r.samples_ms, 20) if r.samples_ms else None,
            "p80_ms": measure.percentile(r.samples_ms, 80) if r.samples_ms else None,
            "step_time_vs_baseline": median / baseline_ms if median and baseline_ms else None,
            "median_cpu_ms": cpu, "cpu_time_vs_baseline": cpu / baseline_cpu_ms if cpu and baseline_cpu_ms else None,
            "peak_step_extra_mb": None if r.peak_step_extra_bytes is None else r.peak_step_extra_bytes / 2**20,
            "peak_total_mb": None if r.peak_total_bytes is None else r.peak_total_bytes / 2**20,
            "memory_method": r.memory_method, "frames_encoded_per_step": r.frames_encoded_per_step,
            "frames_decoded_per_step": r.frames_decoded_per_step,
            "latent_frames_per_step": preset.latent_frames_per_step if r.configuration in ("encoder", "cached-cold")
            else 0,
            "vs_teacher_features": median / features_ms if median and features_ms and r.configuration == "cached-warm"
            else None,
            "last_crepa_loss": r.last_crepa_loss, "latent_shape": "x".join(map(str, preset.latent_shape)),
            **context,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ["configuration", "impl", "median ms", "p20-p80 ms", "x baseline", "CPU ms", "x baseline",
              "step peak MB", "total MB", "frames encoded/step", "decoded/step", "x teacher_features"]
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append([row["configuration"], row["impl"], row["status"], row["reason"][:60]] + [""] * 8)
            continue
        ratio = "" if row["step_time_vs_baseline"] is None else f"{row['step_time_vs_baseline']:.2f}"
        total = "" if row["peak_total_mb"] is None else f"{row['peak_total_mb']:.0f}"
        extra = "" if row["peak_step_extra_mb"] is None else f"{row['peak_step_extra_mb']:.1f}"
        cpu = "" if row["median_cpu_ms"] is None else f"{row['median_cpu_ms']:.1f}"
        cpu_ratio = "" if row["cpu_time_vs_baseline"] is None else f"{row['cpu_time_vs_baseline']:.2f}"
        lines.append([row["configuration"], row["impl"], f"{row['median_ms']:.1f}",
                      f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}", ratio, cpu, cpu_ratio, extra, total,
                      f"{row['frames_encoded_per_step']:g} (expect {row['latent_frames_per_step']})",
                      "" if row["frames_decoded_per_step"] is None else f"{row['frames_decoded_per_step']:g}",
                      "" if row["vs_teacher_features"] is None else f"{row['vs_teacher_features']:.2f}"])
    return report.fixed_width(header, lines)


def write_plot(rows: list[dict], path) -> None:
    """Step time and peak step memory per configuration, one bar each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['configuration']}\n{r['impl']}".strip() for r in ok]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(labels, [r["median_ms"] for r in ok],
             yerr=[[r["median_ms"] - r["p20_ms"] for r in ok], [r["p80_ms"] - r["median_ms"] for r in ok]],
             capsize=3, color=[f"C{i}" for i in range(len(ok))])
    left.set_ylabel("step time (ms), bars p20-p80", fontsize=8)
    right.bar(labels, [r["peak_step_extra_mb"] or 0 for r in ok], color=[f"C{i}" for i in range(len(ok))])
    right.set_ylabel("peak memory of a step above its start (MiB)", fontsize=8)
    for axis in (left, right):
        axis.tick_params(labelsize=7)
    name = rows[0]["device_name"] if rows else ""
    figure.suptitle(f"training step, Wan preset {rows[0]['preset'] if rows else ''} on {name}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _worker(request_json: str) -> int:
    request = json.loads(request_json)
    preset, cpu = PRESETS[request["preset"]], torch.device("cpu")
    if request["configuration"] == "cached":
        results = run_cached(preset, request["impl"], cpu, steps=request["steps"], warmup=request["warmup"])
    else:
        results = [run_configuration(preset, request["configuration"], request["impl"], cpu, steps=request["steps"],
                                     warmup=request["warmup"], isolated=True)]
    print(json.dumps([dataclasses.asdict(result) for result in results]))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
