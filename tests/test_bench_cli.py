"""The benchmark machinery: workload accounting, percentiles, CPU peak-memory isolation, and
`repa-kernels bench` end to end on a CI-size workload (CSV columns, PNGs, table)."""

import csv
import math

import pytest
import torch

from repa_kernels.bench import measure, report
from repa_kernels.bench.cli import file_prefix
from repa_kernels.bench.providers import availability, loss_function
from repa_kernels.bench.workloads import MODES, WORKLOADS, Workload, default_workloads, get_workload
from repa_kernels.cli import main
from repa_kernels.options import CrepaOptions


def test_spec_workloads_are_registered_with_their_shapes():
    wan = get_workload("crepa-wan480p")
    assert wan.z_shape == (1, 21, 1560, 1536) and wan.options.distance == 1 and wan.device_class == "gpu"
    cumulative = get_workload("crepa-cumulative")
    assert cumulative.options == CrepaOptions(distance=4, cumulative=True)
    assert get_workload("manifold-16k").z_shape == (1, 1, 16384, 1024)
    assert get_workload("manifold-4k-cpu").z_shape == (1, 1, 4096, 384)
    assert get_workload("urepa-cpu").z_shape == (4, 1, 1024, 768) and get_workload("urepa-cpu").dtype == "float32"
    assert [w.name for w in default_workloads("cpu")] == ["crepa-cpu", "urepa-cpu", "manifold-4k-cpu"]
    assert {w.name for w in default_workloads("cuda")} == {
        "crepa-wan480p", "crepa-cumulative", "repa-sit", "urepa-sdxl", "manifold-video", "manifold-16k"}
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        get_workload("nope")


def test_bytes_follow_the_five_and_three_pass_counts():
    workload = get_workload("crepa-cpu")
    tensor = 1 * 13 * 1024 * 768 * 4
    assert workload.bytes_moved("forward") == 2 * tensor
    assert workload.bytes_moved("backward") == 3 * tensor
    assert workload.bytes_moved("forward+backward") == 5 * tensor
    assert workload.bytes_moved_stretch("forward+backward") == 3 * tensor
    assert workload.bytes_moved_stretch("forward") is None
    assert workload.flops("forward+backward") == 0


def test_flops_count_the_cheaper_of_the_gram_and_identity_forms():
    # N = 10 < K = Dz + Dy = 12: the N x N Gram form is cheaper
    gram = Workload("m", "manifold", 2, 3, 10, 4, 8, "float32", "cpu")
    slices = 2 * 3
    assert gram.flops_form() == "gram"
    assert gram.flops("forward") == slices * 10 * 10 * 12  # the upper triangle of a symmetric Gram
    assert gram.flops("backward") == 2 * slices * 10 * 10 * 4
    assert gram.flops("forward+backward") == slices * 10 * 10 * (12 + 2 * 4)
    # N = 4096 > K = 768: the K x K identity form is cheaper
    identity = get_workload("manifold-4k-cpu")
    assert identity.flops_form() == "identity"
    assert identity.flops("forward") == 4096 * 768 * 768
    assert identity.flops("backward") == 2 * 4096 * 768 * 384
    assert get_workload("urepa-sdxl").flops_form() == "gram"
    with pytest.raises(ValueError, match="mode='sideways' is not valid"):
        gram.flops("sideways")


def test_workload_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="op='gram' is not valid"):
        Workload("x", "gram", 1, 1, 4, 4, 4, "float32", "cpu")
    with pytest.raises(ValueError, match="needs width_z == width_y"):
        Workload("x", "crepa", 1, 1, 4, 4, 8, "float32", "cpu")
    with pytest.raises(ValueError, match="tokens must be an integer >= 1"):
        Workload("x", "crepa", 1, 1, 0, 4, 4, "float32", "cpu")
    workload = get_workload("crepa-cumulative")
    assert Workload.from_dict(workload.to_dict()) == workload


def test_percentile_interpolates():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert measure.percentile(samples, 50) == 3.0
    assert measure.percentile(samples, 20) == pytest.approx(1.8)
    assert measure.percentile(samples, 80) == pytest.approx(4.2)
    assert measure.percentile([7.0], 20) == 7.0


