// Fused multi-tensor AdamH on the CPU (docs/design.md section 2.2), two passes:
//   pass 1: m, v update; u = (m/bc1)/(sqrt(v)/sqrt(bc2)+eps); sums ||u||^2, <W,u>, ||W||^2
//           (read W, g, m, v; write m, v: 24 B/param in fp32);
//   pass 2: W <- a*W - b*u with u recomputed from m, v (read W, m, v; write W: 16 B/param).
// fused_adamh_ runs both; fused_adamh_reduce_ (pass 1) and fused_adamh_apply_ (pass 2) are the
// same passes as two ops, for sharded tensors whose sums are all-reduced in between.
// Reductions are deterministic: each fixed chunk sums into 16 fp64 lanes (element i of the
// chunk into lane i mod 16) whatever the ISA, lanes are added in order, and chunk partials
// are added in chunk order, so the bits do not depend on the ISA or the thread count.
#include "ops.h"

#include "multi_tensor.h"

namespace lvopt {
namespace cpu {
namespace {

constexpr int kLanes = 16;

template <typename T, bool kFma>
LVOPT_ALWAYS_INLINE void adamh_reduce_span(const T* __restrict p, const T* __restrict g,
                                           float* __restrict m, float* __restrict v, int64_t n,
                                           const AdamCoef& c, double* __restrict out) {
  double uu[kLanes] = {}, wu[kLanes] = {}, ww[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float mi = m[i + l], vi = v[i + l];
      adam_moments(c.grad_sign * load_elem(g, i + l), mi, vi, c);
      m[i + l] = mi;
      v[i + l] = vi;
      const double u = adam_update(mi, vi, c);
      const double w = load_elem(p, i + l);
      uu[l] = add_exact_product<kFma>(uu[l], u, u);
      wu[l] = add_exact_product<kFma>(wu[l], w, u);
      ww[l] = add_exact_product<kFma>(ww[l], w, w);
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    float mi = m[i], vi = v[i];
    adam_moments(c.grad_sign * load_elem(g, i), mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    const double u = adam_update(mi, vi, c);
    const double w = load_elem(p, i);
    uu[l] = add_exact_product<kFma>(uu[l], u, u);
    wu[l] = add_exact_product<kFma>(wu[l], w, u);
    ww[l] = add_exact_product<kFma>(ww[l], w, w);
  }
  double s_uu = 0.0, s_wu = 0.0, s_ww = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    s_uu += uu[l];
    s_wu += wu[l];
    s_ww += ww[l];
  }
  out[0] = s_uu;
  out[1] = s_wu;
  out[2] = s_ww;
}

template <typename T>
LVOPT_ALWAYS_INLINE void adamh_apply_span(T* __restrict p, const float* __restrict m,
                                          const float* __restrict v, int64_t n, const AdamCoef& c,
                                          float a, float b) {
  for (int64_t i = 0; i < n; ++i) {
    const float u = adam_update(m[i], v[i], c);
    store_elem(p, i, a * load_elem(p, i) - b * u);
  }
}

LVOPT_ISA_DISPATCH_FMA(adamh_reduce_f32,
                       (const float* p, const float* g, float* m, float* v, int64_t n,
                        const AdamCoef& c, double* out),
                       (p, g, m, v, n, c, out), (adamh_reduce_span<float, false>),
                       (adamh_reduce_span<float, true>))
LVOPT_ISA_DISPATCH_FMA(adamh_reduce_bf16,
                       (const uint16_t* p, const uint16_t* g, float* m, float* v, int64_t n,
                        const AdamCoef& c, double* out),
                       (p, g, m, v, n, c, out), (adamh_reduce_span<uint16_t, false>),
                       (adamh_reduce_span<uint16_t, true>))
LVOPT_ISA_DISPATCH(adamh_apply_f32,
                   (float* p, const float* m, const float* v, int64_t n, const AdamCoef& c,
                    float a, float b),
                   (p, m, v, n, c, a, b), adamh_apply_span<float>)
LVOPT_ISA_DISPATCH(adamh_apply_bf16,
                   (uint16_t* p, const float* m, const float* v, int64_t n, const AdamCoef& c,
                    float a, float b),
                   (p, m, v, n, c, a, b), adamh_apply_span<uint16_t>)

// Pass 1 over every tensor (coef: this step's coefficients, lr = 1): updates m and v and
// returns the fp64 sums [n, 3] (||u||^2, <W,u>, ||W||^2 per tensor, W before the step).
at::Tensor reduce_pass(const StepArgs& a, const std::vector<AdamCoef>& coef,
                       const std::vector<Chunk>& chunks) {
  std::vector<double> partial(chunks.size() * 3);
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t k) {
    const at::Tensor& p = a.params[ch.tensor];
    float* m = a.exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
    float* v = a.exp_avg_sqs[ch.tensor].data_ptr<float>() + ch.begin;
    const int64_t len = ch.end - ch.begin;
    if (p.scalar_type() == at::kFloat) {
      adamh_reduce_f32(p.data_ptr<float>() + ch.begin, a.grads[ch.tensor].data_ptr<float>() + ch.begin,
                       m, v, len, coef[ch.tensor], &partial[3 * k]);
    } else {
      adamh_reduce_bf16(reinterpret_cast<const uint16_t*>(p.data_ptr()) + ch.begin,
                        reinterpret_cast<const uint16_t*>(a.grads[ch.tensor].data_ptr()) + ch.begin,
                        m, v, len, coef[ch.tensor], &partial[3 * k]);
    }
  });
  at::Tensor stats =
      at::zeros({static_cast<int64_t>(a.params.size()), 3}, a.hyper.options().device(at::kCPU));
  add_chunk_partials(chunks, partial, 3, stats.data_ptr<double>());
  return stats;
}

// Pass 2: W <- a*W - b*u with the scales of the sums st ([n, 3], row-major) and the radii.
void apply_pass(const StepArgs& a, at::TensorList radii, const std::vector<AdamCoef>& coef,
                const std::vector<Chunk>& chunks, const double* st) {
  const size_t n = a.params.size();
  const double* hp = a.hyper.data_ptr<double>();
  std::vector<float> scale_a(n), scale_b(n);
  for (size_t i = 0; i < n; ++i) {
    const HyperballScales s = hyperball_scales(hp[i * kHyperCols + kLr],
                                               radii[i].data_ptr<double>()[0], st[3 * i],
                                               st[3 * i + 1], st[3 * i + 2]);
    scale_a[i] = static_cast<float>(s.a);
    scale_b[i] = static_cast<float>(s.b);
  }
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t) {
    const at::Tensor& p = a.params[ch.tensor];
    const float* m = a.exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
    const float* v = a.exp_avg_sqs[ch.tensor].data_ptr<float>() + ch.begin;
    const int64_t len = ch.end - ch.begin;
    const float sa = scale_a[ch.tensor], sb = scale_b[ch.tensor];
    if (p.scalar_type() == at::kFloat) {
      adamh_apply_f32(p.data_ptr<float>() + ch.begin, m, v, len, coef[ch.tensor], sa, sb);
    } else {
      adamh_apply_bf16(reinterpret_cast<uint16_t*>(p.data_ptr()) + ch.begin, m, v, len,
                       coef[ch.tensor], sa, sb);
    }
  });
}

