// Shared helpers of the repa_kernels CPU kernels (crepa_cosine.cpp, manifold.cpp).
//
// Lean ATen headers on purpose (no <torch/extension.h>, no pybind11): the extension compiles in
// about a third of the time, which matters because CI builds it on 2 cores.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "buffer_cache.h"

// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (GCC
// function multi-versioning), so one build serves any x86-64 machine at full vector width.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define REPA_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define REPA_SIMD_CLONES_NAME "x86-64-v4 / x86-64-v3 / baseline clones picked at load time"
#else
#define REPA_SIMD_CLONES
#define REPA_SIMD_CLONES_NAME "compiler default target only"
#endif

// For a helper with several loops called from a SIMD-cloned kernel: GCC may otherwise keep it out of
// line, compiled for the baseline target only (SSE2 loops inside an AVX-512 clone).
#if defined(__GNUC__)
#define REPA_ALWAYS_INLINE inline __attribute__((always_inline))
#define REPA_NOINLINE __attribute__((noinline))
#else
#define REPA_ALWAYS_INLINE inline
#define REPA_NOINLINE
#endif

#define REPA_STRINGIFY_(x) #x
#define REPA_STRINGIFY(x) REPA_STRINGIFY_(x)

namespace repa {

constexpr double kEps = 1e-12;  // ||x|| < kEps: the token has no direction, normalised 0, gradient 0

// Accumulation type: fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64 inputs.
template <typename scalar_t> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename scalar_t> using acc_type = typename AccumulateType<scalar_t>::type;

inline void check_supported_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
              ": dtype must be float16, bfloat16, float32 or float64, got ", dtype);
}

// Every dimension of z and y at least 1: an empty token set has no mean similarity (the Python layer
// refuses it too; the dispatcher ops are public, so they check again).
inline void check_not_empty(const char* op, const at::Tensor& z, const at::Tensor& y) {
  TORCH_CHECK(z.numel() > 0 && y.numel() > 0, op, ": every dimension of z and y must be >= 1, got shapes ", z.sizes(),
              " and ", y.sizes());
}

inline at::ScalarType compute_scalar_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Huge and tiny magnitudes (docs/contract.md §2: norms must not overflow). A row is first used as it is; when
// its squared norm, so computed, lies outside [2^-64, 2^64] in fp32 ([2^-400, 2^400] in fp64), or
// overflowed to inf, it is used instead as x' = x 2^-e, with e the exponent of max|x| (so max|x'| is
// in [0.5, 1)): the power of two makes the scaling exact, the squares and dot products of x' cannot
// overflow, ||x|| = 2^e ||x'|| decides the zero-token rule and 1 / ||x'|| normalises x'. This is
// reference.safe_normalize's max-scaling, applied only where needed: rows of every realistic size
// (fp32: 2^-32 <= ||x|| <= 2^32) take the unscaled path, whose arithmetic is the same as without
// scaling (same bits, no extra pass), and within which every square, dot product (<= ||z|| ||y|| <=
// 2^64) and gradient coefficient (1 / ||x||^2 >= 2^-64) stays far inside the type's normal range.
template <typename acc_t>
struct UnscaledSquaredNormRange;
template <> struct UnscaledSquaredNormRange<float> { static constexpr float low = 0x1p-64f, high = 0x1p64f; };
template <> struct UnscaledSquaredNormRange<double> { static constexpr double low = 0x1p-400, high = 0x1p400; };

// Whether a row whose squared norm, computed as it is, came out as `squared_norm` must be rescaled
// (true for 0 too: the rare zero row then finds max|x| = 0 and stays as it is).
template <typename acc_t>
inline bool needs_rescaling(acc_t squared_norm) {
  using Range = UnscaledSquaredNormRange<acc_t>;
  return !(squared_norm >= Range::low && squared_norm <= Range::high);
}

// e (the row is used as x 2^-e) for a row with largest magnitude `peak`: the exponent of peak, or 0
// (used as it is) when peak is 0 or subnormal (then ||x|| <= peak sqrt(D) << kEps: a zero token either
// way), inf or NaN (which propagate as without scaling).
template <typename acc_t>
inline int scaling_exponent(acc_t peak) {
  if (!(peak >= std::numeric_limits<acc_t>::min()) || !std::isfinite(peak)) return 0;
  int exponent = 0;
  std::frexp(peak, &exponent);
  return exponent;
}

// 2^-e in acc_t, exact (also the subnormal 2^-128 for fp32, 2^-1024 for fp64).
template <typename acc_t>
inline acc_t power_of_two_scale(int exponent) {
  return std::ldexp(acc_t(1), -exponent);
}

// 1 / ||x'|| of a row used as x' = x 2^-e (e = 0: x itself), or 0 when ||x|| = 2^e ||x'|| < kEps (the
// zero-token rule).
inline double safe_inverse_norm(double squared_norm, int exponent = 0) {
  const double norm = std::sqrt(squared_norm);
  const double true_norm = exponent == 0 ? norm : std::ldexp(norm, exponent);
  return true_norm >= kEps ? 1.0 / norm : 0.0;
}

// The vector primitives below are `inline` so that each SIMD clone of a kernel inlines its own copy;
// `omp simd reduction` lets the compiler split the sums over vector lanes (a fixed order for a given
// build and machine, whatever the thread count).
template <typename T>
inline void squared_norms_and_dot(const T* a, const T* b, int64_t n, T& aa, T& bb, T& ab) {
  T saa = 0, sbb = 0, sab = 0;
#pragma omp simd reduction(+ : saa, sbb, sab)
  for (int64_t i = 0; i < n; ++i) {
    saa += a[i] * a[i];
    sbb += b[i] * b[i];
    sab += a[i] * b[i];
  }
  aa = saa;
  bb = sbb;
  ab = sab;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline T squared_norm(const T* a, int64_t n) {
  return dot(a, a, n);
}

// out = alpha * x
template <typename T>
inline void scale_into(T* out, const T* x, T alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = alpha * x[i];
}

// out += alpha * x
template <typename T>
inline void add_scaled(T* out, const T* x, T alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += alpha * x[i];
}

// The rare rescaling path of a row x of n values whose squared norm needs_rescaling: writes x 2^-e
// into out (which may be x) and returns e; returns 0 and leaves out alone when the row stays as it is
// (0, subnormal, inf or NaN peak). The caller then recomputes the row's sums with the same code as
// for an ordinary row, so that (barring subnormals) 2^k x gives exactly the results of x: the same
// cosines and normalised rows, bit for bit, and gradients exactly 2^-k times. Out of line (so
// baseline-compiled: it is rare, and scaling by a power of two is exact however it is vectorised).
template <typename acc_t>
REPA_NOINLINE int rescale_row(acc_t* out, const acc_t* x, int64_t n) {
  acc_t peak = 0;
  for (int64_t i = 0; i < n; ++i) peak = std::max(peak, std::abs(x[i]));
  const int exponent = scaling_exponent(peak);
  if (exponent != 0) scale_into(out, x, power_of_two_scale<acc_t>(exponent), n);
  return exponent;
}

// Ask for a row ahead of its use, one prefetch per 64-byte line (into L2: it is read a few times).
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 2);
}

template <typename S, typename T>
inline void convert_row(T* out, const S* in, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
}

}  // namespace repa
