// The lvopt torch.library namespace: op schemas and their CPU implementations. Fake (meta)
// kernels are registered from Python (lvopt/_ops.py); CUDA implementations register under
// the same names from csrc/cuda/.
#include <torch/library.h>

#include "lvopt/sparse_args.h"
#include "ops.h"

TORCH_LIBRARY(lvopt, m) {
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor hyper, Tensor(e!)? found_inf=None, "
      "Tensor(f!)? stats=None, Tensor(g!)[]? max_exp_avg_sqs=None) -> ()");
  m.def(
      "fused_adamh_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor[] radii, Tensor hyper, "
      "Tensor(e!)? found_inf=None) -> Tensor");
  m.def(
      "fused_adamh_reduce_(Tensor[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor hyper, Tensor(e!)? found_inf=None) "
      "-> Tensor");
  m.def(
      "fused_adamh_apply_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] steps, Tensor[] radii, Tensor hyper, Tensor sums, Tensor? found_inf=None) -> ()");
  m.def("nonfinite_scan_(Tensor[] tensors, Tensor(a!) found_inf) -> ()");
  m.def("coalesce_rows(Tensor indices, Tensor values, int num_rows) -> (Tensor, Tensor)");
  m.def(
      "sparse_adamw_(Tensor(a!) param, Tensor indices, Tensor values, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!) step, Tensor(e!) last_step, Tensor hist, Tensor qpow, "
      "Tensor hyper, int hist_base, int epoch, int window, bool exact, Tensor(f!)? stats=None, "
      "Tensor(g!)? error=None, int flags=0) -> ()");
  m.def(
      "sparse_catchup_(Tensor(a!) param, Tensor indices, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor step, Tensor(e!) last_step, Tensor hist, Tensor qpow, "
      "Tensor hyper, int hist_base, int epoch, int window, Tensor(f!)? error=None, int flags=0) -> "
      "()");
}

// The sparse ops' `flags` (lvopt/sparse_args.h kFlagCoalesced, kFlagRing) on the CPU: the
// CPU kernels sort the ids anyway (a coalesced gradient costs them no more) and keep the history
// on the host (RowClock), so a ring history is refused. The kernels' signatures stay as they are.
namespace {

void check_cpu_flags(const char* op, int64_t flags) {
  TORCH_CHECK(
      flags == 0 || flags == lvopt::kFlagCoalesced, op, ": flags ", flags,
      " on the CPU: 1 (coalesced ids) is accepted, a ring history (2) is kept by the cuda and "
      "triton backends only");
}

void sparse_adamw_cpu(const at::Tensor& param, const at::Tensor& indices, const at::Tensor& values,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& step, const at::Tensor& last_step, const at::Tensor& hist,
                      const at::Tensor& qpow, const at::Tensor& hyper, int64_t hist_base,
                      int64_t epoch, int64_t window, bool exact,
                      const std::optional<at::Tensor>& stats,
                      const std::optional<at::Tensor>& error, int64_t flags) {
  check_cpu_flags("lvopt::sparse_adamw_", flags);
  lvopt::cpu::sparse_adamw_(param, indices, values, exp_avg, exp_avg_sq, step, last_step, hist,
                            qpow, hyper, hist_base, epoch, window, exact, stats, error);
}

void sparse_catchup_cpu(const at::Tensor& param, const at::Tensor& indices,
                        const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                        const at::Tensor& step, const at::Tensor& last_step, const at::Tensor& hist,
                        const at::Tensor& qpow, const at::Tensor& hyper, int64_t hist_base,
                        int64_t epoch, int64_t window, const std::optional<at::Tensor>& error,
                        int64_t flags) {
  check_cpu_flags("lvopt::sparse_catchup_", flags);
  lvopt::cpu::sparse_catchup_(param, indices, exp_avg, exp_avg_sq, step, last_step, hist, qpow,
                              hyper, hist_base, epoch, window, error);
}

}  // namespace

TORCH_LIBRARY_IMPL(lvopt, CPU, m) {
  m.impl("fused_adamw_", &lvopt::cpu::fused_adamw_);
  m.impl("fused_adamh_", &lvopt::cpu::fused_adamh_);
  m.impl("fused_adamh_reduce_", &lvopt::cpu::fused_adamh_reduce_);
  m.impl("fused_adamh_apply_", &lvopt::cpu::fused_adamh_apply_);
  m.impl("nonfinite_scan_", &lvopt::cpu::nonfinite_scan_);
  m.impl("coalesce_rows", &lvopt::cpu::coalesce_rows);
  m.impl("sparse_adamw_", &sparse_adamw_cpu);
  m.impl("sparse_catchup_", &sparse_catchup_cpu);
}