def test_providers_compute_the_reference_loss_and_skip_triton_on_cpu():
    workload = get_workload("urepa-cpu-ci")
    z, y = workload.make_inputs("cpu")
    from repa_kernels import urepa_loss
    expected = urepa_loss(z, y, impl="reference").loss
    assert torch.equal(loss_function("reference", workload)(z, y), expected)
    ok, reason = availability("triton", workload, torch.device("cpu"))
    assert not ok and "interpreter" in reason
    with pytest.raises(ValueError, match="unknown provider 'numpy'"):
        availability("numpy", workload, torch.device("cpu"))


def test_isolated_cpu_peak_memory_sees_the_gram_matrices():
    # N = 1024, D = 8: the inputs are 32 KiB each, the two fp32 Grams 4 MiB each; an honest peak is
    # at least the two Grams and nowhere near the process's whole RSS.
    workload = Workload("gram-probe", "manifold", 1, 1, 1024, 8, 8, "float32", "cpu", ci=True)
    (result,) = measure.run_isolated(workload, "reference", ["forward"], repeats=2, warmup=1)
    assert result.status == "ok", result.reason
    assert len(result.samples_ms) == 2 and all(t > 0 for t in result.samples_ms)
    assert 8 * 2**20 <= result.peak_extra_bytes < 100 * 2**20, result.peak_extra_bytes
    assert "VmHWM" in result.memory_method


def test_isolated_cpu_peak_memory_counts_the_gradient_the_cpp_cache_keeps():
    # dZ is 9 MiB; after warm-up the C++ buffer cache holds its block, so the probe must empty the cache
    # before taking the baseline, or the gradient would not count at all.
    from repa_kernels.ops import cpp

    if not cpp.status()[0]:
        pytest.skip(f"C++ extension unavailable: {cpp.status()[1]}")
    workload = Workload("cache-probe", "crepa", 1, 3, 1024, 768, 768, "float32", "cpu", ci=True)
    (result,) = measure.run_isolated(workload, "cpp", ["forward+backward"], repeats=2, warmup=2)
    assert result.status == "ok", result.reason
    gradient_bytes = 3 * 1024 * 768 * 4
    assert gradient_bytes <= result.peak_extra_bytes < 3 * gradient_bytes, result.peak_extra_bytes


