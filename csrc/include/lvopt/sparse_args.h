// Host-side argument checks of the sparse-row ops (lvopt::coalesce_rows, sparse_adamw_,
// sparse_catchup_), shared by the CPU kernels (csrc/cpu/sparse_rows.cpp) and the CUDA kernels
// (csrc/cuda/sparse_rows.cu). Every check raises (TORCH_CHECK, naming the argument and the
// problem) before a kernel writes anything.
//
// Where the tensors live: the table (param, exp_avg, exp_avg_sq), the indices, the values and
// last_step on the kernel's device; hyper on the CPU (its values are checked here); step on the
// CPU or the table's device (read on the host: a sparse step sizes its launch from the data,
// so it synchronises anyway); hist and qpow on the CPU or the table's device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>

#include "lvopt/math.h"
#include "lvopt/sparse_clock.h"

namespace lvopt {

inline void check_sparse_table(const char* op, c10::DeviceType kernel, const at::Tensor& param,
                               const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                               const at::Tensor& step, const at::Tensor& hyper) {
  const std::string kname = c10::DeviceTypeName(kernel);
  TORCH_CHECK(param.defined() && param.device().type() == kernel, op, ": param must be a ", kname,
              " tensor (this is the ", kname, " kernel), got one on ",
              param.defined() ? param.device() : c10::Device(c10::kCPU));
  TORCH_CHECK(param.dim() == 2, op, ": param must be 2-D (rows x width), got shape ",
              param.sizes());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kBFloat16, op,
              ": param has dtype ", param.scalar_type(), "; supported: float32, bfloat16");
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous (row-major)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"exp_avg", exp_avg},
                                {"exp_avg_sq", exp_avg_sq}}) {
    TORCH_CHECK(t.defined() && t.device() == param.device() && t.scalar_type() == at::kFloat &&
                    t.sizes() == param.sizes() && t.is_contiguous(),
                op, ": ", name, " must be a contiguous float32 tensor of the param's shape ",
                param.sizes(), " on ", param.device(), ", got ", t.scalar_type(), " ", t.sizes(),
                t.defined() ? " on " : "", t.defined() ? t.device().str() : std::string());
  }
  TORCH_CHECK(
      step.defined() && (step.device().is_cpu() || step.device() == param.device()) &&
          step.numel() == 1 &&
          (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
      op, ": step must be a one-element float32/float64 tensor on the CPU or the param's device");
  TORCH_CHECK(hyper.device().is_cpu() && hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(0) == 1 && hyper.size(1) == kHyperCols && hyper.is_contiguous(),
              op, ": hyper must be a contiguous CPU float64 tensor of shape [1, ",
              static_cast<int>(kHyperCols), "], got ", hyper.scalar_type(), " ", hyper.sizes(),
              " on ", hyper.device());
  const double* row = hyper.data_ptr<double>();
  TORCH_CHECK(std::isfinite(row[kLr]) && row[kLr] >= 0.0, op, ": lr must be finite and >= 0, got ",
              row[kLr]);
  TORCH_CHECK(row[kBeta1] >= 0.0 && row[kBeta1] < 1.0, op, ": beta1 must be in [0, 1), got ",
              row[kBeta1]);
  TORCH_CHECK(row[kBeta2] >= 0.0 && row[kBeta2] < 1.0, op, ": beta2 must be in [0, 1), got ",
              row[kBeta2]);
  TORCH_CHECK(std::isfinite(row[kEps]) && row[kEps] > 0.0, op, ": eps must be finite and > 0, got ",
              row[kEps]);
  TORCH_CHECK(std::isfinite(row[kWeightDecay]), op, ": weight_decay must be finite, got ",
              row[kWeightDecay]);
}

