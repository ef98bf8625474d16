"""Builds the optional C++ CPU extension `repa_kernels._C` from csrc/ when torch is importable.

`pip install --no-build-isolation .` (what `make test` uses) compiles it ahead of time. A plain
`pip install .` builds in an isolated environment without torch: the package then installs as pure
Python and compiles the extension just in time on first use (repa_kernels/ops/cpp.py), from the csrc/
sources that every wheel carries in repa_kernels/csrc/.
"""

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
HEADERS = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.h"))


def cpp_backend_constant(name: str) -> list:
    """A list constant of repa_kernels/ops/cpp.py (the one place the compiler flags are written)."""
    tree = ast.parse((ROOT / "repa_kernels" / "ops" / "cpp.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"repa_kernels/ops/cpp.py defines no {name}")


class BuildPyWithSources(build_py):
    """Also ships csrc/ inside the package (repa_kernels/csrc/) for the just-in-time build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "repa_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in SOURCES + HEADERS:
            shutil.copy2(ROOT / source, target / Path(source).name)


def extension_kwargs() -> dict:
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("repa_kernels: torch is not importable at build time; installing without the C++ extension "
              "(it is compiled on first use)")
        return {}
    if not SOURCES:
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A failed build (no compiler, a broken toolchain) leaves a pure-Python install, which retries
        just in time on first use and otherwise says why in `repa-kernels info`."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # torch raises RuntimeError / CalledProcessError, not CompileError
                print(f"repa_kernels: WARNING: the C++ extension failed to build ({type(exc).__name__}: {exc}); "
                      "installing without it (it is compiled just in time on first use)")
                self.extensions = []  # nothing to copy or package
                self.distribution.ext_modules = []

    ext = CppExtension("repa_kernels._C", SOURCES, depends=HEADERS, include_dirs=[str(CSRC)],
                       extra_compile_args=cpp_backend_constant("EXTRA_CFLAGS") + ["-DREPA_BUILD_KIND=setup"],
                       extra_link_args=cpp_backend_constant("EXTRA_LDFLAGS"))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":
    kwargs = extension_kwargs()
    kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
    setup(**kwargs)