// The coefficients of pass 1 and pass 2 (u with lr = 1; lr enters through the norms), from
// the step numbers the counters hold after this step's increment.
std::vector<AdamCoef> unit_coefs(const StepArgs& a, std::vector<AdamCoef> coef,
                                 const std::vector<double>& step_numbers) {
  const double* hp = a.hyper.data_ptr<double>();
  for (size_t i = 0; i < coef.size(); ++i) {
    coef[i] = unit_lr(coef[i], hp + i * kHyperCols, step_numbers[i]);
  }
  return coef;
}

std::vector<Chunk> chunks_of(at::TensorList params) {
  std::vector<int64_t> numels;
  numels.reserve(params.size());
  for (const auto& p : params) numels.push_back(p.numel());
  return plan_chunks(numels);
}

}  // namespace

at::Tensor fused_adamh_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList radii,
                        const at::Tensor& hyper, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  const size_t n = params.size();
  check_hyperball_args(op, args, radii);
  float* found = check_found_inf(op, found_inf);
  if (found != nullptr && (*found != 0.0f || any_nonfinite(grads))) {
    // A non-finite gradient (here or in an earlier op): write nothing. Pass one writes the
    // moments, so the scan comes first (+4 B/element; the same bytes as a pass one that
    // defers its moment writes to pass two).
    *found = 1.0f;
    return hyper.new_zeros({static_cast<int64_t>(n), 3});
  }
  std::vector<double> step_numbers;
  std::vector<AdamCoef> coef = advance_steps(args, &step_numbers);
  coef = unit_coefs(args, std::move(coef), step_numbers);
  const std::vector<Chunk> chunks = chunks_of(params);
  at::Tensor stats = reduce_pass(args, coef, chunks);
  apply_pass(args, radii, coef, chunks, stats.data_ptr<double>());
  return stats;
}

at::Tensor fused_adamh_reduce_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& hyper, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_reduce_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  check_no_weight_decay(op, args);
  float* found = check_found_inf(op, found_inf);
  if (found != nullptr && (*found != 0.0f || any_nonfinite(grads))) {
    *found = 1.0f;
    return hyper.new_zeros({static_cast<int64_t>(params.size()), 3});
  }
  std::vector<double> step_numbers;
  std::vector<AdamCoef> coef = advance_steps(args, &step_numbers);
  coef = unit_coefs(args, std::move(coef), step_numbers);
  return reduce_pass(args, coef, chunks_of(params));
}

void fused_adamh_apply_(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList steps, at::TensorList radii, const at::Tensor& hyper,
                        const at::Tensor& sums, const std::optional<at::Tensor>& found_inf) {
  const char* op = "lvopt::fused_adamh_apply_";
  // Pass 2 reads no gradient: the parameters stand in for them in the shared checks.
  const StepArgs args{params, params, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  check_hyperball_args(op, args, radii);
  check_hyperball_sums(op, args, sums, c10::DeviceType::CPU);
  const float* found = check_found_inf(op, found_inf);
  if (found != nullptr && *found != 0.0f) return;  // pass 1 was skipped: write nothing
  std::vector<double> step_numbers;
  std::vector<AdamCoef> coef = current_coefs(args, &step_numbers);
  coef = unit_coefs(args, std::move(coef), step_numbers);
  apply_pass(args, radii, coef, chunks_of(params), sums.data_ptr<double>());
}

}  // namespace cpu
}  // namespace lvopt
