// Fused multi-tensor AdamW on the CPU: one parallel region over fixed chunks of every tensor
// of every group; per-tensor hyperparameters from one table. Bytes per element: fp32 28
// (read p, g, m, v; write p, m, v), bf16 params/grads 20.
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

}  // namespace

void fused_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper) {
  const StepArgs args{params, grads, exp_avgs, exp_avg_sqs, steps, hyper};
  check_step_args("lvopt::fused_adamw_", args);
  const std::vector<AdamCoef> coef = advance_steps(args);
  std::vector<int64_t> numels;
  numels.reserve(params.size());
  for (const auto& p : params) numels.push_back(p.numel());
  const std::vector<Chunk> chunks = plan_chunks(numels);
  for_each_chunk(chunks, [&](const Chunk& ch) {
    const at::Tensor& p = params[ch.tensor];
    float* m = exp_avgs[ch.tensor].data_ptr<float>() + ch.begin;
    float* v = exp_avg_sqs[ch.tensor].data_ptr<float>() + ch.begin;
    const int64_t n = ch.end - ch.begin;
    if (p.scalar_type() == at::kFloat) {
      adamw_span_f32(p.data_ptr<float>() + ch.begin, grads[ch.tensor].data_ptr<float>() + ch.begin,
                     m, v, n, coef[ch.tensor]);
    } else {
      adamw_span_bf16(reinterpret_cast<uint16_t*>(p.data_ptr()) + ch.begin,
                      reinterpret_cast<const uint16_t*>(grads[ch.tensor].data_ptr()) + ch.begin, m,
                      v, n, coef[ch.tensor]);
    }
  });
}

}  // namespace cpu
}  // namespace lvopt
