"""tools/trace_call_hops.py: the hop counter of one regularizer call (a readability measure)."""

import importlib.util
import os
import sys

import pytest

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "trace_call_hops.py")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("trace_call_hops", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A two-file package on sys.path: hoppkg/a.py calls hoppkg/b.py."""
    root = tmp_path_factory.mktemp("hops")
    package = root / "hoppkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from . import b\n"
        "def top():\n"
        "    x = b.one()\n"       # a -> b -> a
        "    y = b.one()\n"       # a -> b -> a
        "    return local() + x + y + sum([1, 2])\n"   # same file, a builtin: no hop
        "def local():\n"
        "    return 1\n")
    (package / "b.py").write_text("def one():\n    return two()\ndef two():\n    return 1\n")
    sys.path.insert(0, str(root))
    yield package
    sys.path.remove(str(root))


def test_hops_count_changes_of_file_in_both_directions(tool, package):
    from hoppkg import a
    trace, result = tool.trace_hops(a.top, str(package))
    assert result == 6
    assert trace.path == ("hoppkg/a.py", "hoppkg/b.py", "hoppkg/a.py", "hoppkg/b.py", "hoppkg/a.py")
    assert trace.hops == 4 and trace.files == 2
    assert trace.entries() == {"hoppkg/a.py": 3, "hoppkg/b.py": 2}


def test_frames_outside_the_package_are_not_hops(tool, package):
    from hoppkg import b
    trace, _ = tool.trace_hops(lambda: b.one(), str(package))   # the lambda lives in this test file
    assert trace.path == ("hoppkg/b.py",) and trace.hops == 0


def test_one_crepa_call_on_the_tiny_wan_stays_readable(tool):
    """The regularizer half of one call: 50 hops over 9 files before the reshape into families, call
    inputs and teachers, 30 after; the kernel half is not counted here (it has its own shape)."""
    trace = tool.trace_tiny_wan_call("reference", within="regularizer")
    assert trace.hops <= 30, f"{trace.hops} hops: " + " -> ".join(trace.path)
    assert trace.entries()["regularizer/crepa.py"] <= 2
