// CREPA / REPA cosine term (docs/contract.md §2.1) on CPU: loss, metrics and, when asked, the gradients.
//
// repa_kernels::crepa(z, y, frame_weights, loss_scale, need_dz, need_dy)
//   z, y: (B, T, N, D), same shape and dtype (float16, bfloat16, float32, float64), unit stride over D.
//   frame_weights: the T x T matrix W[f, g] = c(f) w(f, g) of CrepaOptions.frame_weights, row-major.
//   loss_scale: -1 / B' (B' = CrepaOptions.loss_divisor), so loss = loss_scale * sum_{b,f} total[b, f].
// Returns (loss, alignment_score, similarity_self, dz, dy): three 0-d tensors in the compute dtype
// (fp32, fp64 for fp64 inputs) and d loss / d z, d loss / d y in the input dtype, contiguous; a
// gradient that was not asked for is an empty (0,) tensor. The loss is a scalar, so its gradient is
// formed here in the same pass and the autograd backward only scales it by the upstream gradient.
//
// One pass: each task takes a block of token positions of one sample, all frames together (the
// neighbour terms couple frames, so splitting frames over tasks would read the neighbours' rows again)
// and, per token, reads the token's row in every frame of z and y once from memory (later uses of the
// rows hit the cache):
// squared norms and the self dot product together, the neighbour dot products, then
//   dz_f = s (sum_g W[f,g] iz_f iy_g y_g - (sum_g W[f,g] cos_fg) iz_f^2 z_f),     s = loss_scale / N,
//   dy_g = s (sum_f W[f,g] iz_f iy_g z_f - (sum_f W[f,g] cos_fg) iy_g^2 y_g),
// with iz = 1/||z|| (0 when ||z|| < 1e-12). No normalised copies, no per-offset temporaries; fp16 /
// bf16 rows are widened into a small per-thread fp32 buffer. A row whose squared norm comes out of
// that pass outside [2^-64, 2^64] in fp32 (e.g. |x| ~ 1e30, whose squares overflow) is used as the
// exact power-of-two rescaled copy x' = x 2^-e in that buffer (common.h, needs_rescaling): its norm
// and dot products cannot overflow, cosines do not change, and its gradient row is d/dx = 2^-e d/dx'.
// Rows of ordinary size are computed exactly as without rescaling. Each task writes its per-frame partial
// sums into its own slot and the slots are added serially afterwards, so the result has the same
// bits for any thread count.
#include "module.h"  // first (it includes Python.h, then common.h): PyInit__C and build_info, once

#include <ATen/Dispatch.h>
#include <ATen/ops/scalar_tensor.h>

#include <type_traits>
#include <vector>

namespace repa {

// The (student frame, teacher frame, weight) pairs with W[f, g] != 0, self pairs included, in
// order of the student frame; `by_student[f]` lists the pairs of student frame f, `by_teacher[g]`
// the pairs that pull teacher frame g.
struct FramePairs {
  std::vector<int64_t> student, teacher;
  std::vector<double> weight;
  std::vector<std::vector<int64_t>> by_student, by_teacher;
};

static FramePairs frame_pairs(c10::ArrayRef<double> weights, int64_t frames) {
  FramePairs pairs;
  pairs.by_student.resize(frames);
  pairs.by_teacher.resize(frames);
  for (int64_t f = 0; f < frames; ++f) {
    for (int64_t g = 0; g < frames; ++g) {
      const double w = weights[f * frames + g];
      if (w == 0.0 && g != f) continue;
      const int64_t q = static_cast<int64_t>(pairs.student.size());
      pairs.by_student[f].push_back(q);
      pairs.by_teacher[g].push_back(q);
      pairs.student.push_back(f);
      pairs.teacher.push_back(g);
      pairs.weight.push_back(w);
    }
  }
  return pairs;
}

template <typename scalar_t>
struct CrepaProblem {
  const scalar_t* z;
  const scalar_t* y;
  int64_t z_strides[3], y_strides[3];  // batch, frame, token (elements)
  scalar_t* dz;                        // contiguous (B, T, N, D) or nullptr
  scalar_t* dy;
  int64_t frames, tokens, width;
  const FramePairs* pairs;
  double grad_scale;  // loss_scale / N
};

// Per-thread scratch, allocated once per parallel chunk.
template <typename acc_t>
struct CrepaScratch {
  std::vector<acc_t> z_rows, y_rows;  // fp32 copies of fp16 / bf16 rows, and rescaled copies of any row
  std::vector<acc_t> out_row;         // fp16 / bf16 only: the gradient row before narrowing
  std::vector<const acc_t*> z_row, y_row;  // the rows the token uses: input rows or copies
  std::vector<int> z_exponent, y_exponent;  // row used = input row * 2^-exponent (0: as it is)
  std::vector<double> inv_z, inv_y, self_dot, pull_z, pull_y;  // inv_*: 1 / ||row used||

