// Kernel entry points behind the torch.library ops of csrc/register.cpp.
#pragma once

#include <torch/types.h>

#include <optional>
#include <tuple>

namespace lvopt {
namespace cpu {

// lvopt::fused_adamw_: AdamW (docs/design.md section 2.1) on every tensor, in place.
// found_inf (optional, one-element float32): when given, the gradients are scanned first; if
// found_inf is already nonzero or a gradient element is NaN/inf, found_inf becomes 1 and
// nothing (parameters, moments, step counts) is written. stats (optional, float64 [n, 2]):
// receives per tensor the sums of W^2 (before the step) and of (W_after - W_before)^2.
// max_exp_avg_sqs (optional, float32, one per parameter, laid out like it): AMSGrad, the
// update divides by the running maximum of exp_avg_sq (math.h adamw_amsgrad_element).
void fused_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& stats,
                  std::optional<at::TensorList> max_exp_avg_sqs = std::nullopt);

// lvopt::fused_adamh_: AdamH on every (matrix) tensor, in place, in two passes. Returns the
// fp64 sums of pass one, [n, 3]: ||u||^2, <W,u>, ||W||^2 per tensor (W before the step);
// zeros when found_inf (as for fused_adamw_) stops the step.
at::Tensor fused_adamh_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList radii,
                        const at::Tensor& hyper, const std::optional<at::Tensor>& found_inf);

// lvopt::fused_adamh_reduce_: pass one of fused_adamh_ alone: advances the step counters,
// updates m and v and returns the sums [n, 3] of the local tensors (no parameter is written).
// found_inf as for fused_adamh_. The sums of a sharded tensor are all-reduced over its shards
// before pass two (lvopt/optim.py), which makes the sharded step the unsharded one.
at::Tensor fused_adamh_reduce_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& hyper, const std::optional<at::Tensor>& found_inf);

// lvopt::fused_adamh_apply_: pass two alone: W <- a*W - b*u, the scales from `sums` (float64
// [n, 3] on the parameters' device: ||u||^2, <W,u>, ||W||^2 of the whole tensors) and the
// radii, u recomputed from m, v and the step counters as fused_adamh_reduce_ left them. When
// found_inf (read only) is set, nothing is written.
void fused_adamh_apply_(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::TensorList steps, at::TensorList radii, const at::Tensor& hyper,
                        const at::Tensor& sums, const std::optional<at::Tensor>& found_inf);

// lvopt::nonfinite_scan_: sets found_inf (one-element float32) to 1 when an element of
// `tensors` is NaN or infinite; leaves it otherwise. The pre-scan of a step's other ops.
void nonfinite_scan_(at::TensorList tensors, const at::Tensor& found_inf);

// lvopt::coalesce_rows: the distinct rows of `indices` (sorted) and, for each, the fp32 sum of
// its `values` rows in input order, rounded once to the values' dtype. Deterministic.
std::tuple<at::Tensor, at::Tensor> coalesce_rows(const at::Tensor& indices,
                                                 const at::Tensor& values, int64_t num_rows);

// lvopt::sparse_adamw_: one AdamW step of the rows that `indices` touch (duplicates summed in
// input order). Lazy (exact = false): untouched rows stay as they are. Exact: each touched row
// is first brought current from last_step[row] (the skipped zero-gradient steps, closed form
// from the per-step history `hist`), then stepped; last_step[row] becomes the new step.
// stats (optional, float64 [2]): the sums, over the rows written, of W^2 before the call
// (exact mode: before the catch-up) and of (W_after - W_before)^2.
void sparse_adamw_(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& values,
                   const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                   const at::Tensor& last_step, const at::Tensor& hist, const at::Tensor& qpow,
                   const at::Tensor& hyper, int64_t hist_base, int64_t epoch, int64_t window,
                   bool exact, const std::optional<at::Tensor>& stats,
                   const std::optional<at::Tensor>& error);

// error (optional, int64 [3]): see sparse_args.h, check_sparse_error: bad ids or clock state
// are reported there (nothing written) instead of raised.
//
// lvopt::sparse_catchup_: brings the rows `indices` names current to `step` (exact mode);
// the step count does not change. error: as for sparse_adamw_.
void sparse_catchup_(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step,
                     const at::Tensor& last_step, const at::Tensor& hist, const at::Tensor& qpow,
                     const at::Tensor& hyper, int64_t hist_base, int64_t epoch, int64_t window,
                     const std::optional<at::Tensor>& error);

}  // namespace cpu
}  // namespace lvopt
