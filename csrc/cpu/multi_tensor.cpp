#include "multi_tensor.h"

#include <cmath>

namespace lvopt {
namespace cpu {

std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : numels) total += (n + kChunk - 1) / kChunk;
  chunks.reserve(static_cast<size_t>(total));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back(Chunk{static_cast<int32_t>(t), b, std::min(numels[t], b + kChunk)});
    }
  }
  return chunks;
}

static void check_same_layout(const char* op, const char* name, size_t i, const at::Tensor& t,
                              const at::Tensor& p, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", p.device());
  TORCH_CHECK(!t.is_sparse(), op, ": ", name, "[", i,
              "] is a sparse tensor; this op takes dense tensors");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(t.strides() == p.strides(), op, ": ", name, "[", i, "] has strides ", t.strides(),
              " but params[", i, "] has strides ", p.strides(),
              " (lvopt.optim lays gradients and states out like their parameter)");
}

void check_step_args(const char* op, const StepArgs& a) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.grads.size() == n && a.exp_avgs.size() == n && a.exp_avg_sqs.size() == n &&
                  a.steps.size() == n,
              op, ": tensor lists differ in length (params ", n, ", grads ", a.grads.size(),
              ", exp_avgs ", a.exp_avgs.size(), ", exp_avg_sqs ", a.exp_avg_sqs.size(),
              ", steps ", a.steps.size(), ")");
  const at::Tensor& h = a.hyper;
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kDouble && h.dim() == 2 &&
                  h.size(0) == static_cast<int64_t>(n) && h.size(1) == kHyperCols &&
                  h.is_contiguous(),
              op, ": hyper must be a contiguous CPU float64 tensor of shape [", n, ", ",
              static_cast<int>(kHyperCols), "], got ", h.scalar_type(), " ", h.sizes());
  const double* hp = h.data_ptr<double>();
  for (size_t i = 0; i < n; ++i) {
    const double* row = hp + i * kHyperCols;
    TORCH_CHECK(std::isfinite(row[kLr]) && row[kLr] >= 0.0, op, ": lr of tensor ", i,
                " must be finite and >= 0, got ", row[kLr]);
    TORCH_CHECK(row[kBeta1] >= 0.0 && row[kBeta1] < 1.0, op, ": beta1 of tensor ", i,
                " must be in [0, 1), got ", row[kBeta1]);
    TORCH_CHECK(row[kBeta2] >= 0.0 && row[kBeta2] < 1.0, op, ": beta2 of tensor ", i,
                " must be in [0, 1), got ", row[kBeta2]);
    TORCH_CHECK(std::isfinite(row[kEps]) && row[kEps] > 0.0, op, ": eps of tensor ", i,
                " must be finite and > 0, got ", row[kEps]);
    TORCH_CHECK(std::isfinite(row[kWeightDecay]), op, ": weight_decay of tensor ", i,
                " must be finite, got ", row[kWeightDecay]);

    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(),
                "; this is the CPU kernel");
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16, op,
                ": params[", i, "] has dtype ", p.scalar_type(),
                "; supported: float32, bfloat16");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be dense and non-overlapping (strides ", p.strides(), ")");
    check_same_layout(op, "grads", i, a.grads[i], p, p.scalar_type());
    check_same_layout(op, "exp_avgs", i, a.exp_avgs[i], p, at::kFloat);
    check_same_layout(op, "exp_avg_sqs", i, a.exp_avg_sqs[i], p, at::kFloat);
    const at::Tensor& s = a.steps[i];
    TORCH_CHECK(s.defined() && s.device().is_cpu() && s.numel() == 1 &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                op, ": steps[", i, "] must be a one-element float32/float64 CPU tensor");
  }
}

std::vector<AdamCoef> advance_steps(const StepArgs& a, std::vector<double>* steps_out) {
  std::vector<AdamCoef> coef(a.params.size());
  const double* hp = a.hyper.data_ptr<double>();
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& s = a.steps[i];
    double step;
    if (s.scalar_type() == at::kFloat) {
      float* sp = s.data_ptr<float>();
      *sp += 1.0f;
      step = *sp;
    } else {
      double* sp = s.data_ptr<double>();
      *sp += 1.0;
      step = *sp;
    }
    coef[i] = make_adam_coef(hp + i * kHyperCols, step);
    if (steps_out != nullptr) steps_out->push_back(step);
  }
  return coef;
}

}  // namespace cpu
}  // namespace lvopt
