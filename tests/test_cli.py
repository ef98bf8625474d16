"""The CLI checks each subcommand's optional dependencies before any work, and names the extra to install."""

from __future__ import annotations

import importlib

import pytest

from repa_kernels import cli


@pytest.fixture
def without(monkeypatch):
    """without(*names): find_spec answers None for these modules; the subcommands' run must not be reached."""
    def hide(*names):
        real = cli.find_spec
        monkeypatch.setattr(cli, "find_spec", lambda name: None if name in names else real(name))
        for command, (module_name, _) in cli.SUBCOMMANDS.items():
            module = importlib.import_module(module_name)
            monkeypatch.setattr(module, "run", lambda args, command=command: pytest.fail(f"{command} started"))
    return hide


@pytest.mark.parametrize("argv, missing, extra", [
    (["demo", "--steps", "1"], "matplotlib", "demo"),
    (["demo"], "diffusers", "demo"),
    (["bench", "--device", "cpu"], "matplotlib", "bench"),
    (["bench", "--e2e", "--device", "cpu"], "diffusers", "diffusers"),
])
def test_a_missing_optional_dependency_is_named_before_any_work(without, capsys, argv, missing, extra):
    without(missing)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}" in err and f"pip install 'repa-kernels[{extra}]'" in err, err


def test_commands_that_do_not_need_it_still_run(monkeypatch, capsys):
    real = cli.find_spec
    monkeypatch.setattr(cli, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert cli.main(["bench", "--list"]) == 0
    assert "crepa" in capsys.readouterr().out