inline void check_sparse_indices(const char* op, const at::Tensor& indices,
                                 const at::Tensor& param) {
  TORCH_CHECK(indices.defined() && indices.device() == param.device() &&
                  indices.scalar_type() == at::kLong && indices.dim() == 1,
              op, ": indices must be a 1-D int64 tensor on ", param.device(), ", got ",
              indices.scalar_type(), " ", indices.sizes(), indices.defined() ? " on " : "",
              indices.defined() ? indices.device().str() : std::string());
}

inline void check_sparse_values(const char* op, const at::Tensor& values, const at::Tensor& indices,
                                const at::Tensor& param) {
  TORCH_CHECK(values.defined() && values.device() == param.device() && values.dim() == 2 &&
                  values.size(0) == indices.numel() && values.size(1) == param.size(1),
              op, ": values must have shape [", indices.numel(), ", ", param.size(1), "] on ",
              param.device(), ", got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == param.scalar_type(), op, ": values have dtype ",
              values.scalar_type(), " but param has ", param.scalar_type());
}

inline void check_sparse_stats(const char* op, const std::optional<at::Tensor>& stats,
                               const at::Tensor& param) {
  if (!stats.has_value()) return;
  const at::Tensor& s = *stats;
  TORCH_CHECK(s.defined() && s.device() == param.device() && s.scalar_type() == at::kDouble &&
                  s.numel() == 2 && s.is_contiguous(),
              op, ": stats must be a contiguous two-element float64 tensor on ", param.device(),
              ", got ", s.scalar_type(), " ", s.sizes(), s.defined() ? " on " : "",
              s.defined() ? s.device().str() : std::string());
}

// Everything lvopt::sparse_adamw_ can check without reading the ids or the clock.
inline void check_sparse_adamw_args(const char* op, c10::DeviceType kernel, const at::Tensor& param,
                                    const at::Tensor& indices, const at::Tensor& values,
                                    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                    const at::Tensor& step, const at::Tensor& hyper,
                                    const std::optional<at::Tensor>& stats) {
  check_sparse_table(op, kernel, param, exp_avg, exp_avg_sq, step, hyper);
  check_sparse_indices(op, indices, param);
  check_sparse_values(op, values, indices, param);
  check_sparse_stats(op, stats, param);
}

// The optional `error` word of sparse_adamw_ / sparse_catchup_ (lvopt/sparse.py, CHECK_IDS): a
// contiguous int64 tensor [3] on the table's device, {code, min id, max id}. When given, the op
// raises for nothing that depends on the data: if the word is already set it writes nothing;
// ids outside the table set {kErrIds, min, max} and a row whose last_step lies outside the
// history sets kErrClock, and then nothing is written either. The word is read back by the
// caller when it chooses (lazily on a GPU: no host synchronisation in the step).
constexpr int64_t kErrIds = 1;
constexpr int64_t kErrClock = 2;

// Bits of the sparse ops' `flags` argument. kFlagCoalesced: the ids are sorted and distinct (a
// coalesced gradient, a catch-up of listed rows): the GPU ops skip their sort. kFlagRing: `hist`
// is a device ring the step op appends to (lvopt/sparse.py RingClock; CUDA and Triton only).
constexpr int64_t kFlagCoalesced = 1;
constexpr int64_t kFlagRing = 2;

inline void check_sparse_error(const char* op, const std::optional<at::Tensor>& error,
                               const at::Tensor& param) {
  if (!error.has_value()) return;
  const at::Tensor& e = *error;
  TORCH_CHECK(e.defined() && e.device() == param.device() && e.scalar_type() == at::kLong &&
                  e.numel() == 3 && e.is_contiguous(),
              op, ": error must be a contiguous three-element int64 tensor on ", param.device(),
              ", got ", e.defined() ? e.scalar_type() : at::kLong, " ",
              e.defined() ? e.sizes() : at::IntArrayRef{});
}

// The step count (read on the host; a device counter is copied back).
inline double read_step(const at::Tensor& step) {
  const at::Tensor s = step.device().is_cpu() ? step : step.cpu();
  return s.scalar_type() == at::kFloat ? static_cast<double>(*s.data_ptr<float>())
                                       : *s.data_ptr<double>();
}

