// Manifold (Gram difference) term (docs/contract.md §2.2) on CPU, never holding an N x N matrix.
//
// repa_kernels::manifold(z, y, need_dz, need_dy, path)
//   z: (B, T, N, Dz), y: (B, T, N, Dy), same dtype (float16, bfloat16, float32, float64), unit stride
//   over the last dim. path: 0 = pick the cheaper form, 1 = tiled Gram form, 2 = D x D identity form.
// Returns (loss, dz, dy): the loss, a 0-d tensor in the compute dtype (fp32, fp64 for fp64 inputs),
// and d loss / d z, d loss / d y in the input dtype, contiguous, or empty (0,) tensors when not asked.
//
// Per slice s = (b, t), with A = [Ẑ | Ŷ] (N x K, K = Dz + Dy) and S = diag(+1 on z columns, -1 on y):
//   E = A S Aᵀ = Ẑ Ẑᵀ - Ŷ Ŷᵀ,  loss = sum_s ||E_s||² / (B T N²),  d loss / d A = 4 E A S / (B T N²)
// then the normalisation backward. Two forms:
// - Tiled (fp32, fp64 for fp64 inputs): A' = A S is normalised once; for row tiles I <= J,
//   E_IJ = (A'_I S) A'_Jᵀ is one GEMM (the sign flip folds the two Grams into one), its squares are
//   summed (twice off the diagonal: E is symmetric, so only the upper tiles are formed), and the
//   gradient takes dA_I += E_IJ A'_J and dA_J += E_IJᵀ A'_I. Work ~ (0.5 + 1) N² K multiply-adds against
//   the 3 N² K of an autograd reference; memory: A', dA and one tile.
// - Identity (always fp64): ||E||² = sum_ij s_i s_j M_ij² with M = Aᵀ A (K x K) and
//   d loss / d A = 4 A (S M S) / (B T N²). Work 2 N K², memory K² plus a row chunk: cheaper when N >> K.
//   It subtracts large nearly equal numbers near convergence (Z ≈ Y), so it runs in fp64: measured in
//   fp32 (N=1024, K=128, Y = Z + 1e-4 noise, loss 3.2e-10) its loss was off by 1.3e-10 (40 %), while
//   the fp64 form matches the fp64 truth to 4e-18. fp64 GEMMs run at half the fp32 rate here, which the
//   cost model below accounts for.
// Slices run in parallel (each with single-threaded BLAS) when there are at least as many as threads
// or they are small; otherwise one after another with multi-threaded BLAS. Every reduction goes per
// row or per slice into its own slot, added serially: the same bits for any thread count given
// bitwise-stable GEMMs (MKL's sgemm/dgemm gave identical bits for 1 and 2 threads on this machine and
// tests/test_cpp_manifold.py checks it; MKL does not promise that in general).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace repa {

#ifndef REPA_TILE_ROWS  // build-time knob: 256 and 512 measured alike here; 256 does less work
#define REPA_TILE_ROWS 256
#endif
constexpr int64_t kTileRows = REPA_TILE_ROWS;     // rows of a Gram tile (tiled form)
constexpr int64_t kIdentityChunkElements = 1 << 20;  // fp64 row chunk of A (identity form): 8 MB
constexpr double kSmallSliceWork = 1 << 25;       // multiply-adds below which a slice runs single-threaded

template <typename scalar_t>
struct SliceRows {  // rows (N, D) of one (b, t) slice, unit stride over D
  const scalar_t* base;
  int64_t row_stride, width;
  const scalar_t* row(int64_t n) const { return base + n * row_stride; }
};

template <typename scalar_t>
struct SliceGrad {  // contiguous gradient rows of one slice, nullptr when not asked
  scalar_t* base;
  int64_t width;
};

// x <- sign x / ||x|| in place (0 when ||x|| < kEps); returns 1 / ||x|| (0 for a zero token). A row
// whose squared norm is out of range (common.h, needs_rescaling) is first rescaled exactly by 2^-e, so
// that its squares cannot overflow: 1e30 in fp32 normalises like 1. In the identity form acc_t is
// fp64, which holds the squares of every fp32 / fp16 / bf16 value: only fp64 inputs beyond ~2^±200
// are rescaled there.
template <typename acc_t>
REPA_ALWAYS_INLINE double normalize_in_place(acc_t* x, int64_t n, acc_t sign) {
  acc_t squared;
  int exponent = 0;
  for (bool first = true;; first = false) {  // one call site: the same summation order after rescaling
    squared = squared_norm(x, n);
    if (!first || !needs_rescaling(squared) || (exponent = rescale_row(x, x, n)) == 0) break;
  }
  const double inverse = safe_inverse_norm(squared, exponent);  // 1 / ||x 2^-e||
  scale_into(x, x, sign * static_cast<acc_t>(inverse), n);
  return exponent == 0 ? inverse : std::ldexp(inverse, -exponent);
}

