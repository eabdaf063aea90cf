#include "multi_tensor.h"

#include "ops.h"

#include <atomic>
#include <cmath>

namespace lvopt {
namespace cpu {
// Per-ISA copies of the scan (LVOPT_ISA_DISPATCH wants void functions: the flag goes out
// through a pointer).
template <typename T>
LVOPT_ALWAYS_INLINE void scan_span(const T* x, int64_t n, bool* out) {
  *out = span_nonfinite(x, n);
}
LVOPT_ISA_DISPATCH(scan_f32_isa, (const float* x, int64_t n, bool* out), (x, n, out),
                   scan_span<float>)
LVOPT_ISA_DISPATCH(scan_bf16_isa, (const uint16_t* x, int64_t n, bool* out), (x, n, out),
                   scan_span<uint16_t>)

bool any_nonfinite(at::TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
                "lvopt: the non-finite scan takes float32/bfloat16 tensors, got ", t.scalar_type());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "lvopt: the non-finite scan takes dense tensors");
    numels.push_back(t.numel());
  }
  const std::vector<Chunk> chunks = plan_chunks(numels);
  std::atomic<bool> found{false};
  for_each_chunk(chunks, [&](const Chunk& ch, int64_t) {
    const at::Tensor& t = tensors[ch.tensor];
    bool bad = false;
    if (t.scalar_type() == at::kFloat) {
      scan_f32_isa(t.data_ptr<float>() + ch.begin, ch.end - ch.begin, &bad);
    } else {
      scan_bf16_isa(reinterpret_cast<const uint16_t*>(t.data_ptr()) + ch.begin, ch.end - ch.begin,
                    &bad);
    }
    if (bad) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

float* check_found_inf(const char* op, const std::optional<at::Tensor>& found_inf) {
  if (!found_inf.has_value()) return nullptr;
  const at::Tensor& f = *found_inf;
  TORCH_CHECK(f.defined() && f.device().is_cpu() && f.scalar_type() == at::kFloat && f.numel() == 1,
              op, ": found_inf must be a one-element float32 CPU tensor, got ", f.scalar_type(),
              " ", f.sizes(), " on ", f.device());
  return f.data_ptr<float>();
}

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

std::vector<AdamCoef> current_coefs(const StepArgs& a, std::vector<double>* steps_out) {
  std::vector<AdamCoef> coef(a.params.size());
  const double* hp = a.hyper.data_ptr<double>();
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& s = a.steps[i];
    const double step = s.scalar_type() == at::kFloat ? static_cast<double>(*s.data_ptr<float>())
                                                      : *s.data_ptr<double>();
    coef[i] = make_adam_coef(hp + i * kHyperCols, step);
    if (steps_out != nullptr) steps_out->push_back(step);
  }
  return coef;
}

void nonfinite_scan_(at::TensorList tensors, const at::Tensor& found_inf) {
  float* found = check_found_inf("lvopt::nonfinite_scan_", found_inf);
  if (*found == 0.0f && any_nonfinite(tensors)) *found = 1.0f;
}

double* check_stats(const char* op, const std::optional<at::Tensor>& stats, size_t n, int cols) {
  if (!stats.has_value()) return nullptr;
  const at::Tensor& s = *stats;
  TORCH_CHECK(s.defined() && s.device().is_cpu() && s.scalar_type() == at::kDouble &&
                  s.dim() == 2 && s.size(0) == static_cast<int64_t>(n) && s.size(1) == cols &&
                  s.is_contiguous(),
              op, ": stats must be a contiguous float64 CPU tensor of shape [", n, ", ", cols,
              "], got ", s.scalar_type(), " ", s.sizes(), " on ", s.device());
  s.zero_();
  return s.data_ptr<double>();
}

void add_chunk_partials(const std::vector<Chunk>& chunks, const std::vector<double>& partial,
                        int cols, double* out) {
  for (size_t k = 0; k < chunks.size(); ++k) {
    for (int j = 0; j < cols; ++j) out[cols * chunks[k].tensor + j] += partial[cols * k + j];
  }
}

}  // namespace cpu
}  // namespace lvopt
