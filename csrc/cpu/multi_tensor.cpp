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