inline void write_step(const at::Tensor& step, double value) {
  if (!step.device().is_cpu()) {
    step.fill_(value);
  } else if (step.scalar_type() == at::kFloat) {
    *step.data_ptr<float>() = static_cast<float>(value);
  } else {
    *step.data_ptr<double>() = value;
  }
}

// Checks the exact-mode clock arguments and returns the Clock over hist/qpow as given (host
// pointers for CPU tables; the CUDA op re-points it at its device copies).
inline Clock check_sparse_clock(const char* op, const at::Tensor& param,
                                const at::Tensor& last_step, const at::Tensor& hist,
                                const at::Tensor& qpow, const at::Tensor& hyper, int64_t hist_base,
                                int64_t epoch, int64_t window) {
  TORCH_CHECK(last_step.defined() && last_step.device() == param.device() &&
                  last_step.scalar_type() == at::kLong && last_step.dim() == 1 &&
                  last_step.size(0) == param.size(0) && last_step.is_contiguous(),
              op, ": last_step must be a contiguous int64 tensor of shape [", param.size(0),
              "] on ", param.device(), ", got ", last_step.scalar_type(), " ", last_step.sizes(),
              last_step.defined() ? " on " : "",
              last_step.defined() ? last_step.device().str() : std::string());
  TORCH_CHECK(hist.defined() && (hist.device().is_cpu() || hist.device() == param.device()) &&
                  hist.scalar_type() == at::kDouble && hist.dim() == 2 &&
                  hist.size(1) == kHistCols && hist.size(0) >= 1 && hist.is_contiguous(),
              op, ": hist must be a contiguous float64 tensor of shape [steps, ",
              static_cast<int>(kHistCols), "] on the CPU or the param's device, got ",
              hist.scalar_type(), " ", hist.sizes());
  TORCH_CHECK(epoch >= 1 && window >= 0 && hist_base >= 0, op,
              ": need epoch >= 1, window >= 0, hist_base >= 0; got ", epoch, ", ", window, ", ",
              hist_base);
  const int64_t qcols = epoch + std::max(window, epoch) + 1;
  TORCH_CHECK(qpow.defined() && (qpow.device().is_cpu() || qpow.device() == param.device()) &&
                  qpow.scalar_type() == at::kDouble && qpow.dim() == 2 &&
                  qpow.size(0) == kHistSeries && qpow.size(1) == qcols && qpow.is_contiguous(),
              op, ": qpow must be a contiguous float64 tensor of shape [",
              static_cast<int>(kHistSeries), ", ", qcols,
              "] on the CPU or the param's device, got ", qpow.sizes());
  const double* row = hyper.data_ptr<double>();
  TORCH_CHECK(row[kBeta2] > 0.0, op, ": exact mode needs beta2 > 0");
  return Clock{hist.data_ptr<double>(),
               hist.size(0),
               hist_base,
               epoch,
               window,
               qpow.data_ptr<double>(),
               qcols,
               row[kBeta1],
               row[kBeta2],
               static_cast<float>(row[kEps])};
}

// Every touched row's last_step (its minimum and maximum) must lie in [hist_base, target], and
// the history must cover the target step.
inline void check_sparse_rows_clock(const char* op, int64_t last_min, int64_t last_max,
                                    const Clock& ck, int64_t target) {
  TORCH_CHECK(target >= ck.base && target - ck.base < ck.hist_rows, op, ": hist covers steps ",
              ck.base, "..", ck.base + ck.hist_rows - 1, " but step ", target, " is needed");
  TORCH_CHECK(last_min >= ck.base && last_max <= target, op, ": a row has last_step ",
              last_min < ck.base ? last_min : last_max, ", outside [", ck.base, ", ", target,
              "] (stale clock state?)");
}

}  // namespace lvopt
