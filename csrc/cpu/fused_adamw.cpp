// Fused multi-tensor AdamW on the CPU: one parallel region over fixed chunks of every tensor
// of every group; per-tensor hyperparameters from one table. Bytes per element: fp32 28
// (read p, g, m, v; write p, m, v), bf16 params/grads 20; AMSGrad (max_exp_avg_sqs) +8.
// With found_inf (nonfinite="skip"/"raise"), the gradients are first scanned in the same
// parallel machinery (+4 B/element fp32, +2 bf16), and nothing is written if one is not
// finite. With stats (track=True), the same pass also sums W^2 and (dW)^2 per tensor.
#include "ops.h"

#include "multi_tensor.h"

namespace lvopt {
namespace cpu {
namespace {

LVOPT_ISA_DISPATCH(adamw_span_f32,
                   (float* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c),
                   (p, g, m, v, n, c), (adamw_span<float, float>))
LVOPT_ISA_DISPATCH(adamw_span_bf16,
                   (uint16_t* p, const uint16_t* g, float* m, float* v, int64_t n,
                    const AdamCoef& c),
                   (p, g, m, v, n, c), (adamw_span<uint16_t, uint16_t>))
LVOPT_ISA_DISPATCH(adamw_tracked_f32,
                   (float* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c,
                    double* out),
                   (p, g, m, v, n, c, out), (adamw_span_tracked<float, float>))
LVOPT_ISA_DISPATCH(adamw_tracked_bf16,
                   (uint16_t* p, const uint16_t* g, float* m, float* v, int64_t n,
                    const AdamCoef& c, double* out),
                   (p, g, m, v, n, c, out), (adamw_span_tracked<uint16_t, uint16_t>))

LVOPT_ISA_DISPATCH(adamw_ams_f32,
                   (float* p, const float* g, float* m, float* v, float* x, int64_t n,
                    const AdamCoef& c),
                   (p, g, m, v, x, n, c), (adamw_span_ams<float>))
LVOPT_ISA_DISPATCH(adamw_ams_bf16,
                   (uint16_t* p, const uint16_t* g, float* m, float* v, float* x, int64_t n,
                    const AdamCoef& c),
                   (p, g, m, v, x, n, c), (adamw_span_ams<uint16_t>))
LVOPT_ISA_DISPATCH(adamw_ams_tracked_f32,
                   (float* p, const float* g, float* m, float* v, int64_t n, const AdamCoef& c,
                    double* out, float* x),
                   (p, g, m, v, n, c, out, x), (adamw_span_tracked<float, float, true>))
LVOPT_ISA_DISPATCH(adamw_ams_tracked_bf16,
                   (uint16_t* p, const uint16_t* g, float* m, float* v, int64_t n,
                    const AdamCoef& c, double* out, float* x),
                   (p, g, m, v, n, c, out, x), (adamw_span_tracked<uint16_t, uint16_t, true>))

}  // namespace

void fused_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& stats,
                  std::optional<at::TensorList> max_exp_avg_sqs) {
  const char* op = "lvopt::fused_adamw_";
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args(op, args);
  const bool ams = check_amsgrad_args(op, args, max_exp_avg_sqs);
  float* found = check_found_inf(op, found_inf);
  double* st = check_stats(op, stats, params.size(), 2);
  if (found != nullptr && (*found != 0.0f || any_nonfinite(grads))) {
    *found = 1.0f;  // a non-finite gradient (here or in an earlier op): write nothing
    return;
  }
  const std::vector<AdamCoef> coef = advance_steps(args);
  std::vector<int64_t> numels;
  numels.reserve(params.size());
  for (const auto& p : params) numels.push_back(p.numel());
  const std::vector<Chunk> chunks = plan_chunks(numels);
  std::vector<double> partial(st != nullptr ? 2 * chunks.size() : 0);
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t k) {
    const at::Tensor& p = params[ch.tensor];
    float* m = exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
    float* v = exp_avg_sqs[ch.tensor].data_ptr<float>() + ch.begin;
    const int64_t n = ch.end - ch.begin;
    const AdamCoef& c = coef[ch.tensor];
    if (ams) {
      float* x = (*max_exp_avg_sqs)[ch.tensor].data_ptr<float>() + ch.begin;
      double* out = st != nullptr ? &partial[2 * k] : nullptr;
      if (p.scalar_type() == at::kFloat) {
        float* pp = p.data_ptr<float>() + ch.begin;
        const float* g = grads[ch.tensor].data_ptr<float>() + ch.begin;
        if (out != nullptr) {
          adamw_ams_tracked_f32(pp, g, m, v, n, c, out, x);
        } else {
          adamw_ams_f32(pp, g, m, v, x, n, c);
        }
      } else {
        uint16_t* pp = reinterpret_cast<uint16_t*>(p.data_ptr()) + ch.begin;
        const uint16_t* g =
            reinterpret_cast<const uint16_t*>(grads[ch.tensor].data_ptr()) + ch.begin;
        if (out != nullptr) {
          adamw_ams_tracked_bf16(pp, g, m, v, n, c, out, x);
        } else {
          adamw_ams_bf16(pp, g, m, v, x, n, c);
        }
      }
      return;
    }
    if (p.scalar_type() == at::kFloat) {
      float* pp = p.data_ptr<float>() + ch.begin;
      const float* g = grads[ch.tensor].data_ptr<float>() + ch.begin;
      if (st != nullptr) {
        adamw_tracked_f32(pp, g, m, v, n, c, &partial[2 * k]);
      } else {
        adamw_span_f32(pp, g, m, v, n, c);
      }
    } else {
      uint16_t* pp = reinterpret_cast<uint16_t*>(p.data_ptr()) + ch.begin;
      const uint16_t* g = reinterpret_cast<const uint16_t*>(grads[ch.tensor].data_ptr()) + ch.begin;
      if (st != nullptr) {
        adamw_tracked_bf16(pp, g, m, v, n, c, &partial[2 * k]);
      } else {
        adamw_span_bf16(pp, g, m, v, n, c);
      }
    }
  });
  if (st != nullptr) add_chunk_partials(chunks, partial, 2, st);
}

}  // namespace cpu
}  // namespace lvopt