// Rows [n0, n1) of [ẑ | y_sign ŷ] into out (row stride ld), inverse norms (fp64: 1 / ||x|| of a
// 1e38 fp32 row is below fp32's normal range) into inv_z / inv_y.
template <typename scalar_t, typename acc_t>
REPA_SIMD_CLONES void normalize_rows(SliceRows<scalar_t> z, SliceRows<scalar_t> y, int64_t n0, int64_t n1,
                                     acc_t y_sign, acc_t* out, int64_t ld, double* inv_z, double* inv_y) {
  for (int64_t n = n0; n < n1; ++n) {
    acc_t* zo = out + (n - n0) * ld;
    acc_t* yo = zo + z.width;
    convert_row(zo, z.row(n), z.width);
    convert_row(yo, y.row(n), y.width);
    inv_z[n - n0] = normalize_in_place(zo, z.width, acc_t(1));
    inv_y[n - n0] = normalize_in_place(yo, y.width, y_sign);
  }
}

// grad rows = coef (g - x̂ (x̂ · g)) inv for rows [0, rows): x̂ and g in acc_t (row strides ld_x, ld_g).
// x̂ may carry a sign flip: x̂ (x̂ · g) does not see it. coef inv is applied as mantissa (in acc_t)
// times power of two, so that a factor below acc_t's normal range (|x| ~ 1e38 in fp32) loses no bits
// before the product.
template <typename scalar_t, typename acc_t>
REPA_SIMD_CLONES void normalization_backward_rows(const acc_t* xhat, int64_t ld_x, const acc_t* g, int64_t ld_g,
                                                  const double* inv, int64_t rows, int64_t width, double coef,
                                                  scalar_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* x = xhat + r * ld_x;
    const acc_t* gr = g + r * ld_g;
    scalar_t* o = out + r * width;
    int exponent = 0;
    const acc_t scale = static_cast<acc_t>(std::frexp(coef * inv[r], &exponent));
    const acc_t unscale = power_of_two_scale<acc_t>(-exponent);
    const acc_t projection = dot(x, gr, width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) o[i] = static_cast<scalar_t>(scale * (gr[i] - x[i] * projection) * unscale);
  }
}

// Sum over the rows of ||row||² (split_col < 0) or of the signed sum s_i s_j M_ij² with s = +1 below
// split_col and -1 from it, one row after the other (a fixed order). Serial on purpose: a tile is small
// next to its GEMM, and a barrier per tile costs more than the sum when the cores are shared.
template <typename acc_t>
REPA_SIMD_CLONES double rows_sum_of_squares(const acc_t* data, int64_t rows, int64_t cols, int64_t ld,
                                            int64_t split_col) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* row = data + r * ld;
    if (split_col < 0) {
      total += static_cast<double>(squared_norm(row, cols));
    } else {
      const double left = squared_norm(row, split_col), right = squared_norm(row + split_col, cols - split_col);
      total += (r < split_col ? 1.0 : -1.0) * (left - right);
    }
  }
  return total;
}

template <typename acc_t>
static double sum_of_squares(const at::Tensor& matrix, int64_t split_col = -1) {
  return rows_sum_of_squares(matrix.const_data_ptr<acc_t>(), matrix.size(0), matrix.size(1), matrix.stride(0),
                             split_col);
}

