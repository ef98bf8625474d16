// The extension as a Python module (`import repa_kernels._C` registers the ops) and its build facts.
// Included by exactly one translation unit (crepa_cosine.cpp): the build stays at two of them, which
// compiles ~15 % faster than a third file re-parsing the torch headers.
//
// The kernels register themselves with the dispatcher (TORCH_LIBRARY_FRAGMENT in crepa_cosine.cpp and
// manifold.cpp); the module itself is empty, so no pybind11 is needed. The just-in-time build loads
// the same sources as a plain shared library (torch.ops.load_library), where PyInit__C goes unused.
#pragma once

#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#ifndef REPA_BUILD_KIND
#define REPA_BUILD_KIND unknown
#endif

#include "common.h"

namespace repa {

// One line per fact, "key: value", parsed by repa_kernels/ops/cpp.py for `repa-kernels info`.
static std::string build_info() {
  std::string info;
  info += "build: " REPA_STRINGIFY(REPA_BUILD_KIND) "\n";
#if defined(__clang__)
  info += "compiler: clang " __clang_version__ "\n";
#elif defined(__GNUC__)
  info += "compiler: gcc " __VERSION__ "\n";
#else
  info += "compiler: unknown\n";
#endif
  info += "c++ standard: " + std::to_string(__cplusplus) + "\n";
#if defined(__OPTIMIZE__)
  info += "optimized: yes\n";
#else
  info += "optimized: no (built without -O)\n";
#endif
#if defined(_OPENMP)
  info += "openmp: " + std::to_string(_OPENMP) + "\n";
#else
  info += "openmp: no (at::parallel_for runs serially)\n";
#endif
  info += "simd: " REPA_SIMD_CLONES_NAME "\n";
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
  info += std::string("this cpu: ") +
          (__builtin_cpu_supports("x86-64-v4")   ? "x86-64-v4 (AVX-512)"
           : __builtin_cpu_supports("x86-64-v3") ? "x86-64-v3 (AVX2 + FMA)"
                                                 : "baseline x86-64") +
          "\n";
#endif
  return info;
}

static int64_t buffer_cache_release() { return BufferCache::instance().release_cached(); }

// [limit_bytes, cached_bytes, cached_blocks, hits, misses]
static std::vector<int64_t> buffer_cache_stats() {
  const BufferCache::Stats s = BufferCache::instance().stats();
  return {s.limit_bytes, s.cached_bytes, s.cached_blocks, s.hits, s.misses};
}

}  // namespace repa

TORCH_LIBRARY_FRAGMENT(repa_kernels, m) {
  m.def("build_info() -> str", &repa::build_info);
  m.def("buffer_cache_release() -> int", &repa::buffer_cache_release);
  m.def("buffer_cache_stats() -> int[]", &repa::buffer_cache_stats);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "repa_kernels C++ CPU kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