  CrepaScratch(int64_t frames, int64_t width, bool widen)
      : z_rows(frames * width), y_rows(frames * width), out_row(widen ? width : 0), z_row(frames), y_row(frames),
        z_exponent(frames), y_exponent(frames), inv_z(frames), inv_y(frames), self_dot(frames), pull_z(frames),
        pull_y(frames) {}
};

// One gradient row, for z_f (dz) or y_g (dy) alike: with x the row used, i = 1 / ||x||, the partners
// p_q of the pairs q of x (the teacher rows of z_f's pairs, the student rows of y_g's), i_q = 1 / ||p_q||,
//   d loss / d x = s (sum_q W_q i i_q p_q - pull i^2 x),     pull = sum_q W_q cos_q,
// then times 2^-e for a rescaled row (x = input 2^-e), narrowed into dst for fp16 / bf16.
template <typename scalar_t, typename acc_t>
REPA_ALWAYS_INLINE void write_gradient_row(scalar_t* dst, acc_t* widened, const acc_t* row, double inv, double pull,
                                           int exponent, const std::vector<int64_t>& pair_list,
                                           const std::vector<int64_t>& partner_of_pair,
                                           const std::vector<const acc_t*>& partner_rows,
                                           const std::vector<double>& partner_inv, const std::vector<double>& weight,
                                           double grad_scale, int64_t D) {
  constexpr bool widen = !std::is_same_v<scalar_t, acc_t>;
  acc_t* out = widen ? widened : reinterpret_cast<acc_t*>(dst);
  scale_into(out, row, static_cast<acc_t>(-grad_scale * pull * inv * inv), D);
  for (int64_t q : pair_list) {
    const int64_t partner = partner_of_pair[q];
    add_scaled(out, partner_rows[partner], static_cast<acc_t>(grad_scale * weight[q] * inv * partner_inv[partner]), D);
  }
  if (exponent != 0) scale_into(out, out, power_of_two_scale<acc_t>(exponent), D);
  if constexpr (widen) convert_row(dst, out, D);
}

// Tokens [n0, n1) of sample b: adds sum_n sum_g W[f,g] cos_fg to total[f] and sum_n cos_ff to
// self_sum[f], and writes the gradient rows when asked.
template <typename scalar_t>
REPA_SIMD_CLONES void crepa_token_block(const CrepaProblem<scalar_t>& p, int64_t b, int64_t n0, int64_t n1,
                                        CrepaScratch<acc_type<scalar_t>>& s, double* total, double* self_sum) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool widen = !std::is_same_v<scalar_t, acc_t>;
  const FramePairs& pairs = *p.pairs;
  const int64_t T = p.frames, D = p.width, P = static_cast<int64_t>(pairs.weight.size());
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t n = n0; n < n1; ++n) {
    // The token's rows sit in 2T separate streams that the hardware prefetcher does not
    // follow well: fetch the next token's rows while this one is computed.
    if (n + 1 < p.tokens) {
      for (int64_t f = 0; f < T; ++f) {
        prefetch_row(p.z + b * p.z_strides[0] + f * p.z_strides[1] + (n + 1) * p.z_strides[2], row_bytes);
        prefetch_row(p.y + b * p.y_strides[0] + f * p.y_strides[1] + (n + 1) * p.y_strides[2], row_bytes);
      }
    }
    for (int64_t f = 0; f < T; ++f) {
      const scalar_t* z_src = p.z + b * p.z_strides[0] + f * p.z_strides[1] + n * p.z_strides[2];
      const scalar_t* y_src = p.y + b * p.y_strides[0] + f * p.y_strides[1] + n * p.y_strides[2];
      acc_t* z_copy = s.z_rows.data() + f * D;
      acc_t* y_copy = s.y_rows.data() + f * D;
      const acc_t* z_row = z_copy;
      const acc_t* y_row = y_copy;
      if constexpr (widen) {
        convert_row(z_copy, z_src, D);
        convert_row(y_copy, y_src, D);
      } else {
        z_row = z_src;
        y_row = y_src;
      }
      // A huge or tiny row (rare) is used as its exact rescaled copy, and the sums are taken again
      // (the first ones may have overflowed) by the same code: one call site, so the same summation
      // order, which makes 2^k x give exactly the results of x.
      acc_t zz, yy, zy;
      int ez = 0, ey = 0;
      for (bool first = true;; first = false) {
        squared_norms_and_dot(z_row, y_row, D, zz, yy, zy);
        if (!first) break;
        if (needs_rescaling(zz) && (ez = rescale_row(z_copy, z_row, D)) != 0) z_row = z_copy;
        if (needs_rescaling(yy) && (ey = rescale_row(y_copy, y_row, D)) != 0) y_row = y_copy;
        if (ez == 0 && ey == 0) break;
      }
      s.z_row[f] = z_row;
      s.y_row[f] = y_row;
      s.z_exponent[f] = ez;
      s.y_exponent[f] = ey;
      s.inv_z[f] = safe_inverse_norm(zz, ez);
      s.inv_y[f] = safe_inverse_norm(yy, ey);
      s.self_dot[f] = zy;
      s.pull_z[f] = 0.0;
      s.pull_y[f] = 0.0;
    }
    for (int64_t q = 0; q < P; ++q) {
      const int64_t f = pairs.student[q], g = pairs.teacher[q];
      const double d = f == g ? s.self_dot[f] : static_cast<double>(dot(s.z_row[f], s.y_row[g], D));
      const double c = d * s.inv_z[f] * s.inv_y[g];
      s.pull_z[f] += pairs.weight[q] * c;
      s.pull_y[g] += pairs.weight[q] * c;
      if (f == g) self_sum[f] += c;
    }
    for (int64_t f = 0; f < T; ++f) total[f] += s.pull_z[f];

    for (int64_t f = 0; p.dz != nullptr && f < T; ++f) {
      write_gradient_row(p.dz + ((b * T + f) * p.tokens + n) * D, s.out_row.data(), s.z_row[f], s.inv_z[f],
                         s.pull_z[f], s.z_exponent[f], pairs.by_student[f], pairs.teacher, s.y_row, s.inv_y,
                         pairs.weight, p.grad_scale, D);
    }
    for (int64_t g = 0; p.dy != nullptr && g < T; ++g) {
      write_gradient_row(p.dy + ((b * T + g) * p.tokens + n) * D, s.out_row.data(), s.y_row[g], s.inv_y[g],
                         s.pull_y[g], s.y_exponent[g], pairs.by_teacher[g], pairs.student, s.z_row, s.inv_z,
                         pairs.weight, p.grad_scale, D);
    }
  }
}

