// The lvopt torch.library namespace: op schemas and their CPU implementations. Fake (meta)
// kernels are registered from Python (lvopt/_ops.py); CUDA implementations register under
// the same names from csrc/cuda/.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(lvopt, m) {
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor hyper) -> ()");
  m.def(
      "fused_adamh_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor[] radii, Tensor hyper) -> Tensor");
}

TORCH_LIBRARY_IMPL(lvopt, CPU, m) {
  m.impl("fused_adamw_", &lvopt::cpu::fused_adamw_);
  m.impl("fused_adamh_", &lvopt::cpu::fused_adamh_);
}
