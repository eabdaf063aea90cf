// Host-side argument checks of the multi-tensor step ops, shared by the CPU kernels
// (csrc/cpu/multi_tensor.cpp) and the CUDA kernels (csrc/cuda/multi_tensor.cuh). Every check
// raises (TORCH_CHECK, naming the argument, the tensor index and the problem) before a kernel
// writes anything.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cmath>
#include <optional>

#include "lvopt/math.h"

namespace lvopt {

struct StepArgs {
  const at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps;
  const at::Tensor& hyper;
};

inline void check_same_layout(const char* op, const char* name, size_t i, const at::Tensor& t,
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

inline void check_hyper_row(const char* op, size_t i, const double* row) {
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
}

// Checks a step for the kernel of device type `kernel` (CPU or CUDA). Parameters must be on
// that device type (all on params[0]'s device); hyper and steps may be on the host or on the
// parameters' device. Host-side hyper values are checked here; device-side ones (CUDA graphs)
// cannot be read without a synchronisation, so only their shape and dtype are: the optimizer
// that writes them validates them.
inline void check_step_args(const char* op, const StepArgs& a, c10::DeviceType kernel) {
  const size_t n = a.params.size();
  TORCH_CHECK(a.grads.size() == n && a.exp_avgs.size() == n && a.exp_avg_sqs.size() == n &&
                  a.steps.size() == n,
              op, ": tensor lists differ in length (params ", n, ", grads ", a.grads.size(),
              ", exp_avgs ", a.exp_avgs.size(), ", exp_avg_sqs ", a.exp_avg_sqs.size(), ", steps ",
              a.steps.size(), ")");
  const at::Tensor& h = a.hyper;
  const c10::Device dev = n > 0 && a.params[0].defined() ? a.params[0].device() : h.device();
  TORCH_CHECK((h.device().is_cpu() || h.device() == dev) && h.scalar_type() == at::kDouble &&
                  h.dim() == 2 && h.size(0) == static_cast<int64_t>(n) && h.size(1) == kHyperCols &&
                  h.is_contiguous(),
              op, ": hyper must be a contiguous float64 tensor of shape [", n, ", ",
              static_cast<int>(kHyperCols), "] on the CPU or on the parameters' device, got ",
              h.scalar_type(), " ", h.sizes(), " on ", h.device());
  const double* hp = h.device().is_cpu() ? h.data_ptr<double>() : nullptr;
  for (size_t i = 0; i < n; ++i) {
    if (hp != nullptr) check_hyper_row(op, i, hp + i * kHyperCols);
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device().type() == kernel && p.device() == dev, op, ": params[", i, "] is on ",
                p.device(), "; this is the ", c10::DeviceTypeName(kernel),
                " kernel and params[0] is on ", dev);
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16, op, ": params[",
                i, "] has dtype ", p.scalar_type(), "; supported: float32, bfloat16");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be dense and non-overlapping (strides ", p.strides(), ")");
    check_same_layout(op, "grads", i, a.grads[i], p, p.scalar_type());
    check_same_layout(op, "exp_avgs", i, a.exp_avgs[i], p, at::kFloat);
    check_same_layout(op, "exp_avg_sqs", i, a.exp_avg_sqs[i], p, at::kFloat);
    const at::Tensor& s = a.steps[i];
    TORCH_CHECK(
        s.defined() && (s.device().is_cpu() || s.device() == dev) && s.numel() == 1 &&
            (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
        op, ": steps[", i,
        "] must be a one-element float32/float64 tensor on the CPU or the parameters' device");
  }
}

// AMSGrad's running maxima of v (fused_adamw_'s max_exp_avg_sqs): absent or empty for plain
// AdamW, else one fp32 tensor per parameter laid out like it. Returns whether AMSGrad is on.
inline bool check_amsgrad_args(const char* op, const StepArgs& a,
                               const std::optional<at::TensorList>& max_exp_avg_sqs) {
  if (!max_exp_avg_sqs.has_value() || max_exp_avg_sqs->empty()) return false;
  const size_t n = a.params.size();
  TORCH_CHECK(max_exp_avg_sqs->size() == n, op, ": max_exp_avg_sqs has ", max_exp_avg_sqs->size(),
              " tensors, params has ", n, " (pass one per parameter for amsgrad, or none)");
  for (size_t i = 0; i < n; ++i) {
    check_same_layout(op, "max_exp_avg_sqs", i, (*max_exp_avg_sqs)[i], a.params[i], at::kFloat);
  }
  return true;
}

// A hyperball step takes no weight decay: checked in a host-side table (a device table is the
// optimizer's to keep, see check_step_args).
inline void check_no_weight_decay(const char* op, const StepArgs& a) {
  if (!a.hyper.device().is_cpu()) return;
  for (size_t i = 0; i < a.params.size(); ++i) {
    TORCH_CHECK(a.hyper.data_ptr<double>()[i * kHyperCols + kWeightDecay] == 0.0, op,
                ": weight_decay of tensor ", i,
                " must be 0 (hyperball steps have no weight decay)");
  }
}

// The sums fused_adamh_apply_ takes (what fused_adamh_reduce_ returned, all-reduced over the
// shards): a contiguous float64 [n, 3] tensor on the kernel's device.
inline void check_hyperball_sums(const char* op, const StepArgs& a, const at::Tensor& sums,
                                 c10::DeviceType kernel) {
  const size_t n = a.params.size();
  const bool here = n > 0 ? sums.device() == a.params[0].device() : sums.device().type() == kernel;
  TORCH_CHECK(sums.defined() && here && sums.scalar_type() == at::kDouble && sums.dim() == 2 &&
                  sums.size(0) == static_cast<int64_t>(n) && sums.size(1) == 3 &&
                  sums.is_contiguous(),
              op, ": sums must be a contiguous float64 tensor of shape [", n,
              ", 3] on the parameters' device (fused_adamh_reduce_'s result), got ",
              sums.scalar_type(), " ", sums.sizes(), " on ", sums.device());
}

// AdamH's extra arguments: one radius per tensor (host or the parameters' device; host values
// are checked), and no weight decay in the host-side table.
inline void check_hyperball_args(const char* op, const StepArgs& a, at::TensorList radii) {
  const size_t n = a.params.size();
  TORCH_CHECK(radii.size() == n, op, ": radii has ", radii.size(), " tensors, params has ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& r = radii[i];
    TORCH_CHECK(r.defined() && (r.device().is_cpu() || r.device() == a.params[0].device()) &&
                    r.numel() == 1 && r.scalar_type() == at::kDouble,
                op, ": radii[", i,
                "] must be a one-element float64 tensor on the CPU or the parameters' device");
    if (r.device().is_cpu()) {
      const double radius = r.data_ptr<double>()[0];
      TORCH_CHECK(std::isfinite(radius) && radius >= 0.0, op, ": radii[", i,
                  "] must be finite and >= 0, got ", radius);
    }
  }
  check_no_weight_decay(op, a);
}

}  // namespace lvopt