// One slice in the tiled form; returns ||E||².
template <typename scalar_t>
static double tiled_slice(SliceRows<scalar_t> z, SliceRows<scalar_t> y, int64_t N, SliceGrad<scalar_t> dz,
                          SliceGrad<scalar_t> dy, double grad_coef) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Dz = z.width, Dy = y.width, K = Dz + Dy;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor a_signed = cached_empty({N, K}, options);  // [ẑ | -ŷ]
  std::vector<double> inv(2 * N);  // 1 / ||z_n||, then 1 / ||y_n||
  acc_t* a_data = a_signed.mutable_data_ptr<acc_t>();
  double* inv_data = inv.data();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    normalize_rows(z, y, n0, n1, acc_t(-1), a_data + n0 * K, K, inv_data + n0, inv_data + N + n0);
  });

  // Gradient columns: [0, Dz) for dz, [Dz, K) for dy.
  const int64_t c0 = dz.base != nullptr ? 0 : Dz, c1 = dy.base != nullptr ? K : Dz, nc = c1 - c0;
  at::Tensor grad_a = nc > 0 ? cached_empty({N, nc}, options).zero_() : at::Tensor();
  const int64_t tile = std::min(N, kTileRows);
  at::Tensor row_tile = at::empty({tile, K}, options);
  at::Tensor gram_storage = at::empty({tile * tile}, options);
  double total = 0.0;
  for (int64_t i0 = 0; i0 < N; i0 += tile) {
    const int64_t ni = std::min(tile, N - i0);
    at::Tensor a_i = a_signed.narrow(0, i0, ni);
    at::Tensor x_i = row_tile.narrow(0, 0, ni);
    x_i.copy_(a_i);
    x_i.narrow(1, Dz, Dy).neg_();  // [ẑ | ŷ] rows of tile I
    for (int64_t j0 = i0; j0 < N; j0 += tile) {
      const int64_t nj = std::min(tile, N - j0);
      at::Tensor a_j = a_signed.narrow(0, j0, nj);
      at::Tensor e = gram_storage.narrow(0, 0, ni * nj).view({ni, nj});
      at::mm_out(e, x_i, a_j.t());
      total += (j0 == i0 ? 1.0 : 2.0) * sum_of_squares<acc_t>(e);
      if (nc > 0) {
        grad_a.narrow(0, i0, ni).addmm_(e, a_j.narrow(1, c0, nc));
        if (j0 != i0) grad_a.narrow(0, j0, nj).addmm_(e.t(), a_i.narrow(1, c0, nc));
      }
    }
  }
  if (nc > 0) {
    const acc_t* g = grad_a.const_data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (dz.base != nullptr)
        normalization_backward_rows(a_data + n0 * K, K, g + n0 * nc, nc, inv_data + n0, n1 - n0, Dz, grad_coef,
                                    dz.base + n0 * Dz);
      if (dy.base != nullptr)
        normalization_backward_rows(a_data + n0 * K + Dz, K, g + n0 * nc + (Dz - c0), nc, inv_data + N + n0,
                                    n1 - n0, Dy, grad_coef, dy.base + n0 * Dy);
    });
  }
  return total;
}

// One slice in the fp64 identity form; returns ||E||².
template <typename scalar_t>
static double identity_slice(SliceRows<scalar_t> z, SliceRows<scalar_t> y, int64_t N, SliceGrad<scalar_t> dz,
                             SliceGrad<scalar_t> dy, double grad_coef) {
  const int64_t Dz = z.width, Dy = y.width, K = Dz + Dy;
  const int64_t chunk = std::min(N, std::max<int64_t>(64, kIdentityChunkElements / K));
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor a_chunk = cached_empty({chunk, K}, options);  // [ẑ | ŷ] rows of one chunk
  std::vector<double> inv(2 * chunk);
  double* a_data = a_chunk.mutable_data_ptr<double>();
  double* inv_data = inv.data();
  auto normalize_chunk = [&](int64_t r0, int64_t rows) {
    at::parallel_for(0, rows, 16, [&](int64_t n0, int64_t n1) {
      normalize_rows(z, y, r0 + n0, r0 + n1, 1.0, a_data + n0 * K, K, inv_data + n0, inv_data + chunk + n0);
    });
  };

  at::Tensor gram = at::zeros({K, K}, options);  // M = Aᵀ A, accumulated over row chunks in order
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    normalize_chunk(r0, rows);
    at::Tensor a = a_chunk.narrow(0, 0, rows);
    gram.addmm_(a.t(), a);
  }
  const double total = sum_of_squares<double>(gram, Dz);

  const int64_t c0 = dz.base != nullptr ? 0 : Dz, c1 = dy.base != nullptr ? K : Dz, nc = c1 - c0;
  if (nc == 0) return total;
  gram.narrow(0, 0, Dz).narrow(1, Dz, Dy).neg_();  // M -> S M S
  gram.narrow(0, Dz, Dy).narrow(1, 0, Dz).neg_();
  at::Tensor sms = gram.narrow(1, c0, nc);
  at::Tensor grad_chunk = cached_empty({chunk, nc}, options);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    normalize_chunk(r0, rows);
    at::Tensor g = grad_chunk.narrow(0, 0, rows);
    at::mm_out(g, a_chunk.narrow(0, 0, rows), sms);
    const double* g_data = g.const_data_ptr<double>();
    at::parallel_for(0, rows, 16, [&](int64_t n0, int64_t n1) {
      if (dz.base != nullptr)
        normalization_backward_rows(a_data + n0 * K, K, g_data + n0 * nc, nc, inv_data + n0, n1 - n0, Dz, grad_coef,
                                    dz.base + (r0 + n0) * Dz);
      if (dy.base != nullptr)
        normalization_backward_rows(a_data + n0 * K + Dz, K, g_data + n0 * nc + (Dz - c0), nc,
                                    inv_data + chunk + n0, n1 - n0, Dy, grad_coef, dy.base + (r0 + n0) * Dy);
    });
  }
  return total;
}

