"""`repa-kernels info` / `python -m repa_kernels.info`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from repa_kernels import __version__, backends, cli, info
from repa_kernels.ops import cpp


def test_info_text_reports_versions_backends_and_extension(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"repa-kernels {__version__}\n")
    assert f"torch: {torch.__version__}" in out
    assert "impl='auto' picks:" in out
    for device_type in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            ok, reason = backends.status(name, torch.device(device_type))
            assert f"{device_type:<4} {name:<9} {'available' if ok else 'unavailable'}: {reason}" in out
    ok, reason = cpp.status()
    assert f"  loaded: {ok}" in out and f"  reason: {reason}" in out
    if ok:
        assert f"  how: {cpp.extension().how}" in out
        assert "  flags: " + " ".join(cpp.extension().flags) in out
        assert "  openmp: " in out and "  compiler: " in out
        limit_mb = cpp.buffer_cache_stats()["limit_bytes"] >> 20
        assert ("  buffer cache: off" if limit_mb == 0 else
                f"  buffer cache: keeps up to {limit_mb} MB of freed gradient and scratch buffers") in out


def test_info_auto_choice_matches_the_backend_switch(capsys):
    assert info.run(info_args(json_output=True)) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["auto"]["cpu"]["backend"] == backends.resolve("auto", torch.device("cpu"))
    assert facts["auto"]["cpu"]["backend"] in ("cpp", "reference")
    if not torch.cuda.is_available():
        assert facts["auto"]["cuda"]["why"].startswith("no CUDA device here")
    assert facts["cpp extension"]["loaded"] == cpp.status()[0]


def test_info_reports_an_unavailable_extension_and_the_fallback(monkeypatch):
    broken = cpp.ExtensionState(False, "extension missing for this test")
    monkeypatch.setattr(cpp, "_state", broken)
    monkeypatch.setattr(backends, "_warned", set())
    text = info.render(info.collect())
    assert "cpu: reference (repa_kernels: impl='auto' falls back to the reference path on cpu because cpp is " \
           "unavailable: extension missing for this test)" in text
    assert "cpu  cpp       unavailable: extension missing for this test" in text
    assert "  loaded: False" in text


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "repa_kernels.info", "--json"], capture_output=True, text=True,
                          timeout=120, check=True)
    facts = json.loads(done.stdout)
    assert facts["repa_kernels"] == __version__
    assert set(facts["backends"]) == {"cpu", "cuda"}


def info_args(json_output: bool):
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    return parser.parse_args(["--json"] if json_output else [])


def test_a_subcommand_whose_module_fails_to_import_says_so(monkeypatch, capsys):
    """Only the chosen subcommand is imported; its import error is the message, whatever options follow."""
    monkeypatch.setitem(cli.SUBCOMMANDS, "bench", ("repa_kernels.no_such_module", "broken for the test"))
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--list"])
    assert info.value.code == 2
    assert "`bench` is unavailable: No module named 'repa_kernels.no_such_module'" in capsys.readouterr().err
    assert cli.main(["info"]) == 0   # the other subcommands are untouched
