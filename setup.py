"""Builds the optional C++ CPU extension `repa_kernels._C` from csrc/ when torch is importable.

`pip install --no-build-isolation .` (what `make test` uses) compiles it ahead of time. A plain
`pip install .` builds in an isolated environment without torch: the package then installs as pure
Python and compiles the extension just in time on first use (repa_kernels/ops/cpp.py).
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))


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
    ext = CppExtension("repa_kernels._C", SOURCES, extra_compile_args=["-O3", "-fopenmp"],
                       extra_link_args=["-fopenmp"], include_dirs=[str(ROOT / "csrc")])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":
    setup(**extension_kwargs())