@pytest.mark.parametrize("argv, message", [
    (["--e2e", "--workload", "crepa-cpu"], "--workload select kernel workloads; --e2e times training steps"),
    (["--e2e", "--modes", "forward", "--providers", "cpp"], "--modes, --providers select kernel workloads"),
    (["--e2e-preset", "tiny"], "--e2e-preset tiny needs --e2e"),
    (["--e2e", "--e2e-preset", "wan-1.3b", "--device", "cpu"], "--e2e-preset wan-1.3b is sized for a gpu, not cpu"),
])
def test_bench_options_that_would_be_ignored_are_refused(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_time_mode_rejects_bad_repeats():
    workload = get_workload("crepa-cpu-ci")
    z, y = workload.make_inputs("cpu")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure.time_mode(loss_function("reference", workload), z, y, "forward", repeats=0, warmup=0)


@pytest.mark.slow
def test_bench_cli_writes_csv_plots_and_table(tmp_path, capsys):
    code = main(["bench", "--workload", "crepa-cpu-ci", "--device", "cpu", "--out", str(tmp_path),
                 "--providers", "reference", "triton", "--repeats", "2", "--warmup", "1", "--name", "ci"])
    assert code == 0
    with open(tmp_path / "ci.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in ("reference", "triton") for m in MODES]
    for row in rows[:3]:
        assert row["status"] == "ok" and row["device"] == "cpu" and row["torch_version"] == torch.__version__
        median, p20, p80 = float(row["median_ms"]), float(row["p20_ms"]), float(row["p80_ms"])
        assert 0 < p20 <= median <= p80
        assert float(row["peak_extra_mb"]) > 0 and "noisy" in row["notes"]
    for row in (rows[0], rows[2]):
        assert 0 < float(row["fraction_of_bound"]) and math.isfinite(float(row["achieved_bytes_per_s"]))
        assert row["bound_kind"] == "bytes"
    assert rows[2]["fraction_of_stretch"] != "" and rows[0]["fraction_of_stretch"] == ""
    assert rows[1]["mode"] == "backward" and rows[1]["fraction_of_bound"] == "" and rows[1]["bound_kind"] == ""
    for row in rows[3:]:
        assert row["status"] == "skipped" and "interpreter" in row["reason"] and row["median_ms"] == ""
    for name in ("ci-time.png", "ci-memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "crepa-cpu-ci" in printed and "of bound" in printed and "skipped" in printed


def test_bench_cli_lists_workloads_and_names_files_by_device(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in WORKLOADS)
    assert file_prefix(torch.device("cpu"), "AMD EPYC 7B13 64-Core Processor") == "cpu-amd-epyc-7b13-64-core-processor"
    with pytest.raises(SystemExit) as info:
        main(["bench", "--repeats", "0"])
    assert info.value.code == 2 and "--repeats: must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_e2e_training_steps_encode_one_frame_per_latent_frame():
    # A smaller preset than `tiny` so that three in-process configurations take a few seconds.
    import dataclasses

    from repa_kernels.bench import e2e

    preset = dataclasses.replace(e2e.PRESETS["tiny"], name="test", latent_shape=(2, 4, 2, 8, 8),
                                 encoder_image_size=32,
                                 encoder=dict(e2e.PRESETS["tiny"].encoder, image_size=32, patch_size=8))
    cpu = torch.device("cpu")
    results = {c: e2e.run_configuration(preset, c, "reference", cpu, steps=1, warmup=0, isolated=False)
               for c in e2e.CONFIGURATIONS}
    for result in results.values():
        assert result.status == "ok" and len(result.samples_ms) == 1 and result.samples_ms[0] > 0
    assert results["encoder"].frames_encoded_per_step == 2 * 2 == preset.latent_frames_per_step
    assert results["backbone"].frames_encoded_per_step == 0 and results["baseline"].frames_encoded_per_step == 0
    assert math.isfinite(results["encoder"].last_crepa_loss) and math.isfinite(results["backbone"].last_crepa_loss)
    assert results["baseline"].last_crepa_loss is None
    rows = e2e.result_rows(preset, list(results.values()), {"device": "cpu", "device_name": "test"})
    assert rows[0]["step_time_vs_baseline"] == 1.0 and rows[1]["latent_frames_per_step"] == 4
    assert "encoder" in e2e.format_rows(rows)


@pytest.mark.slow
def test_e2e_cache_rows_decode_and_encode_only_when_cold(tmp_path):
    import dataclasses

    from repa_kernels.bench import e2e

    preset = dataclasses.replace(e2e.PRESETS["tiny"], name="test", latent_shape=(2, 4, 2, 8, 8),
                                 encoder_image_size=32,
                                 encoder=dict(e2e.PRESETS["tiny"].encoder, image_size=32, patch_size=8))
    results = e2e.run_cached(preset, "reference", torch.device("cpu"), steps=1, warmup=0, cache_root=tmp_path)
    cold, warm, features = results
    assert [r.configuration for r in results] == list(e2e.CACHED_CONFIGURATIONS)
    assert all(r.status == "ok" and len(r.samples_ms) == 1 for r in results)
    assert cold.frames_encoded_per_step == 2 * 2 and cold.frames_decoded_per_step == 2 * 3   # 2 latent -> 3 frames
    assert (warm.frames_encoded_per_step, warm.frames_decoded_per_step) == (0, 0)
    assert (features.frames_encoded_per_step, features.frames_decoded_per_step) == (0, 0)
    assert all(math.isfinite(r.last_crepa_loss) for r in results)
    rows = e2e.result_rows(preset, results, {"device": "cpu", "device_name": "test"})
    assert rows[1]["vs_teacher_features"] > 0 and rows[0]["vs_teacher_features"] is None
    assert "cached-warm" in e2e.format_rows(rows)