// Multiply-adds of one slice in the identity or the tiled form, weighted by the measured GEMM rates
// (fp64 at half the fp32 rate): the identity wins roughly when N > 2.7 K with gradients and N > 4 K
// without.
static double slice_work(int64_t N, int64_t K, bool gradients, bool identity) {
  const double n = static_cast<double>(N), k = static_cast<double>(K);
  return identity ? 2.0 * (gradients ? 2.0 : 1.0) * n * k * k : (gradients ? 1.5 : 0.5) * n * n * k;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> manifold_cpu(const at::Tensor& z_in, const at::Tensor& y_in,
                                                            bool need_dz, bool need_dy, int64_t path) {
  TORCH_CHECK(z_in.device().is_cpu() && y_in.device().is_cpu(),
              "repa_kernels::manifold: z and y must be CPU tensors, got ", z_in.device(), " and ", y_in.device());
  TORCH_CHECK(z_in.dim() == 4 && y_in.dim() == 4, "repa_kernels::manifold: z and y must be 4-D (B, T, N, D), got ",
              z_in.sizes(), " and ", y_in.sizes());
  TORCH_CHECK(z_in.sizes().slice(0, 3) == y_in.sizes().slice(0, 3),
              "repa_kernels::manifold: z and y must share (B, T, N), got ", z_in.sizes(), " and ", y_in.sizes());
  TORCH_CHECK(z_in.scalar_type() == y_in.scalar_type(), "repa_kernels::manifold: z and y must have the same dtype, got ",
              z_in.scalar_type(), " and ", y_in.scalar_type());
  check_supported_dtype("repa_kernels::manifold", z_in.scalar_type());
  check_not_empty("repa_kernels::manifold", z_in, y_in);
  TORCH_CHECK(path >= 0 && path <= 2, "repa_kernels::manifold: path must be 0 (auto), 1 (tiled) or 2 (identity), got ",
              path);
  const at::Tensor z = z_in.stride(3) == 1 ? z_in : z_in.contiguous();
  const at::Tensor y = y_in.stride(3) == 1 ? y_in : y_in.contiguous();
  const int64_t B = z.size(0), T = z.size(1), N = z.size(2), Dz = z.size(3), Dy = y.size(3), slices = B * T;
  const bool gradients = need_dz || need_dy;
  const bool identity =
      path == 2 || (path == 0 && slice_work(N, Dz + Dy, gradients, true) < slice_work(N, Dz + Dy, gradients, false));
  const double grad_coef = 4.0 / (static_cast<double>(slices) * static_cast<double>(N) * static_cast<double>(N));

  at::Tensor dz = need_dz ? cached_empty(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor dy = need_dy ? cached_empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  std::vector<double> slice_sums(slices, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "repa_kernels::manifold", [&] {
    const scalar_t* z_data = z.const_data_ptr<scalar_t>();
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    auto run_slice = [&](int64_t s) {
      const int64_t b = s / T, t = s % T;
      SliceRows<scalar_t> zr{z_data + b * z.stride(0) + t * z.stride(1), z.stride(2), Dz};
      SliceRows<scalar_t> yr{y_data + b * y.stride(0) + t * y.stride(1), y.stride(2), Dy};
      SliceGrad<scalar_t> gz{need_dz ? dz.mutable_data_ptr<scalar_t>() + s * N * Dz : nullptr, Dz};
      SliceGrad<scalar_t> gy{need_dy ? dy.mutable_data_ptr<scalar_t>() + s * N * Dy : nullptr, Dy};
      slice_sums[s] = identity ? identity_slice(zr, yr, N, gz, gy, grad_coef) : tiled_slice(zr, yr, N, gz, gy, grad_coef);
    };
    // Whole slices per thread (single-threaded BLAS inside, no barrier per GEMM) when there are
    // enough of them or they are small; otherwise one slice at a time with threaded BLAS.
    const double work = slice_work(N, Dz + Dy, gradients, identity);
    if (slices > 1 && (slices >= at::get_num_threads() || work < kSmallSliceWork)) {
      at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) run_slice(s);
      });
    } else {
      for (int64_t s = 0; s < slices; ++s) run_slice(s);
    }
  });

  double total = 0.0;  // serial, fixed order
  for (double v : slice_sums) total += v;
  const double loss = total / (static_cast<double>(slices) * static_cast<double>(N) * static_cast<double>(N));
  return {at::scalar_tensor(loss, z.options().dtype(compute_scalar_type(z.scalar_type()))), dz, dy};
}

}  // namespace repa

TORCH_LIBRARY_FRAGMENT(repa_kernels, m) {
  m.def("manifold(Tensor z, Tensor y, bool need_dz, bool need_dy, int path=0) -> (Tensor loss, Tensor dz, Tensor dy)");
}

TORCH_LIBRARY_IMPL(repa_kernels, CPU, m) { m.impl("manifold", &repa::manifold_cpu); }
