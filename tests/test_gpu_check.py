"""The GPU check (repa_kernels.bench.gpu_check) on CPU: its dry run end to end, so the one command a
lent GPU runs cannot rot, and the pieces whose mistakes the dry run could hide.

The dry run is every phase at tiny shapes under the Triton interpreter: 40-80 s on the 2-core machine.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repa_kernels.bench.gpu_check import cli, correctness, device_tests, install, sweep
from repa_kernels.bench.gpu_check.phases import PHASES, Budget, PhaseResult, run_phase
from repa_kernels.ops import tuned_launch, utils
from hopper_compile import needs_cuda_toolchain

REPOSITORY = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_dry_run_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPOSITORY), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-m", "repa_kernels.bench.gpu_check", "--dry", "--e2e", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels")], cwd=REPOSITORY, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("GPU CHECK SUMMARY"):]
    for phase in PHASES:  # the table comes last and names every phase
        assert f"] {phase}" in summary, summary
    assert "[SKIPPED] install" in summary and "no wheels in" in summary

    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    prefix = next(name[:-len("-e2e.csv")] for name in files if name.endswith("-e2e.csv"))
    assert set(files) == {"gpu-check.log", "checks.csv", "sweep.csv", f"{prefix}.csv", f"{prefix}-time.png",
                          f"{prefix}-memory.png", f"{prefix}-e2e.csv", f"{prefix}-e2e.png"}

    checks = read_csv(out / "checks.csv")
    tests = [r for r in checks if r["phase"] == "tests"]
    assert tests and all(r["status"] == "passed" for r in tests), tests
    assert all("[cpu" in r["name"] and "opcheck" in r["name"] for r in tests)
    checked = [r for r in checks if r["phase"] == "correctness"]
    assert len(checked) == 8 and all(r["status"] == "passed" for r in checked), checked
    assert all("NaN-poisoned" in r["detail"] and float(r["grad_error"]) < 1e-2 for r in checked)

    swept = read_csv(out / "sweep.csv")
    assert {r["kernel"] for r in swept} == {"token", "manifold_forward", "manifold_backward"}
    assert all(r["status"] == "ok" for r in swept), swept
    assert sum(r["is_default"] == "True" for r in swept) == 3

    timed = read_csv(out / f"{prefix}.csv")
    assert {(r["provider"], r["status"]) for r in timed} == {("triton", "ok"), ("reference", "ok")}
    e2e = read_csv(out / f"{prefix}-e2e.csv")
    assert [r["status"] for r in e2e] == ["ok"] * 2


def test_the_tests_phase_selects_the_device_tests_when_cuda_is_there(tmp_path):
    # A GPU machine, as far as collection can tell: conftest then parametrises every device test with
    # "cuda" too. Nothing runs (--collect-only).
    (tmp_path / "pretend_cuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(REPOSITORY), str(tmp_path))))
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "pretend_cuda", "-p", device_tests.PLUGIN,
               "-p", "no:cacheprovider", "--gpu-check-device", "cuda", *device_tests.test_files()]
    done = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    selected = [line for line in done.stdout.splitlines() if "::" in line]
    device_only = {"test_more_than_2_31_elements[triton]", "test_int64_offsets_beyond_2_31_elements",
                   "test_never_materialises_n_by_n"}
    for nodeid in selected:
        name = nodeid.split("::")[-1]
        assert "cuda" in name or name in device_only, nodeid
    names = {nodeid.split("::")[-1] for nodeid in selected}
    assert device_only <= names
    assert {"test_opcheck[cuda]", "test_torch_compile_fullgraph[cuda]",
            "test_fullgraph_compile_matches_eager[triton-cuda]"} <= names
    assert not any("compiles_for_hopper" in nodeid for nodeid in selected)
    assert len(selected) > 50


def test_poisoned_empty_shows_an_element_a_kernel_never_writes():
    def kernel_that_skips_the_last_element(x):
        out = torch.empty(x.shape)
        out[:-1] = x[:-1] * 2
        return out

    x = torch.randn(10)
    original = torch.empty
    with correctness.poisoned_empty() as poison:
        out = kernel_that_skips_the_last_element(x)
    assert poison.buffers == 1 and math.isnan(out[-1].item())
    assert correctness.relative_error(out, 2 * x) == math.inf
    assert torch.empty is original and not torch.empty(3, dtype=torch.int64).dtype.is_floating_point


def test_forced_launch_replaces_the_configuration_only_inside_the_region():
    before = utils.token_blocks(100, 64, torch.float32)
    forced = utils.TokenBlocks(4, 32, 2)
    with utils.forced_launch(token=forced):
        assert utils.token_blocks(100, 64, torch.float32) == forced
        assert utils.manifold_blocks(100, 64, 64, torch.float32, backward=False) != forced
    assert utils.token_blocks(100, 64, torch.float32) == before
    with pytest.raises(ValueError, match="unknown kernel 'tokens'; valid: token, manifold_forward, manifold_backward"):
        with utils.forced_launch(tokens=forced):
            pass
    with pytest.raises(TypeError, match="manifold_forward=TokenBlocks.* is not a ManifoldBlocks"):
        with utils.forced_launch(manifold_forward=forced):
            pass


def test_tuned_defaults_apply_on_the_gpu_path_per_dtype(monkeypatch):
    monkeypatch.setattr(utils, "_INTERPRETER", False)  # the compiled-kernel path, as on a GPU
    default_bf16 = utils.token_blocks(1560, 1536, torch.bfloat16)
    assert default_bf16 == utils.TokenBlocks(8, 256, 4)
    monkeypatch.setitem(tuned_launch.TUNED, ("token", "bfloat16"), dict(block_n=16, block_d=128, num_warps=8))
    monkeypatch.setitem(tuned_launch.TUNED, ("manifold_backward", "bfloat16"),
                        dict(block_m=128, block_n=64, block_k=64, block_out=64, num_warps=8, num_stages=2))
    assert utils.token_blocks(1560, 1536, torch.bfloat16) == utils.TokenBlocks(16, 128, 8)
    assert utils.token_blocks(1560, 40, torch.bfloat16) == utils.TokenBlocks(16, 64, 8)  # chunks <= padded width
    assert utils.token_blocks(1560, 1536, torch.float32) == utils.TokenBlocks(8, 128, 4)  # other dtypes: default
    assert utils.manifold_blocks(3600, 768, 768, torch.bfloat16, backward=True) == \
        utils.ManifoldBlocks(128, 64, 64, 64, 8, 2)
    assert utils.manifold_blocks(3600, 768, 768, torch.bfloat16, backward=False) == \
        utils.ManifoldBlocks(128, 128, 64, 64, 8, 3)


def test_the_shipped_tuned_table_is_what_the_writer_writes_for_an_empty_sweep(tmp_path):
    empty_sweep = tmp_path / "sweep.csv"
    sweep.write_csv([], empty_sweep)
    target = tmp_path / "tuned_launch.py"
    assert sweep.write_defaults(empty_sweep, target) == []
    shipped = (REPOSITORY / "repa_kernels" / "ops" / "tuned_launch.py").read_text()
    assert target.read_text() == shipped
    assert tuned_launch.TUNED == {}


def _row(kernel, workload, config, ms, default=False, status="ok", dtype="bfloat16"):
    return {"kernel": kernel, "dtype": dtype, "workload": workload, "shape": "B=1", "mode": "forward",
            "config": config, "status": status, "reason": "", "median_ms": ms, "is_default": default}


def test_sweep_chooses_only_a_configuration_faster_in_every_class_by_the_margin(tmp_path):
    a = "block_n=8 block_d=256 num_warps=4"
    b = "block_n=16 block_d=128 num_warps=8"
    c = "block_n=4 block_d=512 num_warps=4"
    rows = [_row("token", "video", a, 1.0, default=True), _row("token", "video", b, 0.8), _row("token", "video", c, 0.5),
            _row("token", "image", a, 1.0, default=True), _row("token", "image", b, 0.9),
            _row("token", "image", c, None, status="failed"),  # c did not run everywhere: not eligible
            _row("manifold_forward", "video", "block_m=128 block_n=128 block_k=64 block_out=64 num_warps=8 num_stages=3",
                 1.0, default=True),
            _row("manifold_forward", "video", "block_m=64 block_n=64 block_k=64 block_out=64 num_warps=4 num_stages=3",
                 0.99)]  # within the margin: the default stays
    for row in rows:
        if row["median_ms"]:
            default = next(r for r in rows if r["is_default"] and r["kernel"] == row["kernel"]
                           and r["workload"] == row["workload"])
            row["speedup_vs_default"] = default["median_ms"] / row["median_ms"]
    chosen = sweep.choose(rows)
    assert chosen == {("token", "bfloat16"): b}
    assert sweep.forced_for(chosen, "bfloat16") == {"token": utils.TokenBlocks(16, 128, 8)}
    assert sweep.forced_for(chosen, "float32") == {}

    path = tmp_path / "sweep.csv"
    sweep.write_csv(rows, path)
    target = tmp_path / "tuned_launch.py"
    assert sweep.write_defaults(path, target) == ["token bfloat16: block_n=16, block_d=128, num_warps=8"]
    namespace: dict = {}
    exec(target.read_text(), namespace)
    assert namespace["TUNED"] == {("token", "bfloat16"): dict(block_n=16, block_d=128, num_warps=8)}


def test_write_defaults_refuses_a_file_that_is_not_a_sweep(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("workload,provider\ncrepa,triton\n")
    with pytest.raises(ValueError, match="not a sweep CSV"):
        sweep.write_defaults(other, tmp_path / "t.py")


def test_phases_option_names_the_valid_phases():
    assert cli.parse_phases("workloads,sweep") == ["sweep", "workloads"]  # always in run order
    with pytest.raises(Exception, match="unknown phase.*benchmarks.*valid: install, tests, correctness"):
        cli.parse_phases("sweep,benchmarks")


def test_two_versions_of_one_wheel_are_refused(tmp_path):
    for name in ("diffusers-0.42.1-py3-none-any.whl", "diffusers-0.41.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="two wheels of diffusers"):
        install.find_wheels(tmp_path)


def test_a_failing_phase_is_recorded_and_does_not_raise():
    def body(budget: Budget, result: PhaseResult):
        raise RuntimeError("kernel exploded")

    lines = []
    result = run_phase("sweep", 5.0, body, lines.append)
    assert result.status == "failed" and result.error == "RuntimeError: kernel exploded"
    assert any("Traceback" in line for line in lines)


@needs_cuda_toolchain
def test_a_sweep_configuration_compiles_for_hopper_as_forced():
    # --compile-grid's path: the configuration reaches the sm_90 compile (8 warps: half the registers of 4)
    import json

    code = ("import json, dataclasses\n"
            "from repa_kernels.bench.gpu_check import settings, sweep\n"
            "first = settings.GPU_SWEEP[0]\n"
            "one = dataclasses.replace(first, grid=(first.grid[0], first.grid[3]))\n"
            "print(json.dumps([(str(c), dataclasses.asdict(r)) for k, d, c, r in sweep.compile_grid([one])]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPOSITORY, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (default, default_report), (wide, wide_report) = json.loads(done.stdout.strip().splitlines()[-1])
    assert "num_warps=4" in default and "num_warps=8" in wide
    assert default_report["stack_bytes"] == wide_report["stack_bytes"] == 0
    assert wide_report["registers"] < default_report["registers"]


def test_gpu_budgets_fit_five_minutes_and_the_device_call():
    from repa_kernels.bench.gpu_check import phases, settings

    budgets = settings.GPU.budgets
    assert sum(budgets[name] for name in phases.DEFAULT_PHASES) <= 300  # install..workloads
    # each phase may overrun by the alarm's grace; the documented timeout_s of the device call is 420
    worst = sum(budgets[name] + phases.HARD_STOP_GRACE_S for name in phases.DEFAULT_PHASES)
    assert worst + 20 <= 420  # + python and torch start


def test_each_gpu_sweep_grid_starts_with_the_default_it_is_measured_against(monkeypatch):
    from repa_kernels.bench.gpu_check import settings

    monkeypatch.setattr(utils, "_INTERPRETER", False)  # the compiled-kernel path, as on a GPU
    for sweep_class in settings.GPU_SWEEP:
        default = sweep.default_config(sweep_class.kernel, sweep_class.workload)
        assert sweep_class.grid[0] == default, (sweep_class.kernel, sweep_class.workload.name)
        assert len(set(sweep_class.grid)) == len(sweep_class.grid)
    # one grid per kernel and dtype: a configuration can be chosen only if it ran in every class
    grids = {}
    for sweep_class in settings.GPU_SWEEP:
        grids.setdefault((sweep_class.kernel, sweep_class.workload.dtype), set()).add(sweep_class.grid)
    assert all(len(g) == 1 for g in grids.values()), grids


def test_a_rerun_can_narrow_the_workloads_and_widen_the_compiled_dtypes():
    from repa_kernels.bench.gpu_check import settings

    narrow = cli.narrowed(settings.GPU, ("manifold-16k-fp32", "repa-sit"), ("bfloat16", "float32"))
    assert [w.name for w in narrow.workloads] == ["repa-sit", "manifold-16k-fp32"]
    assert [w.name for w in narrow.correctness] == ["repa-sit", "manifold-16k-fp32"]
    assert narrow.compiled_dtypes == ("bfloat16", "float32")
    with pytest.raises(SystemExit, match="--workloads: unknown crepa-4k; valid: .*crepa-wan480p"):
        cli.narrowed(settings.GPU, ("crepa-4k",), None)
    with pytest.raises(SystemExit, match="--compiled-dtypes: unknown fp32; valid: float16, bfloat16"):
        cli.narrowed(settings.GPU, None, ("fp32",))
