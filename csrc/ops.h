// Kernel entry points behind the torch.library ops of csrc/register.cpp.
#pragma once

#include <torch/types.h>

namespace lvopt {
namespace cpu {

// lvopt::fused_adamw_: AdamW (DESIGN.md section 2) on every tensor, in place.
void fused_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& hyper);

// lvopt::fused_adamh_: AdamH on every (matrix) tensor, in place, in two passes. Returns the
// fp64 sums of pass one, [n, 3]: ||u||^2, <W,u>, ||W||^2 per tensor (W before the step).
at::Tensor fused_adamh_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList radii,
                        const at::Tensor& hyper);

}  // namespace cpu
}  // namespace lvopt