// Token positions per task: enough work per task to hide scheduling, enough tasks to balance threads.
constexpr int64_t kTokensPerTask = 16;

static void check_inputs(const at::Tensor& z, const at::Tensor& y, c10::ArrayRef<double> frame_weights) {
  TORCH_CHECK(z.device().is_cpu() && y.device().is_cpu(), "repa_kernels::crepa: z and y must be CPU tensors, got ",
              z.device(), " and ", y.device());
  TORCH_CHECK(z.dim() == 4, "repa_kernels::crepa: z must be 4-D (B, T, N, D), got shape ", z.sizes());
  TORCH_CHECK(z.sizes() == y.sizes(), "repa_kernels::crepa: z and y must have the same shape, got ", z.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(z.scalar_type() == y.scalar_type(), "repa_kernels::crepa: z and y must have the same dtype, got ",
              z.scalar_type(), " and ", y.scalar_type());
  check_supported_dtype("repa_kernels::crepa", z.scalar_type());
  check_not_empty("repa_kernels::crepa", z, y);
  const int64_t T = z.size(1);
  TORCH_CHECK(static_cast<int64_t>(frame_weights.size()) == T * T, "repa_kernels::crepa: frame_weights must hold ",
              T * T, " values (a T x T matrix for T = ", T, "), got ", frame_weights.size());
  for (size_t i = 0; i < frame_weights.size(); ++i) {
    TORCH_CHECK(std::isfinite(frame_weights[i]), "repa_kernels::crepa: frame_weights must be finite, got ",
                frame_weights[i], " at index ", i);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> crepa_cpu(
    const at::Tensor& z_in, const at::Tensor& y_in, c10::ArrayRef<double> frame_weights, double loss_scale,
    bool need_dz, bool need_dy) {
  check_inputs(z_in, y_in, frame_weights);
  const at::Tensor z = z_in.stride(3) == 1 ? z_in : z_in.contiguous();
  const at::Tensor y = y_in.stride(3) == 1 ? y_in : y_in.contiguous();
  const int64_t B = z.size(0), T = z.size(1), N = z.size(2), D = z.size(3);
  const FramePairs pairs = frame_pairs(frame_weights, T);
  const int64_t blocks = (N + kTokensPerTask - 1) / kTokensPerTask, tasks = B * blocks;

  at::Tensor dz = need_dz ? cached_empty(z.sizes(), z.options()) : at::empty({0}, z.options());
  at::Tensor dy = need_dy ? cached_empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  std::vector<double> partial(static_cast<size_t>(tasks) * 2 * T, 0.0);  // per task: total[T], self[T]

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "repa_kernels::crepa", [&] {
    using acc_t = acc_type<scalar_t>;
    CrepaProblem<scalar_t> problem{z.const_data_ptr<scalar_t>(),
                                   y.const_data_ptr<scalar_t>(),
                                   {z.stride(0), z.stride(1), z.stride(2)},
                                   {y.stride(0), y.stride(1), y.stride(2)},
                                   need_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr,
                                   need_dy ? dy.mutable_data_ptr<scalar_t>() : nullptr,
                                   T, N, D, &pairs, loss_scale / static_cast<double>(N)};
    at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
      CrepaScratch<acc_t> scratch(T, D, !std::is_same_v<scalar_t, acc_t>);
      for (int64_t task = first; task < last; ++task) {
        const int64_t b = task / blocks, n0 = (task % blocks) * kTokensPerTask;
        double* slot = partial.data() + task * 2 * T;
        crepa_token_block(problem, b, n0, std::min(N, n0 + kTokensPerTask), scratch, slot, slot + T);
      }
    });
  });

  double total = 0.0, self_sum = 0.0;  // serial, fixed order
  for (int64_t task = 0; task < tasks; ++task) {
    for (int64_t f = 0; f < T; ++f) {
      total += partial[task * 2 * T + f];
      self_sum += partial[task * 2 * T + T + f];
    }
  }
  total /= static_cast<double>(N);
  self_sum /= static_cast<double>(N);
  const auto scalar_options = z.options().dtype(compute_scalar_type(z.scalar_type()));
  const double frames_seen = static_cast<double>(B * T);
  return {at::scalar_tensor(loss_scale * total, scalar_options), at::scalar_tensor(total / frames_seen, scalar_options),
          at::scalar_tensor(self_sum / frames_seen, scalar_options), dz, dy};
}

}  // namespace repa

TORCH_LIBRARY_FRAGMENT(repa_kernels, m) {
  m.def(
      "crepa(Tensor z, Tensor y, float[] frame_weights, float loss_scale, bool need_dz, bool need_dy) -> "
      "(Tensor loss, Tensor alignment_score, Tensor similarity_self, Tensor dz, Tensor dy)");
}

TORCH_LIBRARY_IMPL(repa_kernels, CPU, m) { m.impl("crepa", &repa::crepa_cpu); }
