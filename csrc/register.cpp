// The lvopt torch.library namespace: op schemas and their CPU implementations. Fake (meta)
// kernels are registered from Python (lvopt/_ops.py); CUDA implementations register under
// the same names from csrc/cuda/.
#include <torch/library.h>

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
      "Tensor(g!)? error=None) -> ()");
  m.def(
      "sparse_catchup_(Tensor(a!) param, Tensor indices, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor step, Tensor(e!) last_step, Tensor hist, Tensor qpow, "
      "Tensor hyper, int hist_base, int epoch, int window, Tensor(f!)? error=None) -> ()");
}

TORCH_LIBRARY_IMPL(lvopt, CPU, m) {
  m.impl("fused_adamw_", &lvopt::cpu::fused_adamw_);
  m.impl("fused_adamh_", &lvopt::cpu::fused_adamh_);
  m.impl("fused_adamh_reduce_", &lvopt::cpu::fused_adamh_reduce_);
  m.impl("fused_adamh_apply_", &lvopt::cpu::fused_adamh_apply_);
  m.impl("nonfinite_scan_", &lvopt::cpu::nonfinite_scan_);
  m.impl("coalesce_rows", &lvopt::cpu::coalesce_rows);
  m.impl("sparse_adamw_", &lvopt::cpu::sparse_adamw_);
  m.impl("sparse_catchup_", &lvopt::cpu::sparse_catchup_);
}
